"""The EXL2 quantization pass (exl2-format.md 4.8), the compiled output directory (section 5) and reading it
back through Checkpoint (section 7), on tiny random models."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exlbuild.errors import ExlbuildError
from exlbuild.eval import perplexity
from exlbuild.model.checkpoint import Checkpoint, head_weight, layer_weights, open_model
from exlbuild.model.llama import decoder_layer, embed, forward_logits, rope_tables
from exlbuild.quant.exl2 import convert
from exlbuild.quant.exl2.compile import compile_model, plan_shards
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES, pad_to_32
from model_fixtures import tiny_model

ROWS, LENGTH = 8, 64
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
QUANT_CONFIG = {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6,
                "calibration": {"rows": ROWS, "length": LENGTH, "dataset": "(default)"}}


def strategy(layers: int, attn: int, mlp: int) -> dict:
    """Every layer gets attention candidate `attn` and MLP candidate `mlp`."""
    blocks = {}
    for i in range(layers):
        blocks[f"model.layers.{i}.self_attn"] = dict(zip(ATTN_CANDIDATES.projections, ATTN_CANDIDATES.candidates[attn]))
        blocks[f"model.layers.{i}.mlp"] = dict(zip(MLP_CANDIDATES.projections, MLP_CANDIDATES.candidates[mlp]))
    return blocks


def random_ids(vocab: int, rows: int = ROWS) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, LENGTH), generator=torch.Generator().manual_seed(1))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run(tmp: Path, model: Path, ids: torch.Tensor, layers: int, attn: int, mlp: int, head_bits: int,
        shard_size_mb: int = 0) -> tuple[dict, dict, Path]:
    """quantize_model then compile_model; (quantize metrics, compile result, compiled directory)."""
    metrics = quantize_model(model, ids, strategy(layers, attn, mlp), head_bits, tmp / "quantized", tmp / "state")
    compiled = compile_model(tmp / "quantized", model, tmp / "compiled", shard_size_mb, QUANT_CONFIG)
    return metrics, compiled, tmp / "compiled"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-layer model quantized at ~4 bits (attention and MLP candidate 6, head 6) and at 8 bits."""
    tmp = tmp_path_factory.mktemp("exl2")
    model = tiny_model(tmp / "model", vocab_size=256, **SHAPE)
    ids = random_ids(256)
    four = run(tmp / "4bit", model, ids, 2, 6, 6, 6)
    eight = run(tmp / "8bit", model, ids, 2, 18, 16, 8)
    return {"model": model, "ids": ids, "tmp": tmp, "4bit": four, "8bit": eight}


def test_dequantized_weights_are_close(llama: dict) -> None:
    """Every linear decodes to within a few quantization steps of its original; norms and embedding are the
    fp16 originals; the compiled directory passes the loader's checks (open_model)."""
    source = Checkpoint(llama["model"])
    _, quantized = open_model(llama["4bit"][2])
    options = strategy(2, 6, 6)
    for name in source.names():
        original = source.get(name)
        if name.endswith("_proj.weight"):
            key, _, projection = name.removesuffix(".weight").rpartition(".")
            step = original.abs().max() / 2 ** (min(options[key][projection].bits) - 1)
            assert (quantized.get(name) - original).abs().max() <= 3 * step, name
        elif name != "lm_head.weight":
            assert torch.equal(quantized.get(name), original.half().float()), name
    head = source.get("lm_head.weight")
    assert (head_weight(quantized, quantized.cfg) - head).abs().max() <= 3 * head.abs().max() / 2**5
    with pytest.raises(ExlbuildError, match="EXL2-quantized: open the directory with its config"):
        Checkpoint(llama["4bit"][2]).get("model.layers.0.mlp.up_proj.weight")


