"""Large models simulated with random weights in real layer shapes: time and peak memory of the EXL2 passes.

    python bench/scale.py --name h100 [--shapes llama3-8b llama3-70b] [--layers 1 2] [--phases measure quantize tune]

For each shape and layer count a random model directory is written (real config.json, real tensor shapes and
vocabulary, float16 weights drawn on the GPU), then the measurement (16 × 2048 calibration tokens, the
reference's default), the allocation at 4.0 bpw, the quantization (100 × 2048) and the tuning (the default
100 steps of 2 rows, its layers streamed from host memory as a model of the real depth would be) run through the
same functions as the build rules, each phase in a fresh process so that its peak CPU memory (ru_maxrss) and peak
GPU memory (torch.cuda.max_memory_allocated) are its own. Calibration rows are random token ids.

From one and two layers: per-layer time = T(2) − T(1) and fixed time (embedding, head, files) = T(1) − per
layer, extrapolated to the real layer counts (32 and 80). Peak memory does not grow with the layer count (one
layer's weights at a time), which the two runs check, except for the tuning, which keeps each layer's input of a
step's rows for its backward pass (extrapolated linearly from the two runs), and the measurement's sensitivity probe: it
carries one perturbed copy of its tokens per block measured so far through each later layer, so its memory
grows with the depth and its time with the square of the depth. The `probe` phase measures that part as the
last layer of the real model meets it: all 2L copies carried through one layer, then compared at the head;
the whole probe then costs L/2 such carries (Σ over layers of 2i copies = L² ≈ L/2 × 2L) plus the head
comparison, and the copies add to the measurement's peak memory. Results: bench/results/scale-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, attention heads, KV heads, vocabulary, real layer count
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, layers=32),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, layers=80),
    # SmolLM2-135M's layer shape (the refinement's step time without the model file: bench/refine_memory.py)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, layers=30),
    # a smoke test of this script on a CPU (--shapes tiny --device cpu --rows 4 2)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000, layers=4),
}
PHASES = ("measure", "quantize", "tune")  # run for each layer count; "probe" once per shape, on the 1-layer model
TUNE = {"steps": 100, "lr": 1e-3, "rows_per_step": 2}  # the recipe's defaults (TuneSpec)


def write_model(directory: Path, shape: str, layers: int, device: str) -> None:
    """config.json and one safetensors file of random float16 weights (linears with std 1/√in, so that the
    states stay of order one through the layers)."""
    import torch
    from safetensors.torch import save_file

    from exlbuild.model.checkpoint import layer_prefix, layer_tensor_shapes
    from exlbuild.model.config import LlamaConfig

    s = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden_size"],
              "intermediate_size": s["intermediate_size"], "num_attention_heads": s["num_attention_heads"],
              "num_key_value_heads": s["num_key_value_heads"], "num_hidden_layers": layers,
              "vocab_size": s["vocab_size"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "float16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    cfg = LlamaConfig.from_dir(directory)
    generator = torch.Generator(device).manual_seed(0)

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:  # a norm
            return torch.ones(shape, dtype=torch.float16)
        t = torch.randn(shape, generator=generator, device=device) / shape[1] ** 0.5
        return t.half().cpu()

    tensors = {"model.embed_tokens.weight": random((s["vocab_size"], s["hidden_size"])) * s["hidden_size"] ** 0.5,
               "model.norm.weight": random((s["hidden_size"],)),
               "lm_head.weight": random((s["vocab_size"], s["hidden_size"]))}
    for i in range(layers):
        tensors.update({layer_prefix(i) + n: random(shape) for n, shape in layer_tensor_shapes(cfg).items()})
    save_file(tensors, str(directory / "model.safetensors"))


def run_probe(model: Path, copies: int, device: str) -> dict:
    """The sensitivity probe at the last layer of a model of copies / 2 layers: seconds to carry every copy
    through one layer, seconds to compare them at the head, and the copies' bytes."""
    import torch

    from exlbuild.model.checkpoint import head_weight, layer_weights, norm_weight, open_model
    from exlbuild.model.llama import rope_tables
    from exlbuild.quant.exl2.measure import PROBE_TOKENS, output_divergence
    from exlbuild.quant.stream import STATE_DTYPE, run_block

    cfg, ckpt = open_model(model)
    w = layer_weights(ckpt, cfg, 0, torch.float16, device)
    states = torch.randn(copies, 1, PROBE_TOKENS, cfg.hidden_size, dtype=STATE_DTYPE, device=device)
    rope = rope_tables(cfg, PROBE_TOKENS, device)

    def timed(step) -> float:
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize() if device == "cuda" else None
        return time.perf_counter() - t0

    def carry_all() -> None:
        flat = states.flatten(0, 1)
        for block in ("attention", "mlp"):
            run_block(block, flat, w, cfg, rope, out=flat)

    carry = timed(carry_all)
    norm_w, head_w = norm_weight(ckpt, torch.float32, device), head_weight(ckpt, cfg, torch.float32, device)
    compare = timed(lambda: output_divergence(states[0], states, norm_w, head_w, cfg.rms_norm_eps))
    return {"copies": copies, "tokens": PROBE_TOKENS, "carry_seconds": carry, "compare_seconds": compare,
            "copies_bytes": states.numel() * states.element_size()}


