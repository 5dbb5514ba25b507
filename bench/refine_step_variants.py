"""An experiment for the refinement's step (bench/NOTES.md §22): its time with cheaper PyTorch forms of the
layer's elementwise work, on 4 random SmolLM2-shaped layers (bench/scale.py), 100 x 2048 rows, 200 steps, and
whether each form writes the same bytes as exlbuild's own. The forms replace exlbuild.model.llama's functions for
the run (monkeypatched; nothing here is used by builds):

- rope_roll: the rotation as x·cos + roll(x, half)·(−sin, sin), one kernel less than concatenating (−x2, x1); the
  same values and gradients to the bit on the CPU (checked in bfloat16 and float32);
- rms_fused: torch's F.rms_norm, the weight applied before the cast to bfloat16 (other rounding);
- gqa: scaled_dot_product_attention with enable_gqa=True instead of copying the key/value heads for each query
  head (another summation order in the backward).

    python bench/refine_step_variants.py /tmp/refine-step-variants.json
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scale import write_model
from tune_depth import fixed_strategy
import exlbuild.model.llama as llama
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.refine import refine_model

BASE = {"rms_norm": llama.rms_norm, "apply_rope": llama.apply_rope, "attention": llama.attention}


def rope_roll(x, rope):
    cos, sin = rope.cos[: x.shape[1], None].to(x.dtype), rope.sin[: x.shape[1], None].to(x.dtype)
    half = x.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return x * cos + x.roll(half, dims=-1) * signed


def rms_fused(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def attention_gqa(q, k, v, cfg, rope):
    *lead, t, _ = q.shape
    q, k = llama.apply_rope(llama._split_heads(q, cfg), rope), llama.apply_rope(llama._split_heads(k, cfg), rope)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), llama._split_heads(v, cfg).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return a.transpose(1, 2).reshape(*lead, t, cfg.num_attention_heads * cfg.head_dim)


VARIANTS = {"base": {}, "rope_roll": {"apply_rope": rope_roll}, "rms_fused": {"rms_norm": rms_fused},
            "gqa": {"attention": attention_gqa},
            "all": {"apply_rope": rope_roll, "rms_norm": rms_fused, "attention": attention_gqa}}


def digest(d):
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    work = Path("/tmp/exlbuild-refine-step-variants")
    write_model(work / "model", "smollm2", 4, "cuda")
    ids = torch.randint(0, 49152, (100, 2048), generator=torch.Generator().manual_seed(0))
    quantize_model(work / "model", ids, fixed_strategy(4), 6, work / "quantized", device="cuda")
    results = {}
    for name, patch in VARIANTS.items():
        for k, f in {**BASE, **patch}.items():
            setattr(llama, k, f)
        try:
            refine_model(work / "model", work / "quantized", work / f"{name}-warm", ids, 200, 0.01, 4, device="cuda")
            secs = {}
            for n in (0, 200):
                torch.cuda.synchronize()
                t = time.perf_counter()
                m = refine_model(work / "model", work / "quantized", work / f"{name}-{n}", ids, n, 0.01, 4,
                                 device="cuda")
                torch.cuda.synchronize()
                secs[n] = time.perf_counter() - t
            results[name] = {"step_ms": (secs[200] - secs[0]) / 800 * 1e3, "fixed_s": secs[0],
                             "digest": digest(work / f"{name}-200"),
                             "loss_after": [layer["loss_after"] for layer in m["layers"]], "kl": m["model_check"]}
        except Exception as e:  # a form PyTorch refuses here (under deterministic kernels, say) is a result too
            results[name] = {"error": repr(e)[:400]}
        print(name, json.dumps(results[name]), flush=True)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/refine-step-variants.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
