"""A rehearsal of a variant's fit (refinement or tuning, after a quantization pass) on the model cut to its first
decoder layer and a few random calibration rows, in a background process that starts as soon as the model is
there, while the build goes on with the calibration and the measurement.

Why: a process's first launch of each Triton kernel compiles it, 0.1–0.5 s each: on a fresh H100 the first variant
of the default SmolLM2 sweep spent 6.7 s of its 32.1 s compiling 24 kernels, and ~2.3 s more on other first uses
that a second process on the machine no longer pays (most likely the kernels' launchers, which Triton also builds
and caches on disk, and the CUDA libraries read from disk; bench/results/compile-log-cold-h100.json, bench/NOTES.md
§26). The rehearsal launches the same kernels on tensors of the same widths (the model's layers and vocabulary,
the calibration's row length), so Triton's cache on disk holds them when the build reaches them, and the libraries
are in memory. It writes nothing that the build reads but that cache, where a kernel compiles to the same file
whichever process compiles it; the build never waits for it and ends it when done.

Only on CUDA (the CPU runs the references: nothing to compile), only for models of at most MAX_MODEL_BYTES in
float16 (a larger model's build runs for long enough that compiling is noise, and a copy of its first layer and
vocabulary would be gigabytes), and only where the GPU has FREE_MEMORY_FACTOR times the model's size free: the
rehearsal's own peak is a few times the model's size (one layer, the embedding and the head twice, the tuning's
logits), and the build beside it must keep its room.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import (
    embedding_weight,
    head_weight,
    layer_prefix,
    layer_weights,
    model_bytes,
    norm_weight,
    open_model,
)
from exlbuild.model.config import LlamaConfig
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES
from exlbuild.quant.exl2.refine import held_out_rows, refine_model
from exlbuild.quant.exl2.tune import EAGER_STEPS, tune_model

MAX_MODEL_BYTES = 4 << 30
FREE_MEMORY_FACTOR = 8
STEPS = EAGER_STEPS + 2  # past the eager steps: the step is also captured as a CUDA graph and replayed
FITS = ("refined", "tuned")


def first_layer_model(model_dir: Path, out: Path) -> Path:
    """The model in `model_dir` cut to its first decoder layer, in float16, written to `out`."""
    cfg, ckpt = open_model(model_dir)
    tensors = {layer_prefix(0) + k: v for k, v in layer_weights(ckpt, cfg, 0, torch.float16).items()}
    tensors["model.embed_tokens.weight"] = embedding_weight(ckpt, torch.float16)
    tensors["model.norm.weight"] = norm_weight(ckpt, torch.float16)
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = head_weight(ckpt, cfg, torch.float16)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"))
    return out


def rehearse(fit: str, model_dir: Path, work: Path, length: int, params: dict[str, Any], head_bits: int,
             device: str) -> None:
    """Quantize the first layer of `model_dir` and run `fit` ("refined" or "tuned", with its node's `params`) on it
    for a few steps, on rows of `length` random tokens, in `work`."""
    if fit not in FITS:
        raise ValueError(f"no rehearsal of {fit!r}: one of {', '.join(FITS)}")
    model = first_layer_model(model_dir, work / "model")
    cfg = LlamaConfig.from_dir(model)
    rows = params["rows_per_step"] + 1  # the refinement holds one row in ten out: keep a full step's rows
    while rows - len(held_out_rows(rows)) < params["rows_per_step"]:
        rows += 1
    ids = torch.randint(0, cfg.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    middle = {table: table.candidates[len(table.candidates) // 2] for table in (ATTN_CANDIDATES, MLP_CANDIDATES)}
    strategy = {layer_prefix(0) + block: dict(zip(table.projections, middle[table]))
                for block, table in (("self_attn", ATTN_CANDIDATES), ("mlp", MLP_CANDIDATES))}
    rope = {"rope_scale": params["rope"]["scale"], "rope_alpha": params["rope"]["alpha"]}
    quantize_model(model, ids, strategy, head_bits, work / "quantized", device=device, **rope)
    options = {"weights_per_fit": params["weights_per_fit"]} if fit == "refined" else {}
    run = refine_model if fit == "refined" else tune_model
    run(model, work / "quantized", work / fit, ids, STEPS, params["lr"], params["rows_per_step"], device=device,
        **rope, **options)


def start_rehearsal(fit: str, model_dir: Path, length: int, params: dict[str, Any], head_bits: int,
                    device: str) -> Callable[[], str | None] | None:
    """Start `rehearse` in a background process, where it pays (module docstring); returns what ends it, removes its
    files and says why it failed if it did (the last line of its error), or None where it is not worth a process.
    EXLBUILD_REHEARSE=0 turns rehearsals off."""
    if device != "cuda" or os.environ.get("EXLBUILD_REHEARSE", "1") == "0":
        return None
    try:
        cfg = LlamaConfig.from_dir(model_dir)
    except ExlbuildError:
        return None  # the rule itself reports what is wrong with the config
    size = model_bytes(cfg, torch.float16)
    if size > MAX_MODEL_BYTES or torch.cuda.mem_get_info()[0] < FREE_MEMORY_FACTOR * size:
        return None
    work = Path(tempfile.mkdtemp(prefix="exlbuild-rehearsal-"))
    args = {"fit": fit, "model_dir": str(model_dir), "work": str(work), "length": length, "params": params,
            "head_bits": head_bits, "device": device, "build": os.getpid()}
    errors = work / "stderr.txt"
    with open(errors, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(args)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)

    def stop() -> str | None:
        ended_here = process.poll() is None
        if ended_here:
            process.terminate()
        process.wait()
        failure = None
        if not ended_here and process.returncode != 0:
            last = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
            failure = f"the {fit} rehearsal failed (exit {process.returncode}): {last[0]}"
        shutil.rmtree(work, ignore_errors=True)
        return failure

    return stop


if __name__ == "__main__":
    if hasattr(os, "nice"):
        os.nice(10)  # the build's own host work comes first
    spec = json.loads(sys.argv[1])
    try:
        rehearse(spec["fit"], Path(spec["model_dir"]), Path(spec["work"]), spec["length"], spec["params"],
                 spec["head_bits"], spec["device"])
    finally:
        if os.getppid() != spec["build"]:  # the build was killed outright (SIGKILL), and what removes the files with it
            shutil.rmtree(spec["work"], ignore_errors=True)