def run_phase(phase: str, model: Path, work: Path, rows: int, length: int, device: str) -> dict:
    """One phase in this process: seconds, peak GPU and CPU memory."""
    import torch

    from exlbuild.model.config import LlamaConfig
    from exlbuild.quant.exl2.convert import allocate_strategy, quantize_model, strategy_from_json
    from exlbuild.quant.exl2.measure import measure_model
    from exlbuild.quant.exl2.measurement_json import read_measurement_dir, write_measurement_dir
    from exlbuild.quant.exl2.tune import tune_model

    cfg = LlamaConfig.from_dir(model)
    ids = torch.randint(0, cfg.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    gpu = device == "cuda"
    if gpu:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if phase == "probe":
        result = run_probe(model, rows, device)
    elif phase == "measure":
        measurement = measure_model(model, ids, state_dir=work / "measure-state", device=device)
        write_measurement_dir(work, measurement)
        result = {}
    elif phase == "quantize":
        allocation = allocate_strategy(read_measurement_dir(work), cfg, 4.0)
        metrics = quantize_model(model, ids, strategy_from_json(allocation["strategy"]), 6, work / "quantized",
                                 state_dir=work / "quantize-state", device=device)
        result = {"bits_per_weight": metrics["bits_per_weight"]}
    else:
        metrics = tune_model(model, work / "quantized", work / "tuned", ids, **TUNE, device=device, stream_layers=True)
        result = {"kl_first_pass": metrics["kl_first_pass"], "kl_last_pass": metrics["kl_last_pass"]}
    if gpu:
        torch.cuda.synchronize()
    return {**result, "phase": phase, "rows": rows, "length": length, "seconds": time.perf_counter() - t0,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else 0,
            "peak_cpu_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="results file suffix, e.g. h100")
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3-70b"], choices=list(SHAPES))
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/exlbuild-scale"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--rows", nargs=2, type=int, default=[16, 100], metavar=("MEASURE", "QUANTIZE"),
                    help="calibration rows of 2048 tokens for the measurement and the quantization")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                    help="a phase needs the ones before it (a measurement of fewer rows serves the quantization)")
    ap.add_argument("--phase", choices=(*PHASES, "probe"), help=argparse.SUPPRESS)  # internal: run one phase
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        # probe: --rows carries the number of copies (2 × the real layer count) in its first place
        rows = args.rows[0 if args.phase in ("measure", "probe") else 1]
        print(json.dumps(run_phase(args.phase, args.model, args.work, rows, 2048, args.device)))
        return

    def phase_run(phase: str, shape: str, layers: int, work: Path, rows: list[int]) -> dict:
        out = subprocess.run([sys.executable, __file__, "--name", args.name, "--phase", phase, "--model",
                              str(work / "model"), "--work", str(work), "--device", args.device,
                              "--rows", *map(str, rows)], check=True, stdout=subprocess.PIPE, text=True).stdout
        run = {"shape": shape, "layers": layers, **json.loads(out.strip().splitlines()[-1])}
        print(json.dumps(run), flush=True)
        return run

    runs = []
    for shape in args.shapes:
        for layers in args.layers:
            work = args.work / f"{shape}-{layers}"
            t0 = time.perf_counter()
            write_model(work / "model", shape, layers, args.device)
            print(f"{shape}, {layers} layer(s): model written in {time.perf_counter() - t0:.1f} s", flush=True)
            runs += [phase_run(phase, shape, layers, work, args.rows) for phase in PHASES if phase in args.phases]
        if 1 in args.layers and "measure" in args.phases:
            copies = 2 * SHAPES[shape]["layers"]
            runs.append(phase_run("probe", shape, 1, args.work / f"{shape}-1", [copies, copies]))
    result = {"device": _device(args.device), "runs": runs, "extrapolated": extrapolate(runs)}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"scale-{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def extrapolate(runs: list[dict]) -> list[dict]:
    """Per shape and phase: per-layer and fixed seconds from the 1- and 2-layer runs, the real model's time;
    the measurement with its sensitivity probe at the real depth (module docstring)."""
    out = []
    for shape, s in SHAPES.items():
        probe = next((r for r in runs if r["shape"] == shape and r["phase"] == "probe"), None)
        for phase in PHASES:
            by_layers = {r["layers"]: r for r in runs if r["shape"] == shape and r["phase"] == phase}
            if 1 not in by_layers or 2 not in by_layers:
                continue
            per_layer = by_layers[2]["seconds"] - by_layers[1]["seconds"]
            fixed = by_layers[1]["seconds"] - per_layer
            peak_gpu = max(r["peak_gpu_bytes"] for r in by_layers.values())
            if phase == "tune":  # each layer's input of a step's rows is kept: linear in the depth
                peak_gpu = by_layers[1]["peak_gpu_bytes"] + (s["layers"] - 1) * (
                    by_layers[2]["peak_gpu_bytes"] - by_layers[1]["peak_gpu_bytes"])
            row = {"shape": shape, "phase": phase, "layers": s["layers"], "per_layer_seconds": per_layer,
                   "fixed_seconds": fixed, "seconds": fixed + s["layers"] * per_layer, "peak_gpu_bytes": peak_gpu,
                   "peak_cpu_bytes": max(r["peak_cpu_bytes"] for r in by_layers.values())}
            if phase == "measure" and probe is not None:
                row["probe_seconds"] = s["layers"] / 2 * probe["carry_seconds"] + probe["compare_seconds"]
                row["seconds"] += row["probe_seconds"]
                # the runs held 2 and 4 copies; the real model's last layer holds them all
                row["peak_gpu_bytes"] += probe["copies_bytes"] * (1 - 4 / probe["copies"])
            out.append(row)
    return out