def test_perplexity_close_to_fp(llama: dict) -> None:
    ids = llama["ids"]
    fp = perplexity(llama["model"], ids.flatten(), window=LENGTH)["perplexity"]
    fp_logits = forward_logits(llama["model"], ids)
    for bits, close, logit_error in (("8bit", 0.01, 0.05), ("4bit", 0.5, 0.6)):
        metrics, _, compiled = llama[bits]
        ppl = perplexity(compiled, ids.flatten(), window=LENGTH)["perplexity"]
        # Calibration perplexity is this very quantity, on the quantized states of the pass (held in float16
        # between blocks, where the reader's forward keeps float32).
        assert metrics["calibration_perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert abs(math.log(ppl / fp)) < close, (bits, ppl, fp)
        logits = forward_logits(compiled, ids)
        assert ((logits - fp_logits).norm() / fp_logits.norm()).item() < logit_error, bits
    errors_4, errors_8 = llama["4bit"][0]["rfn_error"], llama["8bit"][0]["rfn_error"]
    assert list(errors_4) == list(strategy(2, 0, 0))
    assert all(0 < errors_8[k] < errors_4[k] < 1 for k in errors_4)


def test_bits_per_weight(llama: dict) -> None:
    """The options' total_bits (quantize) and the stored tensors (compile) agree."""
    for bits, low, high in (("4bit", 3.5, 5.0), ("8bit", 8.0, 8.7)):
        metrics, compiled, _ = llama[bits]
        assert low < metrics["bits_per_weight"] < high
        assert compiled["bits_per_weight"] == pytest.approx(metrics["bits_per_weight"], rel=1e-12)
        assert compiled["head_bits_per_weight"] == pytest.approx(metrics["head_bits_per_weight"], rel=1e-12)


def test_layers_see_quantized_states(llama: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1 is calibrated on the output of the quantized layer 0 (as the loader computes it), not the FP one."""
    inputs = {}
    original = convert.quantize_block

    def recording(block, x, w, options, cfg, rope, prefix, *rest):
        inputs[prefix + block] = x.clone()
        return original(block, x, w, options, cfg, rope, prefix, *rest)

    monkeypatch.setattr(convert, "quantize_block", recording)
    quantize_model(llama["model"], llama["ids"], strategy(2, 6, 6), 6, tmp_path / "out")
    seen = inputs["model.layers.1.attention"]

    def layer0_output(model_dir: Path) -> torch.Tensor:
        cfg, ckpt = open_model(model_dir)
        x = embed(llama["ids"], ckpt.get("model.embed_tokens.weight"))
        x = decoder_layer(x, layer_weights(ckpt, cfg, 0), cfg, rope_tables(cfg, LENGTH))
        return x.to(seen.dtype)  # the pass holds its states in float16 (rounded after each block)

    def distance(model_dir: Path) -> float:
        reference = layer0_output(model_dir).float()
        return ((seen.float() - reference).norm() / reference.norm()).item()

    assert distance(llama["4bit"][2]) < 1e-3  # float16 rounding of the states (the reader keeps float32)
    assert distance(llama["model"]) > 1e-2


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of a pass."""


def test_resume_after_interruption(llama: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = convert.quantize_block

    def interrupted(block, x, w, options, cfg, rope, prefix, *rest):
        calls.append(prefix + block)
        if len(calls) == 3:  # the first run stops at layer 1
            raise Interrupted
        return original(block, x, w, options, cfg, rope, prefix, *rest)

    monkeypatch.setattr(convert, "quantize_block", interrupted)
    args = (llama["model"], llama["ids"], strategy(2, 6, 6), 6, tmp_path / "quantized", tmp_path / "state")
    with pytest.raises(Interrupted):
        quantize_model(*args)
    assert not (tmp_path / "quantized").exists()  # nothing half-done in the output
    assert (tmp_path / "state" / "layers" / "00000.safetensors").is_file()
    assert load_file(str(tmp_path / "state" / "states.safetensors")) == {}  # no states: resuming recomputes them
    metrics = quantize_model(*args)
    assert calls == ["model.layers.0.attention", "model.layers.0.mlp", "model.layers.1.attention",
                     "model.layers.1.attention", "model.layers.1.mlp"]  # layer 0 was not redone
    assert file_bytes(tmp_path / "quantized") == file_bytes(llama["tmp"] / "4bit" / "quantized")
    assert metrics["rfn_error"] == llama["4bit"][0]["rfn_error"]

    with pytest.raises(ExlbuildError, match="holds a quantization pass of other inputs"):
        quantize_model(llama["model"], llama["ids"], strategy(2, 7, 6), 6, tmp_path / "other", tmp_path / "state")


def test_deterministic(llama: dict, tmp_path: Path) -> None:
    """A second run (without a state directory) and a second compile give identical bytes."""
    quantize_model(llama["model"], llama["ids"], strategy(2, 6, 6), 6, tmp_path / "quantized")
    first = llama["tmp"] / "4bit"
    assert file_bytes(tmp_path / "quantized") == file_bytes(first / "quantized")
    compile_model(tmp_path / "quantized", llama["model"], tmp_path / "compiled", 0, QUANT_CONFIG)
    assert file_bytes(tmp_path / "compiled") == file_bytes(first / "compiled")


def test_a_block_whose_hessian_needs_more_damping_is_redone(llama: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass prepares each block's Hessians speculatively and reads once; where a first damping failed, the block
    is made again reading as it goes, and the result is what preparing with retries from the start gives."""
    original = convert.prepare_hessian
    failed = []

    def first_attempt_fails(hessian, layer="layer", speculative=False):
        prepared = original(hessian, layer, speculative)
        if speculative and layer == "model.layers.1.mlp.down_proj":
            failed.append(layer)
            return dataclasses.replace(prepared, inverse_factor=torch.full_like(prepared.inverse_factor, float("nan")),
                                       usable=torch.zeros((), dtype=torch.bool))
        return prepared

    monkeypatch.setattr(convert, "prepare_hessian", first_attempt_fails)
    quantize_model(llama["model"], llama["ids"], strategy(2, 6, 6), 6, tmp_path / "quantized")
    assert failed == ["model.layers.1.mlp.down_proj"]
    assert file_bytes(tmp_path / "quantized") == file_bytes(llama["tmp"] / "4bit" / "quantized")


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_quantized_block_outputs_not_finite_name_the_block(llama: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, block: str) -> None:
    """A quantized pass's check is read with the next block's (or at the layer's end) and still names its block."""
    original = convert.run_block

    def overflowing(name, x, w, *args, out=None, **kwargs):
        if out is x and name == block:  # the quantized pass: an input beyond float16 makes its outputs NaN
            x[0, 0, 0] = float("inf")
        return original(name, x, w, *args, out=out, **kwargs)

    monkeypatch.setattr(convert, "run_block", overflowing)
    module = {"attention": "self_attn", "mlp": "mlp"}[block]
    with pytest.raises(ExlbuildError, match=rf"model\.layers\.0\.{module} \(quantized\): outputs NaN"):
        quantize_model(llama["model"], llama["ids"], strategy(2, 6, 6), 6, tmp_path / "quantized")
    assert not (tmp_path / "quantized").exists()


def test_output_directory(llama: dict, tmp_path: Path) -> None:
    """One shard in module order, config.json with quantization_config (keys in order, indent 4), the model's
    other regular files copied except weights and the index."""
    model = tmp_path / "model"
    shutil.copytree(llama["model"], model)
    extras = ["tokenizer.json", "notes.txt", "model.safetensors.index.json", "pytorch_model.bin", "w.pt", "w.pth"]
    for name in extras:
        (model / name).write_text(name)
    (model / "sub").mkdir()
    (model / "sub" / "file.txt").write_text("not copied")
    result = compile_model(llama["tmp"] / "4bit" / "quantized", model, tmp_path / "out", 0, QUANT_CONFIG)
    out = tmp_path / "out"
    copied = ["config.json", "generation_config.json", "notes.txt", "output.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == copied == list(result["files"])
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert result["files"]["output.safetensors"] == (out / "output.safetensors").stat().st_size

    source = json.loads((model / "config.json").read_text())
    text = (out / "config.json").read_text()
    config = json.loads(text)
    assert list(config) == [*source, "quantization_config"]
    assert config["quantization_config"] == QUANT_CONFIG
    assert text == json.dumps({**source, "quantization_config": QUANT_CONFIG}, indent=4)

    with safe_open(out / "output.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    assert all(dtypes[n] == "F16" for n in names if n.endswith("norm.weight") or n == "model.embed_tokens.weight")
    for key in ("model.layers.1.mlp.down_proj", "lm_head"):
        assert {n for n in names if n.startswith(key + ".")} == {
            f"{key}.{s}" for s in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")}
    assert not any(n.endswith("_proj.weight") or n.endswith(".bias") for n in names)


def test_compile_rejects_invalid_layer(llama: dict, tmp_path: Path) -> None:
    quantized = tmp_path / "quantized"
    shutil.copytree(llama["tmp"] / "4bit" / "quantized", quantized)
    path = quantized / "layers" / "00001.safetensors"
    tensors = load_file(path)
    groups = tensors["model.layers.1.self_attn.v_proj.q_groups"]
    tensors["model.layers.1.self_attn.v_proj.q_groups"] = groups.flip(0).contiguous()
    save_file(tensors, path)
    with pytest.raises(ExlbuildError, match=r"model\.layers\.1\.self_attn\.v_proj: q_groups"):
        compile_model(quantized, llama["model"], tmp_path / "out", 0, QUANT_CONFIG)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_tied_head_and_shards(tmp_path: Path) -> None:
    """A tied head is stored quantized as lm_head.q_*; with a 1 MiB shard size the 1 MiB embedding fills the
    first shard and everything else the second; the shards read back as the single file does."""
    model = tiny_model(tmp_path / "model", vocab_size=8192, num_hidden_layers=1, tie_word_embeddings=True, **SHAPE)
    _, result, compiled = run(tmp_path, model, random_ids(8192, rows=4), 1, 6, 6, 6, shard_size_mb=1)
    names = ["output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors"]
    assert sorted(p.name for p in compiled.glob("*.safetensors")) == names
    shards = [load_file(compiled / n) for n in names]
    assert list(shards[0]) == ["model.embed_tokens.weight"]
    assert sum(t.nbytes for t in shards[0].values()) <= 1024**2
    assert not set(shards[0]) & set(shards[1])
    single = compile_model(tmp_path / "quantized", model, tmp_path / "single", 0, QUANT_CONFIG)
    assert [n for n in single["files"] if n.endswith(".safetensors")] == ["output.safetensors"]
    merged = {**shards[0], **shards[1]}
    whole = load_file(tmp_path / "single" / "output.safetensors")
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)

    assert "lm_head.q_weight" in merged and "lm_head.weight" not in merged
    assert json.loads((compiled / "config.json").read_text())["tie_word_embeddings"] is True
    cfg, ckpt = open_model(compiled)
    embedding = ckpt.get("model.embed_tokens.weight")
    head = head_weight(ckpt, cfg)
    assert not torch.equal(head, embedding)  # the quantized lm_head, not the embedding
    assert (head - embedding).abs().max() <= 3 * embedding.abs().max() / 2**5


def test_qwen2_bias_is_padded(tmp_path: Path) -> None:
    """q/k/v biases are stored as `.bias`, padded like the output (k/v: 16 → 32; head: 250 → 256)."""
    shape = dict(SHAPE, num_key_value_heads=1)
    model = tiny_model(tmp_path / "model", kind="qwen2", vocab_size=250, num_hidden_layers=1, **shape)
    metrics, result, compiled = run(tmp_path, model, random_ids(250, rows=4), 1, 6, 6, 6)
    tensors = load_file(compiled / "output.safetensors")
    source = Checkpoint(model)
    _, ckpt = open_model(compiled)
    for projection, width in (("q_proj", 64), ("k_proj", 16), ("v_proj", 16)):
        key = f"model.layers.0.self_attn.{projection}"
        bias = tensors[f"{key}.bias"]
        assert bias.dtype == torch.float16 and bias.shape == (pad_to_32(width),)
        assert torch.equal(bias[:width], source.get(f"{key}.bias", torch.float16))
        assert not bias[width:].any()
        assert tensors[f"{key}.q_weight"].shape[1] == pad_to_32(width)
        assert torch.equal(ckpt.get(f"{key}.bias"), source.get(f"{key}.bias", torch.float16).float())
        assert ckpt.get(f"{key}.weight").shape == (width, 64)
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    assert tensors["lm_head.q_weight"].shape[1] == 256
    assert ckpt.get("lm_head.weight").shape == (250, 64)
    assert result["bits_per_weight"] == pytest.approx(metrics["bits_per_weight"], rel=1e-12)


def test_plan_shards() -> None:
    modules = [[("a", 60)], [("b", 50), ("c", 10)], [("d", 30)], [("e", 120)]]
    # After b/c the pending 120 bytes overflow: a fits, b does not, c still does (first fit); the last
    # shard takes what is left even over the limit.
    assert plan_shards(modules, 100) == [["a", "c"], ["b", "d"], ["e"]]
    assert plan_shards(modules, math.inf) == [["a", "b", "c", "d", "e"]]
    assert plan_shards(modules, 1000) == [["a", "b", "c", "d", "e"]]
    with pytest.raises(ExlbuildError, match=r"tensor x \(150 bytes\) does not fit in a shard of 100 bytes"):
        plan_shards([[("x", 150)], [("y", 10)]], 100)


def test_strategy_and_reconstruction_errors(llama: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = llama["model"], llama["ids"]
    partial = strategy(2, 6, 6)
    del partial["model.layers.1.mlp"]
    with pytest.raises(ExlbuildError, match=r"no options for model\.layers\.1\.mlp"):
        quantize_model(model, ids, partial, 6, tmp_path / "a")
    with pytest.raises(ExlbuildError, match=r"does not have: model\.layers\.2\.mlp"):
        quantize_model(model, ids, strategy(3, 6, 6), 6, tmp_path / "b")
    with pytest.raises(ExlbuildError, match="head_bits must be one of"):
        quantize_model(model, ids, strategy(2, 6, 6), 7, tmp_path / "c")

    # A decoder that disagrees with the quantizer (one weight off) stops the pass, naming the layer (the check is
    # read at the end of the block).
    def off_by_one(tensors, out_features=None, layer="layer", **kwargs):
        weight = convert_dequantize(tensors, out_features, layer, **kwargs).clone()
        weight[0, 0] += 1
        return weight

    convert_dequantize = convert.dequantize
    monkeypatch.setattr(convert, "dequantize", off_by_one)
    with pytest.raises(ExlbuildError, match=r"model\.layers\.0\.self_attn\.q_proj: the packed tensors decode"):
        quantize_model(model, ids, strategy(2, 6, 6), 6, tmp_path / "d")
