"""Text -> exact token counts, tokenizing no more text than the rows need."""

from __future__ import annotations

from typing import Iterator

from exlbuild.errors import ExlbuildError
from exlbuild.model.tokenizer import Tokenizer

SEPARATOR = "\n\n"  # after every document or Parquet string, as between paragraphs


def check_shape(rows: int, length: int) -> None:
    for name, value in (("rows", rows), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExlbuildError(f"calibration {name} must be a positive integer, got {value!r}")


def head(tokenizer: Tokenizer, text: str, n: int) -> list[int]:
    """The first n tokens of `text` (all of them if it has fewer).

    A long text is tokenized through growing prefixes, so a 100 MB string costs about n tokens of work. The result
    is the prefix's tokenization, which can differ from the whole text's only at the cut: still a pure function of
    (tokenizer, text, n), so deterministic.
    """
    chars = 8 * n + 64  # > n tokens at the usual 2-6 characters a token; doubled when not
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > n or chars >= len(text):
            return ids[:n]
        chars *= 2


def take_tokens(tokenizer: Tokenizer, texts: Iterator[str | None], n: int, separator: str) -> tuple[list[int], int]:
    """Tokens of consecutive non-empty texts, each followed by `separator`, until there are n (fewer if `texts`
    runs out).

    Each text is tokenized on its own; the one that overflows is cut and its rest is never tokenized. The iterator
    is left after the last text used, so successive calls on one iterator fill successive rows. Returns the tokens
    and the number of texts used.
    """
    ids: list[int] = []
    used = 0
    if n < 1:
        return ids, used
    for text in texts:
        if not text:  # None (a Parquet null) or empty: nothing to add, not even a separator
            continue
        ids += head(tokenizer, text + separator, n - len(ids))
        used += 1
        if len(ids) >= n:
            break
    return ids, used
