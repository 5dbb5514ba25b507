"""Calibration rows from a text column of a Parquet file.

The column's strings are read in file order, one record batch at a time (a huge file is never loaded whole),
each non-empty string followed by SEPARATOR is tokenized on its own (no BOS/EOS), the token streams are
concatenated, and the first rows × length tokens are reshaped to (rows, length). Nulls and empty strings are
skipped. Reading stops as soon as there are enough tokens.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from exlbuild.calib.rows import SEPARATOR, take_tokens
from exlbuild.errors import ExlbuildError
from exlbuild.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

BATCH_ROWS = 1024  # Parquet rows per record batch: bounded memory, few Python round trips


def parquet_rows(tokenizer: Tokenizer, path: Path, rows: int, length: int,
                 column: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(rows, length) LongTensor of the first rows × length tokens of `column`, which rows are running text (all:
    the file is the user's text), and a description for the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    path = Path(path)
    if not path.is_file():
        raise ExlbuildError(f"{path}: calibration file not found (dataset must be 'default' or a .parquet file)")
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ExlbuildError(f"{path}: not a readable Parquet file: {e}") from e
    need = rows * length
    with file:
        _check_column(file.schema_arrow, path, column)
        ids, used = take_tokens(tokenizer, _strings(file, column), need, SEPARATOR)
    if len(ids) < need:
        raise ExlbuildError(
            f"{path}: column {column!r} holds only {len(ids)} tokens of text ({used} non-empty strings); "
            f"{rows} rows × {length} tokens need {need}: ask for fewer rows or a shorter length, or add text")
    info = {"dataset": str(path), "column": column, "separator": SEPARATOR, "strings_used": used,
            "rows": rows, "length": length}
    return torch.tensor(ids, dtype=torch.long).view(rows, length), torch.ones(rows, dtype=torch.bool), info


def _check_column(schema, path: Path, column: str) -> None:
    import pyarrow as pa

    names = schema.names
    if column not in names:
        close = difflib.get_close_matches(column, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ExlbuildError(f"{path}: no column {column!r}; columns: {', '.join(map(repr, names))}{hint}")
    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise ExlbuildError(f"{path}: column {column!r} has type {schema.field(column).type}, not text; "
                            f"name a string column")


def _strings(file, column: str) -> Iterator[str | None]:
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        yield from batch.column(0).to_pylist()
