"""The fits' steps with the fused kernels (exlbuild.kernels.decoder_ops and adam) against the same work as
PyTorch expressions (their references, which CUDA ran before the kernels existed), on one machine: the
refinement (200 steps a layer) and the tuning (100 steps) of 4 random SmolLM2-shaped layers (bench/scale.py), 100 x
2048 rows, and whether each variant writes the same bytes. Variants replace functions of exlbuild.model.llama and
exlbuild.quant.exl2.refine for the run (monkeypatched; nothing here is used by builds):

- reference: RMSNorm, the rotary embedding, the gated activation, the refinement's loss and Adam's update as
  PyTorch expressions;
- fused: the code as it is (a Triton kernel each way for each of them, one for Adam);
- flash: the fits' attention through PyTorch's flash attention (deterministic mode, KV heads read in place), as
  before kernels/attention.py (another summation order in the backward: other bytes).

    python bench/fit_step_variants.py /tmp/fit-step-variants.json [VARIANT ...]   (all three by default)
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from fit_profile import random_fits, timed_fit
from sdpa_probe import flash_attention

import exlbuild.model.llama as llama
import exlbuild.quant.exl2.refine as refine
import exlbuild.quant.exl2.tune as tune
from exlbuild.kernels import adam, decoder_ops

LAYERS = 4

PATCHED = [(llama, "rms_norm"), (llama, "rotary"), (llama, "gated_activation"), (llama, "causal_attention"),
           (refine, "squared_relative_error"), (tune, "adam_update")]
BASE = {(module, name): getattr(module, name) for module, name in PATCHED}
REFERENCES = {(llama, "rms_norm"): decoder_ops.rms_norm_reference, (llama, "rotary"): decoder_ops.rotary_reference,
              (llama, "gated_activation"): decoder_ops.gated_activation_reference,
              (refine, "squared_relative_error"): decoder_ops.squared_relative_error_reference,
              (tune, "adam_update"): adam.adam_update_reference}


VARIANTS = {"reference": REFERENCES, "fused": {}, "flash": {(llama, "causal_attention"): flash_attention}}


def digest(d):
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    work = Path("/tmp/exlbuild-fit-step-variants")
    fits = random_fits(work, "smollm2", LAYERS, 100, 2048, "cuda")
    results = {"device": torch.cuda.get_device_name()}
    names = sys.argv[2:] or list(VARIANTS)
    for name in names:
        patch = VARIANTS[name]
        for (module, attr), f in {**BASE, **patch}.items():
            setattr(module, attr, f)
        results[name] = {}
        for fit, run in fits.items():
            steps = 200 if fit == "refine" else 100
            try:
                results[name][fit] = timed_fit(fit, run, steps, LAYERS, work / name, torch.cuda.synchronize)
                results[name][fit]["digest"] = digest(work / name / f"{fit}-{steps}")
            except Exception as e:  # a form PyTorch refuses here (under deterministic kernels, say) is a result too
                results[name][fit] = {"error": repr(e)[:400]}
            print(name, fit, json.dumps(results[name][fit]), flush=True)
    for (module, attr), f in BASE.items():
        setattr(module, attr, f)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/fit-step-variants.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
