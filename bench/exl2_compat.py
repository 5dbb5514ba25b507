"""exlbuild's EXL2 files against exllamav2 0.3.2's own loader (run on the GPU machine, exllamav2 installed).

    python bench/exl2_compat.py --out OUT [--compiled DIR ...]

1. reference: exllamav2's converter quantizes a tiny random Llama; a few of its quantized layers, the weights
   its loader reconstructs from them and the original weights are saved as OUT/exl2_reference.safetensors
   (output data only; the test fixture tests/fixtures/exl2_reference.safetensors is that file).
2. layers: every distinct option of the attention, MLP and head candidate tables, quantized by exlbuild at
   SmolLM2-135M's shapes (plus one layer with a bias), is loaded into exllamav2's quantized linear layer
   (as its converter does for its own self-check): the layer's reconstruction must equal exlbuild's decoder
   bit for bit, and its matmul of an identity matrix must match within fp16 rounding.
3. models (--compiled): each exlbuild-compiled directory is loaded whole by exllamav2 (config, every shard);
   every linear layer's reconstruction must equal exlbuild's reader of the same directory.
4. measurement: exlbuild measures the tiny model and writes measurement.json; exllamav2's converter must
   accept it with -m and quantize from it.
Results: OUT/exl2-compat.json, and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exlbuild.quant.exl2.options import ATTN_CANDIDATES, HEAD_OPTIONS, MLP_CANDIDATES  # noqa: E402
from exlbuild.quant.exl2.pack import dequantize  # noqa: E402
from exlbuild.quant.exl2.quantize import pack_layer, quantize_options  # noqa: E402
from exlbuild.quant.gptq import prepare_hessian  # noqa: E402

Q_KEYS = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
FIXTURE_LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head")


def tiny_model(directory: Path) -> Path:
    """A random Llama (hidden 256, intermediate 512, 2 layers) with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f).read_text() for f in ("textwrap.py", "string.py", "difflib.py", "argparse.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).half().save_pretrained(directory, safe_serialization=True)
    return directory


def exl2_linear(model, key: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int):
    """exllamav2's quantized linear layer holding `tensors`, loaded as its converter's self-check does."""
    from exllamav2.linear import ExLlamaV2Linear

    layer = ExLlamaV2Linear(model, key, in_features, out_features, "bias" in tensors)
    layer.set_device_idx(0)
    w = {k: v.cuda() for k, v in tensors.items() if k in Q_KEYS or k == "bias"}
    w["q_perm"] = torch.argsort(w["q_invperm"]).to(torch.int)
    layer.load(w, device_context=False)
    return layer


def loader_model(model_dir: Path):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    return ExLlamaV2(ExLlamaV2Config(str(model_dir)), lazy_load=True)


def reference(work: Path, out: Path) -> dict:
    """Part 1: exllamav2's converter on the tiny model; save what the test fixture needs."""
    source = tiny_model(work / "tiny")
    compiled = work / "tiny-exl2"
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(source), "-o", str(work / "job"),
           "-nr", "-cf", str(compiled), "-b", "4.0", "-hb", "6", "-r", "8", "-l", "512", "-mr", "4", "-ml", "512"]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True)
    (out / "exl2-convert.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
    if run.returncode != 0:
        raise SystemExit(f"exllamav2's converter failed:\n{run.stderr[-3000:]}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(compiled.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    original = {}
    for f in sorted(source.glob("*.safetensors")):
        original.update(load_file(str(f)))
    model = loader_model(compiled)
    fixture = {}
    for key in FIXTURE_LAYERS:
        q = {k: tensors[f"{key}.{k}"] for k in Q_KEYS}
        weight = original[f"{key}.weight"]
        layer = exl2_linear(model, key, q, weight.shape[1], weight.shape[0])
        fixture.update({f"{key}.{k}": v.contiguous() for k, v in q.items()})
        fixture[f"{key}.exllamav2_dq"] = layer.get_weight_tensor_dq().cpu().contiguous()  # (in, out padded)
        fixture[f"{key}.original"] = weight.contiguous()
    save_file(fixture, str(out / "exl2_reference.safetensors"))
    return {"seconds": round(time.time() - t0, 1), "layers": list(FIXTURE_LAYERS)}


def layers(loader_dir: Path) -> list[dict]:
    """Part 2: exlbuild-packed layers of every distinct option, loaded into exllamav2's linear layer.
    `loader_dir`: any EXL2 directory, for the model object exllamav2's linear layer needs."""
    torch.manual_seed(0)
    model = loader_model(loader_dir)
    shapes = {  # SmolLM2-135M: (in, out) per projection
        "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576),
    }
    jobs = []
    for table in (ATTN_CANDIDATES, MLP_CANDIDATES):
        reduced = table.reduced()
        for p, options in zip(reduced.projections, reduced.distinct):
            jobs.append((p, shapes[p], list(options), False))
    jobs.append(("lm_head", (576, 49152), list(HEAD_OPTIONS.values()), False))
    jobs.append(("q_proj_bias", (576, 200), [ATTN_CANDIDATES.candidates[6][0]], True))  # padded, with a bias
    results = []
    for name, (k, n), options, bias in jobs:
        weight = torch.randn(n, k, device="cuda") * 0.02
        weight[:, :4] *= 8  # a few outlier input features
        x = torch.randn(4096, k, device="cuda") * torch.rand(k, device="cuda") * 2
        prepared = prepare_hessian(x.T @ x / 8, name)
        b = torch.randn(n, device="cuda") * 0.1 if bias else None
        for result in quantize_options(weight, prepared, options, name):
            packed = {key: t.cpu() for key, t in pack_layer(result, b).items()}
            ours = dequantize(packed, out_features=n, layer=name).float()  # (out, in)
            layer = exl2_linear(model, name, packed, k, n)
            theirs = layer.get_weight_tensor_dq()[:, :n].T.float().cpu()
            ident = torch.eye(k, dtype=torch.half, device="cuda")
            product = layer.forward(ident, force_cuda=True)[:, :n].float().cpu()
            if bias:
                product -= packed["bias"][:n].float()
            results.append({
                "layer": name, "shape": [k, n], "option": str(result.option),
                "reconstruction_equal": bool(torch.equal(ours.half(), theirs.half())),
                "reconstruction_max_diff": float((ours - theirs).abs().max()),
                "matmul_max_diff": float((product - ours.T).abs().max()),
                "max_weight": float(ours.abs().max()),
            })
    return results


def models(compiled_dirs: list[Path]) -> list[dict]:
    """Part 3: whole exlbuild-compiled directories through exllamav2's loader."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.linear import ExLlamaV2Linear

    from exlbuild.model.checkpoint import open_model

    out = []
    for d in compiled_dirs:
        model = ExLlamaV2(ExLlamaV2Config(str(d)))
        model.load()
        ckpt = open_model(d)[1]
        stored = {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        worst, count, equal = 0.0, 0, 0
        for module in model.modules:
            for sub in [module] + list(getattr(module, "submodules", [])):
                if isinstance(sub, ExLlamaV2Linear) and sub.q_handle is not None:
                    ours = ckpt.get(f"{sub.key}.weight").float()  # (out, in), padding cropped
                    theirs = sub.get_weight_tensor_dq().float().cpu()[:, : ours.shape[0]].T
                    # exllamav2 folds down_proj's input permutation into gate/up's output columns at
                    # load time (docs/exl2-format.md 6): undo that to compare with the stored layers.
                    mlp = sub.key.rsplit(".", 1)[0]
                    if sub.key.endswith(("gate_proj", "up_proj", "down_proj")):
                        perm = torch.argsort(stored[f"{mlp}.down_proj.q_invperm"].long())
                        if sub.key.endswith("down_proj"):
                            theirs = theirs[:, torch.argsort(perm)]
                        else:
                            theirs = theirs[torch.argsort(perm)]
                    count += 1
                    equal += bool(torch.equal(ours.half(), theirs.half()))
                    worst = max(worst, float((ours - theirs).abs().max()))
        out.append({"dir": str(d), "linears": count, "reconstruction_equal": equal, "max_diff": worst})
    return out


def measurement(work: Path, out: Path) -> dict:
    """Part 4: exllamav2's converter quantizes from a measurement.json that exlbuild wrote."""
    from exlbuild.quant.exl2.measure import measure_model
    from exlbuild.quant.exl2.measurement_json import write_measurement

    source = work / "tiny"
    torch.manual_seed(1)
    ids = torch.randint(2, 1024, (8, 256))
    path = out / "exlbuild_tiny_measurement.json"
    write_measurement(path, measure_model(source, ids, device="cuda"))
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(source), "-o", str(work / "job-m"),
           "-nr", "-m", str(path), "-cf", str(work / "tiny-exl2-from-ours"), "-b", "4.0", "-r", "8", "-l", "512"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    (out / "exl2-convert-from-ours.log").write_text(run.stdout[-20000:] + run.stderr[-5000:])
    shards = sorted(p.name for p in (work / "tiny-exl2-from-ours").glob("*.safetensors"))
    return {"accepted": run.returncode == 0, "shards": shards}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exl2-compat"))
    ap.add_argument("--compiled", type=Path, nargs="*", default=[])
    ap.add_argument("--models-only", action="store_true", help="only part 3")
    ap.add_argument("--measurement", action="store_true", help="also part 4")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    if not args.models_only:
        report["reference"] = reference(args.work, args.out)
        report["layers"] = layers(args.work / "tiny-exl2")
        bad = [r for r in report["layers"] if not r["reconstruction_equal"] or r["matmul_max_diff"] > 0.01]
        print(f"layers: {len(report['layers'])} option/shape cases, {len(bad)} not matching")
        for r in bad[:20]:
            print("  MISMATCH", r)
        print(f"worst matmul difference {max(r['matmul_max_diff'] for r in report['layers']):.5f}")
    report["models"] = models(args.compiled)
    if args.measurement:
        if not (args.work / "tiny").is_dir():
            tiny_model(args.work / "tiny")
        report["measurement"] = measurement(args.work, args.out)
        print(f"exllamav2 accepts exlbuild's measurement.json: {report['measurement']}")
    name = "exl2-compat-models.json" if args.models_only else "exl2-compat.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    for m in report["models"]:
        print(f"model {m['dir']}: {m['reconstruction_equal']}/{m['linears']} linears equal, max diff {m['max_diff']}")


if __name__ == "__main__":
    main()
