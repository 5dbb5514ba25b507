"""Does the text of the sensitivity probe matter? Per-block sensitivity profiles on several kinds of text, and what
allocating with one text's profile costs on another's: bench/results/probe-text-*.json, bench/NOTES.md §47.

    python bench/probe_text.py MODEL_DIR MEASUREMENT_DIR OUT.json --texts c4.txt wiki.txt NEWS.txt [--tokens 512]

The measurement's probe (docs/exl2.md) reads the first tokens of the measurement calibration's first row, which in
the default mix is an encyclopedia row. Here each block in turn gets Gaussian noise on its linears' weights (5 % of
each weight row's standard deviation), and the perturbed block's output runs on through the rest of the unquantized
model beside the reference, as the probe does with its 4-bit candidate, on `--tokens` tokens of each text and of the
first row of each source of the default mix's measurement set (16 × 2048). A block's sensitivity on a text is the
mean KL divergence at the output over the mean squared relative error of the block's output.

Then the measurement's own sensitivities (MEASUREMENT_DIR, made with the default probe) are rescaled block by block by
each profile relative to the first encyclopedia row's, and the budget is allocated at 2.5 / 3.0 / 4.0 bpw with each;
every allocation is scored with each text's weights: the predicted KL it leaves above that text's own optimum.
Runs on the CPU in ~7 minutes for SmolLM2-135M and 512 tokens of nine texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from exlbuild.calib import build_calibration
from exlbuild.eval import read_text
from exlbuild.model.checkpoint import embedding_weight, head_weight, layers_ahead, norm_weight, open_model
from exlbuild.model.llama import embed, final_logits, rope_tables
from exlbuild.model.tokenizer import load_tokenizer
from exlbuild.quant.exl2.convert import allocate_strategy
from exlbuild.quant.exl2.measurement_json import Sensitivity, read_measurement_dir
from exlbuild.quant.stream import BLOCK_LINEARS, run_block

NOISE = 0.05
BITS = (2.5, 3.0, 4.0)
PROBE_ROW = "mix:encyclopedia"  # what the default probe reads: the measurement set's first row


def noisy(w: dict[str, torch.Tensor], block: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The layer's weights with noise on the block's linears."""
    out = dict(w)
    for name in BLOCK_LINEARS[block]:
        v = w[f"{name}.weight"]
        out[f"{name}.weight"] = v + NOISE * v.std(dim=1, keepdim=True) * torch.randn(v.shape, generator=generator)
    return out


