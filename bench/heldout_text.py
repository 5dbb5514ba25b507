"""Write a held-out English evaluation text: modern encyclopedic prose that the default calibration mix did not see.

    python bench/heldout_text.py OUT.txt [--articles 400] [--rows 100] [--length 2048] [--model DIR]

Perplexity measured on calibration text flatters a quantized model, because its quantization was fitted to exactly
that text. This writes the summaries of the LAST `--articles` English Wikipedia articles of the default mix's
encyclopedia source, in mix order (the fixed hash shuffle), separated by blank lines, for `exlbuild eval DIR --text
OUT.txt` or a recipe's `eval.text`. The calibration takes the source's articles from the front of that order, so
the file is held out as long as the calibration at `--rows` × `--length` stops short of them; that is checked
first, through the `documents` count the mix reports for the source, and the script fails if it does not hold.

The count depends on the tokenizer. With `--model DIR` it is exact for that model's tokenizer. Without it, the mix
is run with a stand-in that gives one token per 8 bytes of UTF-8: fewer tokens than real tokenizers give on this
text (SmolLM2's averages 4.6 characters a token), so the calibration appears to use more articles than it does and
the check errs on the safe side, with no model needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exlbuild.calib.default_mix import SOURCES, default_mix_rows
from exlbuild.calib.rows import check_shape
from exlbuild.errors import ExlbuildError
from exlbuild.model.tokenizer import Tokenizer, load_tokenizer

SOURCE = "encyclopedia"
STAND_IN_BYTES_PER_TOKEN = 8


def stand_in_tokenizer() -> Tokenizer:
    """Counts tokens generously (no BOS: every row is all text, which also uses more articles)."""
    return Tokenizer(Path(f"<{STAND_IN_BYTES_PER_TOKEN} bytes a token>"),
                     encode=lambda text: [0] * -(-len(text.encode()) // STAND_IN_BYTES_PER_TOKEN),
                     decode=lambda ids: "", vocab_size=1, bos_id=None, eos_id=None)


def articles_used(tokenizer: Tokenizer, rows: int, length: int) -> int:
    """How many of the source's articles the calibration at rows × length takes (the last one perhaps in part)."""
    _, _, info = default_mix_rows(tokenizer, rows, length)
    return next(s for s in info["sources"] if s["name"] == SOURCE).get("documents", 0)  # 0 rows: no count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the text file to write")
    parser.add_argument("--articles", type=int, default=400, help="how many articles to hold out (default 400)")
    parser.add_argument("--rows", type=int, default=100, help="calibration rows to check against (default 100)")
    parser.add_argument("--length", type=int, default=2048, help="calibration row length (default 2048)")
    parser.add_argument("--model", type=Path, help="a model directory whose tokenizer gives the exact count")
    args = parser.parse_args(argv)

    try:
        check_shape(args.rows, args.length)
        articles = list(next(s for s in SOURCES if s.name == SOURCE).documents())
        if not 0 < args.articles < len(articles):
            raise ExlbuildError(f"--articles must be between 1 and {len(articles) - 1}, got {args.articles}")
        tokenizer = load_tokenizer(args.model) if args.model else stand_in_tokenizer()
        used = articles_used(tokenizer, args.rows, args.length)
    except ExlbuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    first_held_out = len(articles) - args.articles
    if used > first_held_out:
        print(f"error: the calibration at {args.rows} × {args.length} uses the first {used} of {len(articles)} "
              f"English articles ({tokenizer.path}), so the last {args.articles} are not all held out: ask for "
              f"fewer articles, check a smaller calibration, or give --model for an exact count", file=sys.stderr)
        return 1
    held_out = articles[first_held_out:]
    args.out.write_text("\n\n".join(held_out) + "\n", encoding="utf-8")
    print(f"{args.out}: the last {len(held_out)} of {len(articles)} English articles ({sum(map(len, held_out))} "
          f"characters); the calibration at {args.rows} × {args.length} uses at most the first {used} "
          f"({tokenizer.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
