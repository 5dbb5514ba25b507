"""exlbuild: Make for quantizing language models into the ExLlama formats."""

__version__ = "0.1.0"
