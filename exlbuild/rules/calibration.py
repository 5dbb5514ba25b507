"""Calibration sets: token rows (rows x length) from the default mix or a Parquet file."""

from __future__ import annotations

from typing import Any

from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.hashing import HashCache
from exlbuild.recipe import LoadedRecipe

CALIBRATION_FILE = "calibration.safetensors"


class Calibration(Rule):
    name = "calibration"
    version = 1

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from safetensors.torch import save_file

        from exlbuild.calib import build_calibration
        from exlbuild.model.tokenizer import load_tokenizer

        p = ctx.params
        dataset = str(ctx.sources["parquet"]) if "parquet" in ctx.sources else "default"
        ids, description = build_calibration(load_tokenizer(ctx.inputs["tokenizer"]), dataset, p["rows"], p["length"],
                                             text_column=p.get("text_column", "text"))
        save_file({"input_ids": ids.contiguous()}, str(ctx.out / CALIBRATION_FILE))
        return description


def calibration_node(recipe: LoadedRecipe, hashes: HashCache, tokenizer: Node, name: str, rows: int,
                     length: int) -> Node:
    spec = recipe.spec.calibration
    params: dict[str, Any] = {"rows": rows, "length": length}
    sources = {}
    if spec.dataset == "default":
        from exlbuild.calib.default_mix import fingerprint

        params["dataset"] = {"default": fingerprint(hashes.file_hash)}
    else:
        params["dataset"] = "parquet"
        params["text_column"] = spec.text_column
        sources["parquet"] = recipe.resolve(spec.dataset)
    return Node(name, "calibration", rule=Calibration(), params=params, deps={"tokenizer": tokenizer},
                sources=sources, info={"rows": rows, "length": length})
