"""Calibration sets: token rows (rows x length) from the default mix, a Parquet file or the model's own samples, or
the default mix with a share of the model's own samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.hashing import HashCache
from exlbuild.recipe import LoadedRecipe

CALIBRATION_FILE = "calibration.safetensors"
INPUT_IDS = "input_ids"  # (rows, length) token ids
TEXT_ROWS = "text_rows"  # (rows,) bool: the rows of running text, the ones the fits after GPTQ distil on
SAMPLING = {"seed": 0, "temperature": 1.0}  # how the model's own rows are sampled (docs/calibration.md)
GENERATED = {"dataset": "generated", **SAMPLING}


class Calibration(Rule):
    name = "calibration"
    version = 3  # 2: which rows are running text (TEXT_ROWS), beside the ids; 3: generated rows sampled through
    # the Triton norms, rotary embedding and activation on CUDA (other roundings; the default mix is unchanged)

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        p = ctx.params
        if p["dataset"] == GENERATED["dataset"]:
            ids = _sampled_rows(ctx, p["rows"], p)
            text, description = torch.ones(len(ids), dtype=torch.bool), {**GENERATED, "rows": p["rows"]}
        else:
            from exlbuild.calib import build_calibration
            from exlbuild.model.tokenizer import load_tokenizer

            sampling = p.get("generated")
            sampled = generated_rows(p["rows"], sampling["share"]) if sampling else 0
            dataset = str(ctx.sources["parquet"]) if "parquet" in ctx.sources else "default"
            ids, text, description = build_calibration(load_tokenizer(ctx.inputs["tokenizer"]), dataset,
                                                       p["rows"] - sampled, p["length"],
                                                       text_column=p.get("text_column", "text"))
            if sampled:
                # The model's own samples after the mix's rows, counted as text (docs/calibration.md)
                ids = torch.cat([ids, _sampled_rows(ctx, sampled, sampling)])
                text = torch.cat([text, torch.ones(sampled, dtype=torch.bool)])
                description = {**description, "generated": {**sampling, "rows": sampled}}
        save_file({INPUT_IDS: ids.contiguous(), TEXT_ROWS: text}, str(ctx.out / CALIBRATION_FILE))
        return description


def _sampled_rows(ctx: BuildContext, rows: int, sampling: dict[str, Any]) -> Any:
    from exlbuild.model.generate import sample_rows
    from exlbuild.rules.exl2 import compute_device

    return sample_rows(ctx.inputs["model"], rows, ctx.params["length"], sampling["seed"], sampling["temperature"],
                       device=compute_device())


def generated_rows(rows: int, share: float) -> int:
    """How many of `rows` the model samples for `calibration.generated_share`: the nearest whole number, halves up,
    leaving at least one row of the mix."""
    return min(int(rows * share + 0.5), rows - 1)


def calibration_dataset(recipe: LoadedRecipe, hashes: HashCache) -> tuple[dict[str, Any], dict[str, Path]]:
    """What a calibration node's parameters and sources say about the dataset: the default mix's fingerprint (with
    the sampling's parameters where a share of the rows is sampled), the sampling's parameters or the Parquet file.
    Computed once for both calibration sets (the fingerprint visits the standard library)."""
    spec = recipe.spec.calibration
    if spec.dataset == GENERATED["dataset"]:
        return dict(GENERATED), {}
    if spec.dataset == "default":
        from exlbuild.calib.default_mix import fingerprint

        params: dict[str, Any] = {"dataset": {"default": fingerprint(hashes.file_hash)}}
        if spec.generated_share > 0:
            params["generated"] = {"share": spec.generated_share, **SAMPLING}
        return params, {}
    return {"dataset": "parquet", "text_column": spec.text_column}, {"parquet": recipe.resolve(spec.dataset)}


def calibration_node(dataset: tuple[dict[str, Any], dict[str, Path]], model: Node, tokenizer: Node, name: str,
                     rows: int, length: int) -> Node:
    """One calibration set of `rows` × `length` tokens from `dataset` (calibration_dataset's answer): sampled from
    `model`, or text cut by `tokenizer` (with some rows sampled from `model` where the recipe asks)."""
    params, sources = dataset
    if params["dataset"] == GENERATED["dataset"]:
        deps = {"model": model}
    else:
        deps = {"tokenizer": tokenizer, **({"model": model} if "generated" in params else {})}
    return Node(name, "calibration", rule=Calibration(), params={"rows": rows, "length": length, **params},
                deps=deps, sources=dict(sources), info={"rows": rows, "length": length})
