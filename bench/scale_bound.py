"""How much of a quantized linear's output error could its group scales alone remove, its codes kept? (CPU probe)

EXL2 gives each (group, output column) a scale, fp16((k+1)² · fp16(q_scale_max/256)) with a nibble k of 0..15, and
the refinement (docs/exl2.md, "refined") fits codes and q_scale_max but keeps the nibbles the scale search chose
before GPTQ ran. Would fitting them too be worth it? For each output column n with GPTQ's centred codes c fixed, the
least-squares scales s_g (one per group g) minimise (w − Σ_g s_g c_g)ᵀ H (w − Σ_g s_g c_g), H = XᵀX of the linear's
inputs: a G × G system per column. That optimum, continuous and fitted on the very rows it is scored on, bounds
what any choice of nibbles (or q_scale_max) could do; the same scales moved to their nearest nibble (q_scale_max
kept) show what the format's grid leaves of it.

Inputs are the unquantized model's own states on the first calibration rows (what GPTQ's Hessians see for
layer 0, and close to what they see after it), so the bound is on the linears' own error, not the model's.

    python bench/scale_bound.py MODEL_DIR QUANTIZED_DIR CALIBRATION.safetensors OUT.json [--layers 3,15,27] [--rows 16]

MODEL_DIR: an imported model's data directory (import-gguf artifact); QUANTIZED_DIR: a quantized artifact's data
directory of the same model (its layers/ files); CALIBRATION: a calibration artifact's calibration.safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from exlbuild.kernels.scale_search import NIBBLES
from exlbuild.model.checkpoint import embedding_weight, layer_weights, open_model
from exlbuild.model.llama import decoder_layer, embed, rope_tables
from exlbuild.quant.exl2.convert import layer_file
from exlbuild.quant.exl2.pack import scale_from_nibbles
from exlbuild.quant.exl2.refine import LinearCodes

# The linears probed in each layer, by the captured tensor that is their input (llama.py's capture points).
PROBED = {"self_attn.q_proj": "attn_input", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "mlp_input",
          "mlp.down_proj": "mlp_hidden"}


def relative_error(w: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> float:
    """Σ_n (w_n − v_n)ᵀ H (w_n − v_n) / Σ_n w_nᵀ H w_n for (out, in) weights: the output's relative squared error."""
    e = w - v
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


def scale_bound(w: torch.Tensor, codes: LinearCodes, scale_max: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """The linear's relative error as quantized, with every column's least-squares group scales, and with those
    scales moved to their nearest nibble; w (out, in) and h (in, in) in float64."""
    out = w.shape[0]
    centred = codes.latent(slice(0, out)).double()  # (out, in): codes minus zero points
    group = codes.feature_group  # (in,): each input feature's group
    groups = int(group.max()) + 1
    scale = codes.group_scale[:, :out].double()  # (groups, out)
    # Column n's codes split by group: (out, in, groups), zero outside each group's features.
    split = centred[:, :, None] * F.one_hot(group, groups).double()[None]
    h_split = torch.einsum("ij,njg->nig", h, split)
    normal = torch.einsum("nig,nih->ngh", split, h_split) + 1e-12 * torch.eye(groups, dtype=torch.float64)
    best = torch.linalg.solve(normal, torch.einsum("nig,ni->ng", h_split, w))  # (out, groups)
    # Each group's 16 scales (q_scale_max kept), and the nearest to each least-squares scale.
    nibbles = torch.arange(NIBBLES, dtype=torch.uint8).expand(groups, NIBBLES)
    grid = scale_from_nibbles(nibbles, scale_max).double()  # (groups, 16)
    nearest = grid.gather(1, (best.T[:, :, None] - grid[:, None, :]).abs().argmin(dim=2))  # (groups, out)
    return {
        "as_quantized": relative_error(w, centred * scale[group].T, h),
        "least_squares_scales": relative_error(w, (split * best[:, None, :]).sum(-1), h),
        "nearest_nibbles": relative_error(w, centred * nearest[group].T, h),
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("quantized", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", default="3,15,27")
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    layers = sorted(int(i) for i in args.layers.split(","))
    cfg, ckpt = open_model(args.model)
    ids = load_file(args.calibration)["input_ids"][: args.rows]
    rope = rope_tables(cfg, ids.shape[1])
    x = embed(ids, embedding_weight(ckpt, torch.float32))
    results = []
    for i in range(layers[-1] + 1):
        w = layer_weights(ckpt, cfg, i, torch.float32)
        inputs: dict[str, torch.Tensor] = {}
        y = decoder_layer(x, w, cfg, rope, capture=inputs.__setitem__)
        if i in layers:
            stored = load_file(args.quantized / layer_file(i))
            for name, point in PROBED.items():
                key = f"model.layers.{i}.{name}"
                tensors = {k[len(key) + 1 :]: v for k, v in stored.items() if k.startswith(key + ".")}
                weight = w[f"{name}.weight"].double()
                codes = LinearCodes(tensors, key, weight.shape[0], torch.device("cpu"))
                states = inputs[point].flatten(0, 1).double()
                row = {"layer": i, "linear": name,
                       "code_bits_per_weight": tensors["q_weight"].numel() * 32 / weight.numel(),
                       **scale_bound(weight, codes, tensors["q_scale_max"], states.T @ states)}
                print(f"layer {i:2d} {name:16s} {row['code_bits_per_weight']:.2f} code bits: {row['as_quantized']:.5f} → "
                      f"least-squares scales {row['least_squares_scales']:.5f} "
                      f"({1 - row['least_squares_scales'] / row['as_quantized']:.1%} less), nearest nibbles "
                      f"{row['nearest_nibbles']:.5f}", flush=True)
                results.append(row)
        x = y
    args.out.write_text(json.dumps({"rows": args.rows, "tokens_per_row": ids.shape[1], "linears": results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
