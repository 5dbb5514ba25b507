"""The model: an existing Hugging Face directory (a source), or one imported from a GGUF file."""

from __future__ import annotations

from typing import Any

from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.recipe import LoadedRecipe, resolve_gguf

# The files a tokenizer is read from: artifacts that only tokenize depend on these, not on the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json")


class ImportGGUF(Rule):
    """A GGUF file (llama architecture) -> a Hugging Face directory with FP16 safetensors."""

    name = "import-gguf"
    version = 1

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.model.gguf_import import import_gguf

        import_gguf(ctx.sources["gguf"], ctx.out)
        return {"source": ctx.sources["gguf"].name}


def model_nodes(recipe: LoadedRecipe) -> tuple[Node, Node]:
    """The model node, and the node calibration depends on for its tokenizer."""
    spec = recipe.spec.model
    if spec.path:
        directory = recipe.resolve(spec.path)
        model = Node("model", "model", source_dir=directory)
        tokenizer = Node("tokenizer", "model", source_dir=directory, params={"files": list(TOKENIZER_FILES)})
        return model, tokenizer
    model = Node("model", "model", rule=ImportGGUF(), sources={"gguf": resolve_gguf(recipe)})
    return model, model
