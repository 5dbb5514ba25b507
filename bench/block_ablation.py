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
  from the variant's allocation; that prediction is for GPTQ's tensors, the variant's are refined and tuned). A refined
  layer also carries corrections for the layers before it, which alone in the FP16 model are errors: for refined
  variants the costs alone add up to more than the whole (bench/NOTES.md §47).

Both as the change of the mean negative log-likelihood per token (nats), against the variant and against FP16. The
whole variant's and FP16's loss are also split by how hard each token is for FP16 (its FP16 NLL) and by its
position in the window, to show whether a text's larger ratio comes from particular tokens or from all of them.
On CUDA the matrix products run in TF32, as the build's own passes do; every number compared comes from the same
arithmetic.
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
from exlbuild.model.llama import embed, final_logits, rope_tables
from exlbuild.model.tokenizer import load_tokenizer
from exlbuild.quant.exl2.measurement_json import read_measurement_dir
from exlbuild.quant.stream import BLOCK_MODULES, run_block
from exlbuild.rules.exl2 import STRATEGY_FILE, compute_device

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


class Windows:
    """One text's windows through both models, each model's states before every block kept, so that a model with
    one part taken from the other runs only from that part on."""

    def __init__(self, rows: torch.Tensor, fp16: Parts, variant: Parts) -> None:
        self.rows, self.models = rows, {"fp16": fp16, "variant": variant}
        self.cfg = fp16.cfg
        self.blocks = [(i, b) for i in range(self.cfg.num_hidden_layers) for b in BLOCKS]
        self.rope = rope_tables(self.cfg, rows.shape[1], rows.device)
        x = embed(rows, fp16.embedding)  # (EXL2 keeps the embedding as it is: both models' is FP16's)
        self.states = {name: self._run(x, 0, model, None, keep=True) for name, model in self.models.items()}

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, first: int, model: Parts, swapped: tuple[int, Parts] | None,
             keep: bool = False) -> list[torch.Tensor]:
        """x (the states before block `first`) through the blocks from `first` on, with `model`'s weights except
        block swapped[0]'s, which come from swapped[1]; the states after the last block (after every block: keep)."""
        kept = [x.clone()] if keep else []
        for j in range(first, len(self.blocks)):
            i, block = self.blocks[j]
            w = (swapped[1] if swapped and swapped[0] == j else model).layers[i]
            y = torch.empty_like(x)
            run_block(block, x, w, self.cfg, self.rope, out=y, module=f"layer {i} {block}")
            x = y
            if keep:
                kept.append(x)
        return kept if keep else [x]

    @torch.inference_mode()
    def nll(self, base: str, swapped: tuple[int, str] | str | None = None) -> torch.Tensor:
        """Per-token NLL (windows, window − 1) of model `base` ("fp16" or "variant") with the part `swapped` (a
        (layer, block) pair or "head") taken from the other model."""
        own = self.models[base]
        other = self.models["variant" if base == "fp16" else "fp16"]
        states = self.states[base]
        if swapped is None or swapped == "head":
            x = states[-1]
        else:
            j = self.blocks.index(swapped)
            x = self._run(states[j], j, own, (j, other))[0]
        final = other if swapped == "head" else own
        out = torch.empty(self.rows.shape[0], self.rows.shape[1] - 1, device=x.device)
        for r in range(self.rows.shape[0]):
            logits = final_logits(x[r, :-1], final.norm, final.head, self.cfg.rms_norm_eps)
            out[r] = F.cross_entropy(logits, self.rows[r, 1:], reduction="none")
        return out


def buckets(values: torch.Tensor, keys: torch.Tensor, edges: tuple[float, ...]) -> list[dict]:
    """Σ and count of `values` in each bucket of `keys` between `edges`."""
    index = torch.bucketize(keys, torch.tensor(edges, device=keys.device))
    return [{"bucket": i, "tokens": int((index == i).sum()), "sum": float(values[index == i].sum())}
            for i in range(len(edges) + 1)]


def predicted(measurement_dir: Path, allocation_dir: Path) -> dict[str, float]:
    """The allocation's predicted KL of each block (sensitivity weight · (1 − accuracy)² of its candidate)."""
    measurement = read_measurement_dir(measurement_dir)
    strategy = json.loads((allocation_dir / STRATEGY_FILE).read_text())["strategy"]
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
            windows = Windows(rows, fp16, variant)
            base_fp, base_q = windows.nll("fp16"), windows.nll("variant")
            fp_mean, q_mean = float(base_fp.mean()), float(base_q.mean())
            delta = base_q - base_fp
            entry = {"fp16_nll": fp_mean, "variant_nll": q_mean,
                     "by_fp16_nll": buckets(delta, base_fp, NLL_EDGES),
                     "by_position": buckets(delta, positions.expand_as(delta).contiguous(), POSITION_EDGES), "parts": {}}
            for part in parts:
                label = part if part == "head" else f"model.layers.{part[0]}.{BLOCK_MODULES[part[1]]}"
                restored = float(windows.nll("variant", part).mean())
                alone = float(windows.nll("fp16", part).mean())
                entry["parts"][label] = {"restored_gain": q_mean - restored, "alone_cost": alone - fp_mean,
                                         "predicted_kl": prediction.get(label)}
            result["texts"][text] = entry
            del windows  # its states, before the next text's
            print(name, text, f"FP16 {fp_mean:.4f} variant {q_mean:.4f} nats", flush=True)
        report["variants"][name] = result
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
