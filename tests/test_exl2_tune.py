"""Tuning of the fp16 parameters an EXL2 model keeps (exlbuild.quant.exl2.tune) on a tiny random model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from exlbuild.errors import ExlbuildError
from exlbuild.model.llama import forward_logits
from exlbuild.quant.exl2.compile import compile_model
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.pack import dequantize, input_feature_groups
from exlbuild.quant.exl2.tune import EAGER_STEPS, Adam, Multipliers, tune_model
from model_fixtures import tiny_model
from test_exl2_convert import QUANT_CONFIG, SHAPE, file_bytes, random_ids, strategy


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-layer model quantized at about 2.5 bits (candidate 1 everywhere, head 4 bits)."""
    tmp = tmp_path_factory.mktemp("tune")
    model = tiny_model(tmp / "model", vocab_size=256, **SHAPE)
    ids = random_ids(256)
    quantize_model(model, ids, strategy(2, 1, 1), 4, tmp / "quantized")
    return {"model": model, "ids": ids, "tmp": tmp}


def kl_to_model(model: Path, tensors: Path, ids: torch.Tensor, out: Path) -> float:
    """Mean KL per token from the model to the compiled `tensors` on `ids`."""
    compile_model(tensors, model, out, 0, QUANT_CONFIG)
    reference = F.log_softmax(forward_logits(model, ids), dim=-1)
    quantized = F.log_softmax(forward_logits(out, ids), dim=-1)
    return F.kl_div(quantized, reference, log_target=True, reduction="sum").item() / ids.numel()


def changed_tensors(before: Path, after: Path) -> set[str]:
    """The names of the tensors that differ between two directories of the quantization pass's layout, after
    checking that both hold the same files and tensors, with the same dtypes and shapes."""
    assert file_bytes(before).keys() == file_bytes(after).keys()
    changed = set()
    for name in file_bytes(before):
        a, b = load_file(str(before / name)), load_file(str(after / name))
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
        changed |= {k for k in a if not torch.equal(a[k], b[k])}
    return changed


def test_tuning_lowers_the_divergence_and_changes_only_fp16_parameters(quantized: dict) -> None:
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    metrics = tune_model(model, tmp / "quantized", tmp / "tuned", ids, steps=80, lr=2e-2, rows_per_step=4)
    assert metrics["kl_last_pass"] < 0.85 * metrics["kl_first_pass"], metrics
    before = kl_to_model(model, tmp / "quantized", ids, tmp / "compiled-quantized")
    after = kl_to_model(model, tmp / "tuned", ids, tmp / "compiled-tuned")
    assert after < 0.85 * before, (before, after)  # what is written (fp16 scales, decoded as the loader does) keeps the gain

    changed = changed_tensors(tmp / "quantized", tmp / "tuned")
    tunable = ("q_scale_max", "layernorm.weight", "model.norm.weight")
    assert changed and all(k.endswith(tunable) for k in changed)
    assert any(k.endswith("q_scale_max") for k in changed) and any(k.endswith("layernorm.weight") for k in changed)


def test_tuning_is_deterministic(quantized: dict, tmp_path: Path) -> None:
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out in ("a", "b"):
        tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=3, lr=1e-2, rows_per_step=3)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_is_deterministic_on_cuda(quantized: dict, tmp_path: Path) -> None:
    """Two tunings on the GPU write the same bytes (deterministic backward kernels), and they tune."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out in ("a", "b"):
        metrics = tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=20, lr=2e-2, rows_per_step=4,
                             device="cuda")
    assert metrics["kl_last_pass"] < metrics["kl_first_pass"]
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert file_bytes(tmp_path / "a") != file_bytes(tmp / "quantized")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_gives_its_cuda_graph_memory_back(quantized: dict, tmp_path: Path) -> None:
    """Tunings one after another hold no memory of the ones before (each graph's pool stayed reserved, and a cuBLAS
    workspace taken in the capture kept it allocated: a build of five tuned variants ran out of memory on the H100)."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    allocated, reserved = [], []
    for out in ("a", "b", "c"):
        tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=EAGER_STEPS + 2, lr=2e-2, rows_per_step=4,
                   device="cuda")
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        reserved.append(torch.cuda.memory_reserved())
    assert allocated[0] == allocated[1] == allocated[2], allocated
    assert reserved[2] <= reserved[0], reserved


