"""Tuning of the fp16 parameters an EXL2 model keeps (exlbuild.quant.exl2.tune) on a tiny random model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import layer_prefix, open_model
from exlbuild.model.llama import decoder_layer, final_logits, forward_logits, rope_tables
from exlbuild.quant.exl2.compile import compile_model
from exlbuild.quant.exl2.convert import (
    EMBEDDING_KEY,
    FINAL_NORM_KEY,
    GLOBALS_FILE,
    HEAD_FILE,
    HEAD_KEY,
    decode_layer_weights,
    layer_file,
    linear_shapes,
    linear_tensors,
    quantize_model,
)
from exlbuild.quant.exl2.pack import dequantize, input_feature_groups
from exlbuild.quant.stream import LINEARS, NORMS
from exlbuild.quant.exl2 import tune
from exlbuild.quant.exl2.tune import EAGER_STEPS, Adam, Multipliers, next_token_kl, tune_model
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
    assert 0 < metrics["seconds_steps"] < metrics["seconds"]
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
    """Two tunings on the GPU write the same bytes (deterministic backward kernels), and they tune; so does one with
    its layers streamed (eager steps instead of a CUDA graph's) and one that runs each layer again in the backward
    pass (which of these runs depends on the free memory)."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out, stream, recompute in (("a", False, None), ("b", False, None), ("streamed", True, None),
                                   ("recomputed", False, True)):
        metrics = tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=20, lr=2e-2, rows_per_step=4,
                             device="cuda", stream_layers=stream, recompute=recompute)
        assert metrics["kl_last_pass"] < metrics["kl_first_pass"]
        assert metrics["recomputed_layers"] is (recompute or stream)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b") == file_bytes(tmp_path / "streamed") \
        == file_bytes(tmp_path / "recomputed")
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
    """Each linear's input features take their group's factor, each norm's features their weight times their own
    factor, in the compute dtype; the gradient (the sums over each group's features in a fixed order) is
    index_select's (groups of uneven sizes, in any order)."""
    groups = [torch.tensor([3, 0, 0, 2, 3, 3, 1, 0, 3, 2]), torch.tensor([1, 0, 1, 1])]
    linears = [SimpleNamespace(feature_group=g, groups=int(g.max()) + 1) for g in groups]
    norm_weights = [torch.rand(3) + 0.5, torch.rand(2) + 0.5]
    norms = [SimpleNamespace(weight=w) for w in norm_weights]
    multipliers = Multipliers(linears, norms, torch.device("cpu"))
    assert multipliers.log.shape == (4 + 2 + 3 + 2,)
    with torch.no_grad():
        multipliers.log.copy_(torch.randn(11))
    log = multipliers.log.detach()
    linear_factors, norm_factors = multipliers.expand(torch.float32)
    assert torch.equal(linear_factors[0], log.exp()[groups[0]]) and torch.equal(linear_factors[1], log.exp()[4 + groups[1]])
    assert torch.equal(norm_factors[0], norm_weights[0] * log.exp()[6:9])
    assert torch.equal(norm_factors[1], norm_weights[1] * log.exp()[9:])
    assert torch.equal(multipliers.of_linear(1), log[4:6]) and torch.equal(multipliers.of_norm(1), log[9:])
    low = multipliers.expand(torch.bfloat16)
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip((*low[0], *low[1]), (*linear_factors, *norm_factors)))

    weights = [torch.randn(t.numel()) for t in (*linear_factors, *norm_factors)]
    loss = sum((w * f).sum() for w, f in zip(weights, (*linear_factors, *norm_factors)))
    (ours,) = torch.autograd.grad(loss, multipliers.log)
    reference_log = log.clone().requires_grad_()
    index = torch.cat([groups[0], 4 + groups[1], torch.arange(6, 11)])
    base = torch.cat([torch.ones(14), *norm_weights])
    reference_loss = (torch.cat(weights) * base * torch.index_select(reference_log.exp(), 0, index)).sum()
    (reference,) = torch.autograd.grad(reference_loss, reference_log)
    torch.testing.assert_close(ours, reference)