@torch.inference_mode()
def profiles(model_dir: Path, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL at the output (blocks, texts) and mean squared relative error of the block's output (blocks, texts) for
    `rows` (texts, tokens), one perturbed copy per block carried through the rest of the model."""
    cfg, ckpt = open_model(model_dir)
    layers = list(layers_ahead(ckpt, cfg, range(cfg.num_hidden_layers), torch.float32, "cpu"))
    rope = rope_tables(cfg, rows.shape[1])
    generator = torch.Generator().manual_seed(0)

    def run(block: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        y = torch.empty_like(x)
        run_block(block, x, w, cfg, rope, out=y, module=f"{block} (probe)")
        return y

    x = embed(rows, embedding_weight(ckpt, torch.float32))
    copies: list[torch.Tensor] = []
    errors = []
    for i in range(cfg.num_hidden_layers):
        for block in ("attention", "mlp"):
            if copies:
                copies = list(run(block, torch.cat(copies), layers[i]).split(rows.shape[0]))
            y = run(block, x, layers[i])
            perturbed = run(block, x, noisy(layers[i], block, generator))
            errors.append(((perturbed - y).norm(dim=-1) / y.norm(dim=-1)).pow(2).mean(dim=1))
            copies.append(perturbed)
            x = y
    norm_w, head_w = norm_weight(ckpt, torch.float32), head_weight(ckpt, cfg, torch.float32)
    reference = F.log_softmax(final_logits(x, norm_w, head_w, cfg.rms_norm_eps), dim=-1)
    kl = [(reference.exp() * (reference - F.log_softmax(final_logits(c, norm_w, head_w, cfg.rms_norm_eps), dim=-1)))
          .sum(-1).mean(-1) for c in copies]
    return torch.stack(kl), torch.stack(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("measurement", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--texts", type=Path, nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--skip", type=int, default=2000, help="tokens skipped at each text's start")
    args = ap.parse_args()

    tokenizer = load_tokenizer(args.model)
    texts = {p.stem: tokenizer.encode(read_text(p))[args.skip : args.skip + args.tokens] for p in args.texts}
    ids, _, description = build_calibration(tokenizer, "default", 16, 2048)
    first = 0
    for source in description["sources"]:  # the first row of each text source of the mix, in the mix's order
        if source["text"]:
            texts[f"mix:{source['name']}"] = ids[first, : args.tokens].tolist()
        first += source["rows"]
    names = list(texts)
    kl, errors = profiles(args.model, torch.tensor([texts[n] for n in names]))
    sensitivity = kl / errors

    log = sensitivity.log()
    correlation = torch.corrcoef(log.T)
    measurement = read_measurement_dir(args.measurement)
    modules = [k for k, v in measurement.modules.items() if v]
    measured = torch.tensor([measurement.sensitivity[k].weight for k in modules], dtype=torch.float64)
    probe = sensitivity[:, names.index(PROBE_ROW)].double()
    mix = [n for n in names if n.startswith("mix:")]
    profile_of = {n: sensitivity[:, names.index(n)].double() for n in names}
    profile_of["mix: every source"] = (kl[:, [names.index(n) for n in mix]].mean(1)
                                      / errors[:, [names.index(n) for n in mix]].mean(1)).double()
    weights = {n: measured * p / probe for n, p in profile_of.items()}

    cfg = open_model(args.model)[0]
    errs = [[1 - c.accuracy for c in measurement.modules[k]] for k in modules]

    def choice(w: torch.Tensor, bits: float) -> list[int]:
        """The build's allocation at `bits` with the block weights `w` (as sensitivities of weight w)."""
        weighted = dataclasses.replace(measurement, sensitivity={k: Sensitivity(float(w[b]), 1.0)
                                                                  for b, k in enumerate(modules)})
        strategy = allocate_strategy(weighted, cfg, bits)["strategy"]
        return [strategy[k]["candidate"] for k in modules]

    def objective(chosen: list[int], w: torch.Tensor) -> float:
        return sum(float(w[b]) * errs[b][c] ** 2 for b, c in enumerate(chosen))

    excess: dict[str, dict] = {}
    for bits in BITS:
        choices = {n: choice(w, bits) for n, w in weights.items()}
        excess[str(bits)] = {truth: {n: objective(choices[n], weights[truth]) / objective(choices[truth], weights[truth])
                                     - 1 for n in (PROBE_ROW, "mix: every source")}
                             for truth in [p.stem for p in args.texts]}
    report = {"texts": names, "tokens": args.tokens, "noise": NOISE, "blocks": modules,
              "kl": kl.tolist(), "squared_error": errors.tolist(),
              "log_sensitivity_correlation": correlation.tolist(), "allocation_excess": excess}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("correlation of log sensitivity over blocks:")
    print(" " * 20 + "".join(f"{n[:10]:>11}" for n in names))
    for a, n in enumerate(names):
        print(f"{n:>20}" + "".join(f"{correlation[a, b]:11.3f}" for b in range(len(names))))
    print("predicted KL above each text's own optimum, allocating with the probe row's profile / every mix source's:")
    for bits, row in excess.items():
        print(bits, {t: f"{v[PROBE_ROW]:+.2%} / {v['mix: every source']:+.2%}" for t, v in row.items()})


if __name__ == "__main__":
    main()
