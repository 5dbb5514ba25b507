"""Calibration data: token rows from a Parquet file or from the built-in default mix.

    ids, text, info = build_calibration(tokenizer, "default", rows=115, length=2048)
    ids = calibration_rows(tokenizer, "data/train.parquet", 64, 2048, text_column="text")

`ids` is a (rows, length) LongTensor, the same on every run and machine for the same inputs and software; `text`
a (rows,) bool tensor, True for the rows of running text (every row of a Parquet file; the default mix's word-list
and random rows are not); `info` a small JSON-able description for the artifact manifest. For artifact keys, the
default mix's content is `default_mix.fingerprint()`; a Parquet file's is its content hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from exlbuild.calib.default_mix import default_mix_rows, describe_default_mix
from exlbuild.calib.parquet import parquet_rows
from exlbuild.calib.rows import check_shape
from exlbuild.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

__all__ = ["build_calibration", "calibration_rows", "describe_default_mix"]

DEFAULT = "default"


def build_calibration(tokenizer: Tokenizer, dataset: str, rows: int, length: int,
                      text_column: str = "text") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(rows, length) token ids, which rows are running text, and their description; dataset is "default" or the
    path of a .parquet file."""
    check_shape(rows, length)
    if str(dataset) == DEFAULT:
        return default_mix_rows(tokenizer, rows, length)
    return parquet_rows(tokenizer, Path(dataset), rows, length, text_column)


def calibration_rows(tokenizer: Tokenizer, dataset: str, rows: int, length: int,
                     text_column: str = "text") -> torch.Tensor:
    """build_calibration's token ids alone."""
    return build_calibration(tokenizer, dataset, rows, length, text_column)[0]