def test_adam_takes_torch_optims_steps() -> None:
    """The same steps as torch.optim.Adam, whose rate is set to the schedule's before each step."""
    target = torch.randn(50, dtype=torch.float64)
    ours, theirs = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64, requires_grad=True)
    factors = [1.0 - step / 40 for step in range(30)]
    adam, reference = Adam(ours, lr=0.05, factors=factors), torch.optim.Adam([theirs], lr=0.05)
    for step in range(30):
        adam.step(4 * (ours - target) ** 3 + (ours - target), torch.tensor(step))
        reference.param_groups[0]["lr"] = 0.05 * factors[step]
        reference.zero_grad()
        ((theirs - target) ** 4 + (theirs - target) ** 2 / 2).sum().backward()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach())
    assert not torch.equal(ours, torch.zeros(50, dtype=torch.float64))


def test_a_model_too_large_for_the_gpu_is_refused_before_tuning(quantized: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What the tuning needs even with its layers streamed over the GPU's free memory: an error that says so and
    what to set, before anything is loaded onto the GPU."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 10, 80 << 30))
    with pytest.raises(ExlbuildError, match=r"the tuning .* GiB of GPU memory, but 0.0 GiB are free; set tune.steps=0"):
        tune_model(quantized["model"], quantized["tmp"] / "quantized", tmp_path / "out", quantized["ids"], steps=1,
                   lr=1e-3, rows_per_step=2, device="cuda")


def test_streamed_layers_tune_to_the_same_bytes(quantized: dict, tmp_path: Path) -> None:
    """Layers decoded at every use (how a model too large for the GPU is tuned) give what decoded-once layers give."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out, stream in (("resident", False), ("streamed", True)):
        metrics = tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=4, lr=1e-2, rows_per_step=3,
                             stream_layers=stream)
        assert metrics["streamed_layers"] is stream
    assert file_bytes(tmp_path / "resident") == file_bytes(tmp_path / "streamed")


def test_recomputed_layers_tune_to_the_same_bytes(quantized: dict, tmp_path: Path) -> None:
    """Layers run again in the backward pass (how a model whose activations would not fit is tuned) give what layers
    that keep their activations give; on the CPU they keep them unless told."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out, recompute in (("kept", None), ("recomputed", True)):
        metrics = tune_model(model, tmp / "quantized", tmp_path / out, ids, steps=4, lr=1e-2, rows_per_step=3,
                             recompute=recompute)
        assert metrics["recomputed_layers"] is bool(recompute)
    assert file_bytes(tmp_path / "kept") == file_bytes(tmp_path / "recomputed")


def test_next_token_kl_and_its_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """KL(target ‖ model) of the next-token distributions, averaged over tokens, and its gradients with respect to
    the states and the norm, whatever the slicing of the tokens."""
    torch.manual_seed(0)
    states, target = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    norm, head = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(11, 8, dtype=torch.float64)
    target_norm, target_head = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(11, 8, dtype=torch.float64)
    assert next_token_kl(target, norm, head, target, norm, head, 1e-5)[0].item() == pytest.approx(0, abs=1e-6)

    leaf_states, leaf_norm = states.clone().requires_grad_(), norm.clone().requires_grad_()
    log_q = F.log_softmax(F.linear(F.rms_norm(leaf_states, (8,), leaf_norm, 1e-5), head), -1)
    log_p = F.log_softmax(F.linear(F.rms_norm(target, (8,), target_norm, 1e-5), target_head), -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    expected_grads = torch.autograd.grad(expected, [leaf_states, leaf_norm])
    for tokens_per_slice in (1, 3, 10):
        monkeypatch.setattr(tune, "LOGIT_ELEMENTS", 11 * tokens_per_slice)
        kl, grad_states, grad_norm = next_token_kl(states, norm, head, target, target_norm, target_head, 1e-5,
                                                   grad=True)
        torch.testing.assert_close(kl, expected.detach().float())
        torch.testing.assert_close(grad_states, expected_grads[0])
        torch.testing.assert_close(grad_norm, expected_grads[1])


def test_the_step_follows_the_gradient_of_the_whole_model_s_kl(quantized: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step's gradient (layers run again in the backward pass, the KL a slice of tokens at a time) is the
    gradient of the KL computed in one graph over the whole model, by each group's and norm's log-multiplier."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    grads = []

    class RecordingAdam(Adam):
        def step(self, grad: torch.Tensor, step: torch.Tensor) -> None:
            grads.append(grad.clone())
            super().step(grad, step)

    monkeypatch.setattr(tune, "Adam", RecordingAdam)
    monkeypatch.setattr(tune, "LOGIT_ELEMENTS", 256 * 100)  # 100 tokens a slice
    rows = 3
    tune_model(model, tmp / "quantized", tmp_path / "tuned", ids, steps=1, lr=1e-3, rows_per_step=rows)

    cfg, _ = open_model(model)
    out_features = {name: shape.out_features for name, shape in linear_shapes(cfg).items()}
    batch = ids[:rows]
    log_p = F.log_softmax(forward_logits(model, batch), dim=-1)
    layers = [load_file(str(tmp / "quantized" / layer_file(i))) for i in range(cfg.num_hidden_layers)]
    head_tensors = linear_tensors(load_file(str(tmp / "quantized" / HEAD_FILE)), HEAD_KEY)
    globals_ = load_file(str(tmp / "quantized" / GLOBALS_FILE))
    linear_scales, norm_leaves, feature_groups = [], [], []
    x = F.embedding(batch, globals_[EMBEDDING_KEY].float())
    rope = rope_tables(cfg, batch.shape[1])
    for i, layer in enumerate(layers):
        w = decode_layer_weights(layer, i, out_features, torch.device("cpu"))
        for name in LINEARS:
            tensors = linear_tensors(layer, layer_prefix(i) + name)
            feature_groups.append(input_feature_groups(tensors))
            linear_scales.append(torch.ones(len(feature_groups[-1]), requires_grad=True))
            w[f"{name}.input_scale"] = linear_scales[-1]
        for name in NORMS:
            norm_leaves.append(w[name].clone().requires_grad_())
            w[name] = norm_leaves[-1]
        x = decoder_layer(x, w, cfg, rope)
    feature_groups.append(input_feature_groups(head_tensors))
    linear_scales.append(torch.ones(len(feature_groups[-1]), requires_grad=True))
    norm_leaves.append(globals_[FINAL_NORM_KEY].float().requires_grad_())
    head = dequantize(head_tensors, cfg.vocab_size).float()
    log_q = F.log_softmax(final_logits(x, norm_leaves[-1] * linear_scales[-1], head, cfg.rms_norm_eps), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / batch.numel()
    scale_grads = torch.autograd.grad(kl, linear_scales + norm_leaves)
    # d/d(log m) of a group's multiplier: the sum over its features of d/d(scale); of a norm's: d/d(weight) · weight.
    expected = [torch.zeros(int(g.max()) + 1).index_add_(0, g, s) for g, s in zip(feature_groups, scale_grads)]
    expected += [g * n.detach() for g, n in zip(scale_grads[len(linear_scales):], norm_leaves)]
    torch.testing.assert_close(grads[0], torch.cat(expected), rtol=1e-4, atol=1e-7)


def test_the_tuning_imports_no_compiler(quantized: dict, tmp_path: Path) -> None:
    """torch.utils.checkpoint and torch.optim import PyTorch's compiler stack (torch._dynamo, ~900 modules, ~1 s)
    when first used; the tuning uses neither (tune._Recomputed, tune.Adam), so a build's first tuned variant does
    not pay for it. In a fresh process, as a build's."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_exl2_convert import random_ids\n"
        "from exlbuild.quant.exl2.tune import tune_model\n"
        f"tune_model({str(quantized['model'])!r}, {str(quantized['tmp'] / 'quantized')!r}, {str(tmp_path)!r}, "
        "random_ids(256), steps=2, lr=1e-3, rows_per_step=2)\n"
        "assert 'torch._dynamo' not in sys.modules, 'the tuning imported torch._dynamo'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
