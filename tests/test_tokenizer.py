"""Tokenizer loading: both file formats, BOS/EOS resolution, vocab-vs-embedding check, and every error."""

import io
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from exlbuild.errors import ExlbuildError
from exlbuild.model.tokenizer import check_vocab_fits, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAINING_FILES = ("textwrap.py", "string.py", "difflib.py", "json/encoder.py")


def training_text() -> list[str]:
    """A few hundred KB of real text (code, docstrings) plus a little Cyrillic and CJK."""
    return [(STDLIB / name).read_text(encoding="utf-8") for name in TRAINING_FILES] + ["Привет мир 中文 日本語 " * 9]


def make_bpe_dir(model_dir: Path, vocab_size: int = 1000, config: dict | None = None) -> Path:
    """A model directory holding a byte-level BPE tokenizer.json trained here, with <s>/</s> as ids 0/1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    if config is None:
        config = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def make_sentencepiece_dir(model_dir: Path) -> Path:
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(training_text()).splitlines()), model_writer=buffer, vocab_size=600,
        model_type="bpe", byte_fallback=True, minloglevel=2)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tokenizer.model").write_bytes(buffer.getvalue())
    return model_dir


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_dir(tmp_path_factory.mktemp("bpe"))


def test_tokenizer_json_round_trip_and_specials(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.path == bpe_dir / "tokenizer.json"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (1000, 0, 1)
    text = "def f(x):\n    return x  # Привет 中文"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True, add_eos=True) == [0, *ids, 1]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_token_text_is_plain_text(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    ids = tok.encode("<s>x</s>")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "<s>x</s>"


def test_truncation_in_tokenizer_json_is_ignored(tmp_path, bpe_dir):
    data = json.loads((bpe_dir / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert len(load_tokenizer(tmp_path).encode("one two three four five six seven")) > 4


def test_bos_eos_from_config_json(tmp_path):
    model_dir = make_bpe_dir(tmp_path / "m", config={})
    (model_dir / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [0, 1]}))
    tok = load_tokenizer(model_dir)
    assert (tok.bos_id, tok.eos_id) == (1, 0)  # a list of EOS ids: the first one


def test_no_bos_is_none_and_cannot_be_added(tmp_path):
    tok = load_tokenizer(make_bpe_dir(tmp_path / "m", config={"bos_token": None, "eos_token": "</s>"}))
    assert (tok.bos_id, tok.eos_id) == (None, 1)
    with pytest.raises(ExlbuildError, match="no BOS token"):
        tok.encode("x", add_bos=True)


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path):
    model_dir = make_bpe_dir(tmp_path / "m")
    (model_dir / "tokenizer.model").write_bytes(b"not read")
    assert load_tokenizer(model_dir).path.name == "tokenizer.json"


def test_sentencepiece_model(tmp_path):
    model_dir = make_sentencepiece_dir(tmp_path / "sp")
    tok = load_tokenizer(model_dir)
    assert tok.path.name == "tokenizer.model"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (600, 1, 2)  # SentencePiece's own <s>, </s>
    text = "return the dedented text"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 1 and tok.decode(ids[1:]) == text
    assert 1 not in tok.encode("<s>")  # control-token text stays text


def test_sentencepiece_added_tokens_extend_vocab(tmp_path):
    model_dir = make_sentencepiece_dir(tmp_path / "sp")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|end|>", "added_tokens_decoder": {"600": {"content": "<|end|>"}, "601": {"content": "<pad>"}}}))
    tok = load_tokenizer(model_dir)
    assert (tok.vocab_size, tok.eos_id) == (602, 600)


def test_check_vocab_fits(tmp_path, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    check_vocab_fits(tok, 1000, bpe_dir)
    check_vocab_fits(tok, 1024, bpe_dir)  # padded embeddings are fine
    with pytest.raises(ExlbuildError) as e:
        check_vocab_fits(tok, 999, bpe_dir)
    assert str(bpe_dir) in str(e.value) and "1000" in str(e.value) and "999" in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ExlbuildError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_no_tokenizer_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExlbuildError) as e:
        load_tokenizer(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message


@pytest.mark.parametrize("name, data", [("tokenizer.json", b'{"version": "1.0", "model": 42}'),
                                        ("tokenizer.json", b"\xff\xfe garbage"),
                                        ("tokenizer.model", b"garbage")])
def test_corrupt_tokenizer_file(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ExlbuildError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "added_tokens.json"])
def test_corrupt_config_file(tmp_path, name):
    model_dir = make_bpe_dir(tmp_path / "m")
    (model_dir / name).write_text("{not json")
    with pytest.raises(ExlbuildError) as e:
        load_tokenizer(model_dir)
    assert str(model_dir / name) in str(e.value)


def test_import_is_light():
    code = "import sys, exlbuild.model.tokenizer; assert 'torch' not in sys.modules and 'tokenizers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loaded_once_until_a_file_changes(tmp_path, bpe_dir):
    """A directory's tokenizer is parsed once per process; changing any file it is read from loads it again."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(bpe_dir, model_dir)
    first = load_tokenizer(model_dir)
    assert load_tokenizer(model_dir) is first
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>"}))
    changed = load_tokenizer(model_dir)
    assert changed is not first and (first.bos_id, changed.bos_id) == (0, 1)
