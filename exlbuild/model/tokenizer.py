"""A model's tokenizer: tokenizer.json (Hugging Face `tokenizers`) or, failing that, tokenizer.model (SentencePiece).

Only what calibration and evaluation need: text -> ids, ids -> text, the id range, BOS and EOS. Text that spells a
special token (say "<|endoftext|>") is encoded as plain text, as the reference converters do, so the content of a
calibration file can never inject control tokens.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from exlbuild.errors import ExlbuildError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in order of preference


class Tokenizer:
    """A loaded tokenizer. `vocab_size` is the size of its id space (largest id + 1, added tokens included);
    `bos_id` / `eos_id` are None where neither the model's files nor the tokenizer name one."""

    def __init__(
        self,
        path: Path,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        vocab_size: int,
        bos_id: int | None,
        eos_id: int | None,
    ) -> None:
        self.path = path
        self._encode = encode
        self._decode = decode
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if add_bos:
            ids.insert(0, self._special("BOS", self.bos_id))
        if add_eos:
            ids.append(self._special("EOS", self.eos_id))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def _special(self, name: str, token_id: int | None) -> int:
        if token_id is None:
            raise ExlbuildError(f"{self.path.parent}: the tokenizer has no {name} token (none is named in "
                                f"tokenizer_config.json, config.json or {self.path.name})")
        return token_id

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


# Every file a tokenizer is read from.
_READ_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "config.json", "added_tokens.json")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model directory; ExlbuildError names the directory or file at fault.

    A build reads one model's tokenizer in many rules (each checks it against the embedding; calibration and every
    eval encode with it), and parsing a 49,152-token tokenizer.json takes 0.13-0.3 s: loaded tokenizers are kept for
    the process, keyed by the directory and the size and modification time of every file they are read from."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExlbuildError(f"{model_dir}: model directory not found")
    files = [model_dir / name for name in _READ_FILES]
    signature = tuple((f.name, st.st_size, st.st_mtime_ns) for f in files if f.is_file() for st in [f.stat()])
    return _load_tokenizer(model_dir, signature)


@lru_cache(maxsize=8)
def _load_tokenizer(model_dir: Path, signature: tuple) -> Tokenizer:
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    config = _read_json(model_dir / "config.json")
    added = _added_tokens(model_dir, tokenizer_config)

    path = next((model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()), None)
    if path is None:
        raise ExlbuildError(f"{model_dir}: no tokenizer found; looked for {' and '.join(TOKENIZER_FILES)}")
    backend = (_load_hf if path.name == "tokenizer.json" else _load_sentencepiece)(path)

    def token_id(token: Any) -> int | None:
        content = token.get("content") if isinstance(token, dict) else token  # AddedToken objects are dicts
        if not isinstance(content, str):
            return None
        return added[content] if content in added else backend.lookup(content)

    def special(name: str, own: int | None) -> int | None:
        # tokenizer_config.json names the token, config.json its id; the tokenizer's own notion comes last
        from_config = config.get(f"{name}_token_id")
        if isinstance(from_config, list):  # several EOS ids (Llama 3): the first is the canonical one
            from_config = from_config[0] if from_config else None
        for candidate in (token_id(tokenizer_config.get(f"{name}_token")), from_config, own):
            if isinstance(candidate, int) and not isinstance(candidate, bool) and candidate >= 0:
                return candidate
        return None

    vocab_size = max([backend.size, *(i + 1 for i in added.values())])
    return Tokenizer(path, backend.encode, backend.decode, vocab_size,
                     special("bos", backend.bos_id), special("eos", backend.eos_id))


def check_vocab_fits(tokenizer: Tokenizer, embedding_rows: int, model_dir: Path) -> None:
    """Refuse a tokenizer that can produce ids past the end of the model's embedding (a mismatched tokenizer)."""
    if tokenizer.vocab_size > embedding_rows:
        raise ExlbuildError(
            f"{model_dir}: the tokenizer ({tokenizer.path.name}) has {tokenizer.vocab_size} token ids "
            f"(largest {tokenizer.vocab_size - 1}), but the embedding has only {embedding_rows} rows; "
            f"the tokenizer does not belong to these weights")


class _Backend(NamedTuple):
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    lookup: Callable[[str], int | None]  # token string -> id, None if unknown
    size: int  # largest id + 1
    bos_id: int | None  # the tokenizer file's own BOS/EOS, used when no config names one
    eos_id: int | None


def _load_hf(path: Path) -> _Backend:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust loader raises a bare Exception for any malformed file
        raise ExlbuildError(f"{path}: cannot read the tokenizer: {e}") from e
    tok.no_truncation()  # some tokenizer.json files ship with truncation/padding switched on
    tok.no_padding()
    tok.encode_special_tokens = True  # special-token text is encoded as plain text
    size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    return _Backend(
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        lookup=tok.token_to_id,
        size=size,
        bos_id=None,  # tokenizer.json has no notion of BOS/EOS beyond what the configs name
        eos_id=None,
    )


def _load_sentencepiece(path: Path) -> _Backend:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # OSError or RuntimeError depending on how the protobuf is broken
        raise ExlbuildError(f"{path}: cannot read the SentencePiece model: {e}") from e

    def lookup(token: str) -> int | None:
        i = sp.piece_to_id(token)
        return i if sp.id_to_piece(i) == token else None  # piece_to_id answers unk for unknown pieces

    return _Backend(
        encode=lambda text: sp.encode(text, out_type=int),
        decode=lambda ids: sp.decode(ids),
        lookup=lookup,
        size=sp.get_piece_size(),
        bos_id=sp.bos_id(),  # -1 when the model has none; special() skips negatives
        eos_id=sp.eos_id(),
    )


def _added_tokens(model_dir: Path, tokenizer_config: dict) -> dict[str, int]:
    """Tokens added on top of the base vocabulary, from tokenizer_config.json and the older added_tokens.json."""
    added = {v["content"]: int(k) for k, v in tokenizer_config.get("added_tokens_decoder", {}).items()
             if isinstance(v, dict) and isinstance(v.get("content"), str) and str(k).isdigit()}
    added.update({k: v for k, v in _read_json(model_dir / "added_tokens.json").items() if isinstance(v, int)})
    return added


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExlbuildError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise ExlbuildError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