def test_input_feature_groups_follow_the_scale_of_each_group(quantized: dict) -> None:
    """Doubling one group's q_scale_max doubles exactly the weights of the input features that group holds."""
    layer = load_file(str(quantized["tmp"] / "quantized" / "layers" / "00000.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    tensors = {s: layer[f"{key}.{s}"] for s in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")}
    groups = input_feature_groups(tensors)
    assert groups.shape == (SHAPE["intermediate_size"],) and int(groups.max()) + 1 == len(tensors["q_scale_max"])
    base = dequantize(tensors).float()
    for g in range(len(tensors["q_scale_max"])):
        scaled = dict(tensors, q_scale_max=tensors["q_scale_max"].clone())
        scaled["q_scale_max"][g] *= 2
        changed = (dequantize(scaled).float() != base).any(dim=0)
        assert torch.equal(changed, (groups == g) & (base != 0).any(dim=0))


def test_tuning_a_model_with_biases_and_padded_outputs(tmp_path: Path) -> None:
    """Qwen2's attention biases, k_proj/v_proj 16 wide (stored padded to 32): tuned like the rest, biases kept."""
    model = tiny_model(tmp_path / "model", kind="qwen2", vocab_size=256, **dict(SHAPE, num_key_value_heads=1))
    ids = random_ids(256)
    quantize_model(model, ids, strategy(2, 1, 1), 4, tmp_path / "quantized")
    metrics = tune_model(model, tmp_path / "quantized", tmp_path / "tuned", ids, steps=20, lr=2e-2, rows_per_step=4)
    assert metrics["kl_last_pass"] < metrics["kl_first_pass"]
    before = load_file(str(tmp_path / "quantized" / "layers" / "00000.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "layers" / "00000.safetensors"))
    assert before["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    assert torch.equal(before["model.layers.0.self_attn.k_proj.bias"], after["model.layers.0.self_attn.k_proj.bias"])


def test_multipliers_expand_like_indexing() -> None:
    """Each linear's input features take their group's factor, each norm's features their own, and the fixed-order
    backward of the group expansion gives index_select's gradient (groups of uneven sizes, in any order)."""
    groups = [torch.tensor([3, 0, 0, 2, 3, 3, 1, 0, 3, 2]), torch.tensor([1, 0, 1, 1])]
    linears = [SimpleNamespace(feature_group=g, groups=int(g.max()) + 1) for g in groups]
    norms = [SimpleNamespace(weight=torch.ones(3)), SimpleNamespace(weight=torch.ones(2))]
    multipliers = Multipliers(linears, norms, torch.device("cpu"))
    assert multipliers.log.shape == (4 + 2 + 3 + 2,)
    with torch.no_grad():
        multipliers.log.copy_(torch.randn(11))
    log = multipliers.log.detach()
    linear_factors, norm_factors = multipliers.expand()
    assert torch.equal(linear_factors[0], log.exp()[groups[0]]) and torch.equal(linear_factors[1], log.exp()[4 + groups[1]])
    assert torch.equal(norm_factors[0], log.exp()[6:9]) and torch.equal(norm_factors[1], log.exp()[9:])
    assert torch.equal(multipliers.of_linear(1), log[4:6]) and torch.equal(multipliers.of_norm(1), log[9:])

    weights = [torch.randn(t.numel()) for t in (*linear_factors, *norm_factors)]
    loss = sum((w * f).sum() for w, f in zip(weights, (*linear_factors, *norm_factors)))
    (ours,) = torch.autograd.grad(loss, multipliers.log)
    reference_log = log.clone().requires_grad_()
    index = torch.cat([groups[0], 4 + groups[1], torch.arange(6, 11)])
    reference_loss = (torch.cat(weights) * torch.index_select(reference_log.exp(), 0, index)).sum()
    (reference,) = torch.autograd.grad(reference_loss, reference_log)
    torch.testing.assert_close(ours, reference)


def test_adam_takes_torch_optims_steps() -> None:
    target = torch.randn(50, dtype=torch.float64)
    ours, theirs = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64, requires_grad=True)
    adam, reference = Adam(ours, lr=0.05), torch.optim.Adam([theirs], lr=0.05)
    for _ in range(30):
        adam.step(4 * (ours - target) ** 3 + (ours - target))
        reference.zero_grad()
        ((theirs - target) ** 4 + (theirs - target) ** 2 / 2).sum().backward()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach())
    assert not torch.equal(ours, torch.zeros(50, dtype=torch.float64))


def test_a_model_too_large_for_the_gpu_is_refused_before_tuning(quantized: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models' weights alone over the GPU's free memory: an error that says so and what to set, before
    anything is loaded onto the GPU."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 10, 80 << 30))
    with pytest.raises(ExlbuildError, match=r"the tuning .* GiB of GPU memory, but 0.0 GiB are free; set tune.steps=0"):
        tune_model(quantized["model"], quantized["tmp"] / "quantized", tmp_path / "out", quantized["ids"], steps=1,
                   lr=1e-3, rows_per_step=2, device="cuda")