def _device(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"


def markdown(r: dict) -> str:
    gib = 2**30
    lines = [f"# Scale on {r['device']}: random weights in Llama-3 layer shapes", "",
             "Measurement, quantization at 4.0 bpw (head 6 bits), then the tuning (100 steps of 2 rows, layers "
             "streamed); random calibration token rows.", "",
             "| shape | layers | phase | rows × 2048 | seconds | peak GPU GiB | peak CPU GiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for x in r["runs"]:
        if x["phase"] == "probe":
            continue
        lines.append(f"| {x['shape']} | {x['layers']} | {x['phase']} | {x['rows']} | {x['seconds']:.1f} | "
                     f"{x['peak_gpu_bytes'] / gib:.2f} | {x['peak_cpu_bytes'] / gib:.2f} |")
    lines += ["", "Sensitivity probe at the last layer of the real depth (all copies of its tokens):", "",
              "| shape | copies × tokens | carry through one layer s | compare at the head s | copies GiB |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for x in r["runs"]:
        if x["phase"] == "probe":
            lines.append(f"| {x['shape']} | {x['copies']} × {x['tokens']} | {x['carry_seconds']:.2f} | "
                         f"{x['compare_seconds']:.2f} | {x['copies_bytes'] / gib:.2f} |")
    lines += ["", "Extrapolated to the real layer counts (per layer = T(2) − T(1), fixed = T(1) − per layer; the "
              "measurement adds the probe: layers/2 carries + the head comparison, and its copies' memory; the tuning's "
              "memory grows by one layer's input a layer):", "",
              "| shape | phase | layers | per layer s | fixed s | whole model | peak GPU GiB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["extrapolated"]:
        lines.append(f"| {x['shape']} | {x['phase']} | {x['layers']} | {x['per_layer_seconds']:.1f} | "
                     f"{x['fixed_seconds']:.1f} | {x['seconds'] / 60:.1f} min | {x['peak_gpu_bytes'] / gib:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
