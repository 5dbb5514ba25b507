"""The graph of a recipe: which rules make which targets."""

from __future__ import annotations

from exlbuild.errors import ExlbuildError
from exlbuild.graph import Graph, Node
from exlbuild.hashing import HashCache
from exlbuild.recipe import LoadedRecipe
from exlbuild.rules import exl2
from exlbuild.rules.calibration import calibration_dataset, calibration_node
from exlbuild.rules.model import model_nodes
from exlbuild.rules.report import report_node


def recipe_graph(recipe: LoadedRecipe, hashes: HashCache) -> Graph:
    """The nodes of a recipe. `hashes` answers content hashes of files that parameters depend on."""
    model, tokenizer = model_nodes(recipe)
    c = recipe.spec.calibration
    dataset = calibration_dataset(recipe, hashes)
    calibration = calibration_node(dataset, model, tokenizer, "calibration", c.rows, c.length)
    calibration_m = calibration_node(dataset, model, tokenizer, "calibration-measurement", c.measurement_rows,
                                     c.measurement_length)
    nodes: list[Node] = [model, calibration, calibration_m]
    variants = recipe.variants()
    if not variants:
        return Graph(nodes)
    unsupported = sorted({v.format for v in variants.values()} - {"exl2"})
    if unsupported:
        raise ExlbuildError(f"{recipe.path}: format {', '.join(unsupported)} cannot be built yet; this version of "
                            "exlbuild builds exl2")
    # One measurement serves every bitrate.
    measurement = exl2.measurement_node(recipe, model, calibration_m)
    by_variant: dict[str, dict[str, Node]] = {}
    for name, variant in variants.items():
        made = exl2.variant_nodes(recipe, name, variant, model, calibration, measurement)
        by_variant[name] = {n.kind: n for n in made}
        nodes += made
    nodes += report_node(recipe, model, by_variant)
    return Graph(nodes)
