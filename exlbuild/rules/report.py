"""Evaluation and the report: perplexity of each variant and of the FP16 model, sizes, bits, times, a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.recipe import LoadedRecipe, resolve_file

EVAL_FILE = "eval.json"
FIT_STEPS = ("refined", "tuned")  # the optional passes between a variant's quantization and its compiled directory
REPORT_JSON, REPORT_MD, REPORT_SVG = "report.json", "report.md", "bpw-perplexity.svg"


class Evaluate(Rule):
    """Perplexity of a model directory (FP16 or quantized) on the recipe's evaluation text."""

    name = "eval"
    version = 3  # 2: the forward's norms, rotary embedding and activation as Triton kernels on CUDA
    # 3: 16-bit attention on CUDA in SDPA's grouped-query mode (exl2-measurement 11)
    # A perplexity in the running machine's float arithmetic: the same model bytes score a little differently on
    # another CPU or GPU.
    reproducible = False

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.eval import evaluate
        from exlbuild.rules.exl2 import compute_device

        p = ctx.params
        result = evaluate(ctx.inputs["model"], ctx.sources["text"], window=p["window"], max_windows=p["max_windows"],
                          text_column=p["text_column"], device=compute_device())
        (ctx.out / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return result


class Report(Rule):
    """One table over the variants: bits, size, calibration and evaluation perplexity, build times."""

    name = "report"
    version = 1
    reproducible = False  # it records the build's times

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        variants = ctx.params["variants"]
        fp16 = _read_json(ctx.inputs["fp16/eval"] / EVAL_FILE)["perplexity"] if "fp16/eval" in ctx.inputs else None
        rows = []
        for name in variants:
            quantized = ctx.manifests[f"{name}/quantized"]
            # the quantization pass and the fits after it, in order: the last made the tensors compiled
            passes = [quantized] + [ctx.manifests[f"{name}/{step}"] for step in FIT_STEPS
                                    if f"{name}/{step}" in ctx.manifests]
            compiled = ctx.manifests[name]
            metrics = quantized["metrics"]
            row = {
                "variant": name,
                "bits": metrics.get("target_bits"),
                "decoder_bpw": metrics.get("bits_per_weight"),
                "head_bpw": metrics.get("head_bits_per_weight"),
                "size_bytes": sum(f["size"] for f in compiled["files"].values()),
                "calibration_perplexity": passes[-1]["metrics"].get("calibration_perplexity"),
                "quantize_seconds": sum(p["seconds"] for p in passes),
            }
            if f"{name}/eval" in ctx.inputs:
                row["perplexity"] = _read_json(ctx.inputs[f"{name}/eval"] / EVAL_FILE)["perplexity"]
                if fp16:
                    row["perplexity_vs_fp16"] = row["perplexity"] / fp16
            rows.append(row)
        report = {"fp16_perplexity": fp16, "eval_text": ctx.params["eval_text"], "variants": rows}
        (ctx.out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (ctx.out / REPORT_MD).write_text(markdown(report))
        if any("perplexity" in r for r in rows):
            (ctx.out / REPORT_SVG).write_text(plot_svg(rows, fp16))
        return {"variants": len(rows)}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def markdown(report: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    lines = []
    if report["eval_text"]:
        fp16 = report["fp16_perplexity"]
        lines.append(f"Evaluation text: {report['eval_text']}; FP16 perplexity {num(fp16, '.3f')}\n")
    lines += ["| variant | target bpw | decoder bpw | head bpw | size (MB) | calibration ppl | eval ppl | vs FP16 | quantize + fit (s) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["variants"]:
        lines.append(f"| {r['variant']} | {num(r['bits'], '.2f')} | {num(r['decoder_bpw'], '.3f')} | "
                     f"{num(r['head_bpw'], '.3f')} | {r['size_bytes'] / 2**20:.1f} | "
                     f"{num(r['calibration_perplexity'], '.3f')} | {num(r.get('perplexity'), '.3f')} | "
                     f"{num(r.get('perplexity_vs_fp16'), '.3f')} | {num(r['quantize_seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_svg(rows: list[dict[str, Any]], fp16: float | None, width: int = 480, height: int = 320) -> str:
    """Perplexity against bits per weight, one point per variant, FP16 as a dashed line."""
    points = sorted((r["decoder_bpw"], r["perplexity"], r["variant"]) for r in rows
                    if "perplexity" in r and r.get("decoder_bpw"))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([fp16] if fp16 else [])
    x0, x1 = min(xs) - 0.25, max(xs) + 0.25
    y0, y1 = min(ys) * 0.95, max(ys) * 1.05
    m = 48  # margin for the axes' labels

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (width - 2 * m)

    def sy(y: float) -> float:
        return height - m - (y - y0) / (y1 - y0) * (height - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{m}" y1="{height - m}" x2="{width - m}" y2="{height - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{height - m}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">bits per weight (decoder)</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             f'perplexity</text>']
    if fp16:
        parts.append(f'<line x1="{m}" y1="{sy(fp16):.1f}" x2="{width - m}" y2="{sy(fp16):.1f}" stroke="gray" '
                     f'stroke-dasharray="4 3"/><text x="{width - m}" y="{sy(fp16) - 4:.1f}" text-anchor="end" '
                     f'fill="gray">FP16 {fp16:.2f}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)
    parts.append(f'<polyline points="{path}" fill="none" stroke="steelblue" stroke-width="2"/>')
    for x, y, name in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="steelblue"/>'
                     f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{name}: {y:.2f}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def eval_node(recipe: LoadedRecipe, name: str, model: Node) -> Node:
    e = recipe.spec.eval
    assert e.text is not None
    return Node(f"{name}/eval", "report", rule=Evaluate(),
                params={"window": e.window, "max_windows": e.max_windows, "text_column": e.text_column},
                deps={"model": model}, sources={"text": resolve_file(recipe, "eval.text", e.text)})


def report_node(recipe: LoadedRecipe, model: Node, variants: dict[str, dict[str, Node]]) -> list[Node]:
    """The report and the evaluations it needs. `variants` maps a variant name to its nodes by kind."""
    deps: dict[str, Node] = {}
    evals = []
    if recipe.spec.eval.text:
        evals.append(eval_node(recipe, "fp16", model))
        deps["fp16/eval"] = evals[-1]
    for name, nodes in variants.items():
        deps[name] = nodes["compiled"]
        deps[f"{name}/quantized"] = nodes["quantized"]
        for step in FIT_STEPS:
            if step in nodes:
                deps[f"{name}/{step}"] = nodes[step]
        if recipe.spec.eval.text:
            evals.append(eval_node(recipe, name, nodes["compiled"]))
            deps[f"{name}/eval"] = evals[-1]
    report = Node("report", "report", rule=Report(), deps=deps,
                  params={"variants": list(variants), "eval_text": recipe.spec.eval.text})
    return evals + [report]
