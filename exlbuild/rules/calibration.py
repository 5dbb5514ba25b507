"""Calibration sets: token rows (rows x length) from the default mix, a Parquet file or the model's own samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.hashing import HashCache
from exlbuild.recipe import LoadedRecipe

CALIBRATION_FILE = "calibration.safetensors"
INPUT_IDS = "input_ids"  # (rows, length) token ids
TEXT_ROWS = "text_rows"  # (rows,) bool: the rows of running text, the ones the fits after GPTQ distil on
# Sampling parameters (docs/calibration.md). "sampler" is the sampling code's revision, bumped where a change draws
# other rows (2: CUDA graph steps, whose attention reads the whole cache, masked): a rule version would also
# rebuild every default-mix calibration, and all that follows it, for bytes that did not change.
GENERATED = {"dataset": "generated", "sampler": 2, "seed": 0, "temperature": 1.0}


class Calibration(Rule):
    name = "calibration"
    version = 3  # 2: which rows are running text (TEXT_ROWS), beside the ids; 3: generated rows sampled through
    # the Triton norms, rotary embedding and activation on CUDA (other roundings; the default mix is unchanged)

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        p = ctx.params
        if p["dataset"] == GENERATED["dataset"]:
            from exlbuild.model.generate import sample_rows
            from exlbuild.rules.exl2 import compute_device

            ids = sample_rows(ctx.inputs["model"], p["rows"], p["length"], p["seed"], p["temperature"],
                              device=compute_device())
            text, description = torch.ones(len(ids), dtype=torch.bool), {**GENERATED, "rows": p["rows"]}
        else:
            from exlbuild.calib import build_calibration
            from exlbuild.model.tokenizer import load_tokenizer

            dataset = str(ctx.sources["parquet"]) if "parquet" in ctx.sources else "default"
            ids, text, description = build_calibration(load_tokenizer(ctx.inputs["tokenizer"]), dataset, p["rows"],
                                                       p["length"], text_column=p.get("text_column", "text"))
        save_file({INPUT_IDS: ids.contiguous(), TEXT_ROWS: text}, str(ctx.out / CALIBRATION_FILE))
        return description


def calibration_dataset(recipe: LoadedRecipe, hashes: HashCache) -> tuple[dict[str, Any], dict[str, Path]]:
    """What a calibration node's parameters and sources say about the dataset: the default mix's fingerprint, the
    sampling's parameters or the Parquet file. Computed once for both calibration sets (the fingerprint visits the
    standard library)."""
    spec = recipe.spec.calibration
    if spec.dataset == GENERATED["dataset"]:
        return dict(GENERATED), {}
    if spec.dataset == "default":
        from exlbuild.calib.default_mix import fingerprint

        return {"dataset": {"default": fingerprint(hashes.file_hash)}}, {}
    return {"dataset": "parquet", "text_column": spec.text_column}, {"parquet": recipe.resolve(spec.dataset)}


def calibration_node(dataset: tuple[dict[str, Any], dict[str, Path]], model: Node, tokenizer: Node, name: str,
                     rows: int, length: int) -> Node:
    """One calibration set of `rows` × `length` tokens from `dataset` (calibration_dataset's answer): sampled from
    `model`, or text cut by `tokenizer`."""
    params, sources = dataset
    deps = {"model": model} if params["dataset"] == GENERATED["dataset"] else {"tokenizer": tokenizer}
    return Node(name, "calibration", rule=Calibration(), params={"rows": rows, "length": length, **params},
                deps=deps, sources=dict(sources), info={"rows": rows, "length": length})
