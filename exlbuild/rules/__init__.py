"""The graph of a recipe: which rules make which targets."""

from __future__ import annotations

from exlbuild.errors import ExlbuildError
from exlbuild.graph import Graph, Node
from exlbuild.hashing import HashCache
from exlbuild.recipe import LoadedRecipe
from exlbuild.rules.calibration import calibration_node
from exlbuild.rules.model import model_nodes


def recipe_graph(recipe: LoadedRecipe, hashes: HashCache) -> Graph:
    """The nodes of a recipe. `hashes` answers content hashes of files that parameters depend on."""
    model, tokenizer = model_nodes(recipe)
    c = recipe.spec.calibration
    nodes: list[Node] = [
        model,
        calibration_node(recipe, hashes, tokenizer, "calibration", c.rows, c.length),
        calibration_node(recipe, hashes, tokenizer, "calibration-measurement", c.measurement_rows,
                         c.measurement_length),
    ]
    variants = recipe.variants()
    if variants:
        formats = sorted({v.format for v in variants.values()})
        raise ExlbuildError(f"{recipe.path}: variants of format {', '.join(formats)} cannot be built yet: this "
                            f"version of exlbuild builds the model and calibration targets only")
    return Graph(nodes)
