"""Where a variant's perplexity goes, block by block: bench/results/block-ablation-*.json.

    python bench/block_ablation.py WORK/smollm2-sweep.yaml OUT.json VARIANT [VARIANT ...] --texts c4.txt wiki.txt
        [--set KEY=VALUE ...] [--window 1024] [--max-windows 60]

The recipe is one bench/sweep.py built (its overrides as `--set`, as bench/evals.py takes them). For each named
variant (exl2-2.5bpw, …) its compiled directory is read through exlbuild's reader, and every decoder block (each
layer's attention and MLP) and the head (with the final norm) is scored two ways on each text:

- restored: the variant with that one part put back to the FP16 model's: how much of the variant's loss it carries,
  with everything around it quantized;
- alone: the FP16 model with only that part taken from the variant: the damage it does on its own, which is what the
  allocation predicts (the measurement's sensitivity · (1 − accuracy)² of the chosen candidate, written beside it
  from the variant's allocation; that prediction is for GPTQ's tensors, the variant's are refined and tuned).

Both as the change of the mean negative log-likelihood per token (nats), against the variant and against FP16. The
whole variant's and FP16's loss are also split by how hard each token is for FP16 (its FP16 NLL) and by its
position in the window, to show whether a text's larger ratio comes from particular tokens or from all of them.
Matrix products in TF32 (a block's effect is ~1e-3 nats and more; TF32 moves a text's mean by ~1e-5).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from exlbuild.eval import read_text
from exlbuild.model.checkpoint import embedding_weight, head_weight, layers_ahead, norm_weight, open_model
from exlbuild.model.llama import attention_block, embed, final_logits, mlp_block, rope_tables
from exlbuild.model.tokenizer import load_tokenizer
from exlbuild.quant.exl2.measurement_json import read_measurement_dir
from exlbuild.quant.stream import BLOCK_MODULES
from exlbuild.rules.exl2 import compute_device

BLOCKS = ("attention", "mlp")
NLL_EDGES = (0.5, 2.0, 4.0, 6.0)  # buckets of FP16's per-token NLL (nats)
POSITION_EDGES = (16, 128, 512)  # buckets of position in the window


class Parts:
    """A model's parts on the device, in float32: layers (one dict each), embedding, final norm, head."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        self.cfg, ckpt = open_model(directory)
        layers = range(self.cfg.num_hidden_layers)
        self.layers = list(layers_ahead(ckpt, self.cfg, layers, torch.float32, device))
        self.embedding = embedding_weight(ckpt, torch.float32, device)
        self.norm = norm_weight(ckpt, torch.float32, device)
        self.head = head_weight(ckpt, self.cfg, torch.float32, device)


@torch.inference_mode()
def token_nll(rows: torch.Tensor, fp16: Parts, variant: Parts, swapped: set[tuple[int, str] | str],
              base: str, batch: int = 8) -> torch.Tensor:
    """Per-token NLL (windows, window − 1) of the model whose parts are `base`'s ("fp16" or "variant") except those
    in `swapped` ((layer, block) pairs and "head"), which come from the other model."""
    own, other = (fp16, variant) if base == "fp16" else (variant, fp16)
    cfg = fp16.cfg
    rope = rope_tables(cfg, rows.shape[1], rows.device)
    out = torch.empty(rows.shape[0], rows.shape[1] - 1, device=rows.device)
    for start in range(0, rows.shape[0], batch):
        ids = rows[start : start + batch]
        x = embed(ids, fp16.embedding)
        for i in range(cfg.num_hidden_layers):
            for block in BLOCKS:
                w = (other if (i, block) in swapped else own).layers[i]
                x = attention_block(x, w, cfg, rope) if block == "attention" else mlp_block(x, w, cfg)
        final = other if "head" in swapped else own
        for r in range(ids.shape[0]):
            logits = final_logits(x[r, :-1], final.norm, final.head, cfg.rms_norm_eps)
            out[start + r] = F.cross_entropy(logits, ids[r, 1:], reduction="none")
    return out


def buckets(values: torch.Tensor, keys: torch.Tensor, edges: tuple[float, ...]) -> list[dict]:
    """Σ and count of `values` in each bucket of `keys` between `edges`."""
    index = torch.bucketize(keys, torch.tensor(edges, device=keys.device))
    return [{"bucket": i, "tokens": int((index == i).sum()), "sum": float(values[index == i].sum())}
            for i in range(len(edges) + 1)]


def predicted(measurement_dir: Path, allocation_dir: Path) -> dict[str, float]:
    """The allocation's predicted KL of each block (sensitivity weight · (1 − accuracy)² of its candidate)."""
    measurement = read_measurement_dir(measurement_dir)
    strategy = json.loads((allocation_dir / "strategy.json").read_text())["strategy"]
    return {key: measurement.sensitivity[key].weight * (1 - measurement.modules[key][entry["candidate"]].accuracy) ** 2
            for key, entry in strategy.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--texts", type=Path, nargs="+", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=60)
    args = ap.parse_args()

    status = json.loads(subprocess.run([sys.executable, "-m", "exlbuild.cli", "status", str(args.recipe), "--json",
                                        *args.overrides], check=True, capture_output=True, text=True).stdout)
    dirs = {t["name"]: Path(t["out_dir"]) for t in status["targets"]}
    device = torch.device(compute_device() or "cpu")
    torch.set_float32_matmul_precision("high")
    fp16 = Parts(dirs["model"], device)
    tokenizer = load_tokenizer(dirs["model"])
    texts = {}
    for path in args.texts:
        ids = torch.tensor(tokenizer.encode(read_text(path)), dtype=torch.long)
        windows = min(len(ids) // args.window, args.max_windows)
        texts[path.stem] = ids[: windows * args.window].view(windows, args.window).to(device)
    positions = torch.arange(1, args.window, device=device, dtype=torch.float32)

    parts = [(i, b) for i in range(fp16.cfg.num_hidden_layers) for b in BLOCKS] + ["head"]
    report: dict = {"window": args.window, "windows": {t: rows.shape[0] for t, rows in texts.items()}, "variants": {}}
    for name in args.variants:
        variant = Parts(dirs[name], device)
        prediction = predicted(dirs["measurement"], dirs[f"{name}/allocation"])
        result: dict = {"texts": {}}
        for text, rows in texts.items():
            base_fp = token_nll(rows, fp16, variant, set(), "fp16")
            base_q = token_nll(rows, fp16, variant, set(), "variant")
            fp_mean, q_mean = float(base_fp.mean()), float(base_q.mean())
            delta = base_q - base_fp
            entry = {"fp16_nll": fp_mean, "variant_nll": q_mean,
                     "by_fp16_nll": buckets(delta, base_fp, NLL_EDGES),
                     "by_position": buckets(delta, positions.expand_as(delta).contiguous(), POSITION_EDGES), "parts": {}}
            for part in parts:
                label = part if part == "head" else f"model.layers.{part[0]}.{BLOCK_MODULES[part[1]]}"
                restored = float(token_nll(rows, fp16, variant, {part}, "variant").mean())
                alone = float(token_nll(rows, fp16, variant, {part}, "fp16").mean())
                entry["parts"][label] = {"restored_gain": q_mean - restored, "alone_cost": alone - fp_mean,
                                         "predicted_kl": prediction.get(label)}
            result["texts"][text] = entry
            print(name, text, f"FP16 {fp_mean:.4f} variant {q_mean:.4f} nats", flush=True)
        report["variants"][name] = result
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
