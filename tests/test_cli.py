"""The command line on a tiny Hugging Face model and a Parquet calibration file: build, plan and why, status,
graph, verify, --frozen, clean, gc, a store of the old layout, concurrent builds, and bad recipes (clear error,
nothing published)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_fixtures import recipe_project, run_cli, tiny_model_with_tokenizer

RECIPE = """\
model:
  path: model
calibration:
  dataset: cal.parquet
  rows: 4
  length: 32
  measurement_rows: 2
  measurement_length: 32
"""


@pytest.fixture(scope="module")
def model_template(tmp_path_factory) -> Path:
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("template") / "model", vocab_size=1000)


@pytest.fixture
def project(tmp_path, model_template) -> Path:
    return recipe_project(tmp_path, model_template, RECIPE, calibration_paragraphs=200)


def published(project: Path) -> list[str]:
    store = project / ".exlbuild" / "store"
    return sorted(str(p.relative_to(store)) for p in store.glob("*/*")) if store.exists() else []


def test_build_summary_then_noop(project, capsys):
    recipe = project / "recipe.yaml"
    code, out, err = run_cli(capsys, recipe)
    assert code == 0, err
    assert "building calibration (calibration): never built" in err
    for name in ("model", "calibration", "calibration-measurement"):
        assert name in out
    assert out.count("built") == 2 and "up to date" in out  # the model is a source: never built
    lock = json.loads((project / "exlbuild.lock").read_text())["recipes"]["recipe.yaml"]
    assert set(lock["targets"]) == {"model", "tokenizer", "calibration", "calibration-measurement"}
    assert lock["recipe"]["calibration"]["rows"] == 4

    code, out, err = run_cli(capsys, recipe)
    assert code == 0 and "building" not in err
    assert out.count("up to date") == 4
    code, out, err = run_cli(capsys, "-q", recipe)  # a build's options may come before the recipe
    assert (code, out, err) == (0, "", "")

    from safetensors.torch import load_file

    key = lock["targets"]["calibration"]["key"]
    ids = load_file(project / ".exlbuild/store/calibration" / key / "data/calibration.safetensors")["input_ids"]
    assert tuple(ids.shape) == (4, 32)


def test_plan_says_why(project, capsys):
    recipe = project / "recipe.yaml"
    run_cli(capsys, recipe)
    code, out, _ = run_cli(capsys, "plan", recipe, "calibration.rows=8")
    assert code == 0
    assert "build calibration (calibration" in out and "because rows: 4 -> 8" in out
    assert "calibration-measurement" not in out
    code, out, _ = run_cli(capsys, "plan", recipe)
    assert "nothing to do" in out


def test_weights_change_leaves_calibration_alone_tokenizer_change_does_not(project, capsys):
    recipe = project / "recipe.yaml"
    run_cli(capsys, recipe)
    weights = project / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x3c\x00\x3c"  # the last two fp16 values become 1.0
    weights.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "plan", recipe)
    assert "nothing to do" in out  # only the tokenizer reaches the calibration sets

    tok = project / "model" / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("</s>", "<s>"))
    code, out, _ = run_cli(capsys, "plan", recipe)
    assert "build calibration " in out and "build calibration-measurement " in out
    assert "because input 'tokenizer' changed" in out


def test_status_json_and_graph(project, capsys):
    recipe = project / "recipe.yaml"
    code, out, _ = run_cli(capsys, "status", recipe, "--json")
    targets = {t["name"]: t for t in json.loads(out)["targets"]}
    assert targets["calibration"]["state"] == "stale" and targets["calibration"]["why"] == ["never built"]
    run_cli(capsys, recipe)
    code, out, _ = run_cli(capsys, "status", recipe, "--json")
    targets = {t["name"]: t for t in json.loads(out)["targets"]}
    assert {t["kind"] for t in targets.values()} == {"model", "calibration"}
    assert all(t["state"] == "up to date" for t in targets.values())
    assert targets["model"]["out_dir"] == str((project / "model").resolve())
    cal = targets["calibration"]
    assert Path(cal["out_dir"], "calibration.safetensors").is_file() and len(cal["key"]) == 64
    assert cal["rows"] == 4 and cal["length"] == 32

    code, out, _ = run_cli(capsys, "graph", recipe)
    assert "calibration  [calibration, calibration," in out and "<- tokenizer" in out
    code, out, _ = run_cli(capsys, "graph", recipe, "--dot")
    assert out.startswith("digraph") and '"tokenizer" -> "calibration"' in out


def test_verify_names_corruption(project, capsys):
    recipe = project / "recipe.yaml"
    run_cli(capsys, recipe)
    code, out, _ = run_cli(capsys, "verify", recipe)
    assert code == 0 and "verify: OK" in out
    key = json.loads((project / "exlbuild.lock").read_text())["recipes"]["recipe.yaml"]["targets"]["calibration"]["key"]
    artifact = project / ".exlbuild/store/calibration" / key / "data/calibration.safetensors"
    os.chmod(artifact, 0o644)
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1
    artifact.write_bytes(bytes(data))
    (project / "model" / "generation_config.json").write_text("{}")
    code, out, _ = run_cli(capsys, "verify", recipe)
    assert code == 1
    assert f"calibration: {artifact} differs from the lock" in out
    assert f"model: {(project / 'model' / 'generation_config.json').resolve()} differs from the lock" in out


def test_a_committed_lock_names_the_clones_own_files(project, tmp_path, capsys):
    """The lock's out_dirs are relative to its folder, so `verify` in another clone of the project (a copy with its
    store) checks that clone's files, not the ones of the folder that wrote the lock."""
    run_cli(capsys, project / "recipe.yaml")
    targets = json.loads((project / "exlbuild.lock").read_text())["recipes"]["recipe.yaml"]["targets"]
    key = targets["calibration"]["key"]
    assert targets["model"]["out_dir"] == "model"
    assert targets["calibration"]["out_dir"] == f".exlbuild/store/calibration/{key}/data"
    clone = shutil.copytree(project, tmp_path / "clone", symlinks=True)
    (clone / "model" / "generation_config.json").write_text("{}")
    code, out, _ = run_cli(capsys, "verify", clone / "recipe.yaml")
    assert code == 1 and out.count("differs from the lock") == 1, out
    assert f"model: {(clone / 'model' / 'generation_config.json').resolve()} differs from the lock" in out
    code, out, _ = run_cli(capsys, "verify", project / "recipe.yaml")
    assert code == 0, out


def test_frozen(project, capsys):
    recipe = project / "recipe.yaml"
    code, _, err = run_cli(capsys, recipe, "--frozen")
    assert code == 1 and "has no entry for recipe.yaml" in err
    run_cli(capsys, recipe)
    code, _, err = run_cli(capsys, recipe, "--frozen")
    assert code == 0, err
    assert "everything was up to date; every artifact matches exlbuild.lock" in err
    code, _, err = run_cli(capsys, recipe, "--frozen", "calibration.length=64")
    assert code == 1 and "calibration: length: 32 -> 64" in err and "resolved recipe differs" in err
    assert len(published(project)) == 2  # nothing new was built


def test_frozen_rebuilds_and_compares_with_the_lock(project, capsys, monkeypatch):
    """A store without the artifacts (another machine, a CI runner) builds them under --frozen and checks their bytes
    against the lock's; the lock is never rewritten."""
    recipe, lock = project / "recipe.yaml", project / "exlbuild.lock"
    run_cli(capsys, recipe)
    locked = lock.read_bytes()
    shutil.rmtree(project / ".exlbuild" / "store")
    code, out, err = run_cli(capsys, recipe, "--frozen")
    assert code == 0, err
    assert "built 2 targets; every artifact matches exlbuild.lock" in err and "calibration-measurement" in out
    assert lock.read_bytes() == locked

    # A lock that recorded other bytes for the calibration set (as another machine's float arithmetic might).
    data = json.loads(locked)
    files = data["recipes"]["recipe.yaml"]["targets"]["calibration"]["files"]
    files["calibration.safetensors"] = "0" * 64
    lock.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    edited = lock.read_bytes()
    run_cli(capsys, "clean", recipe, "calibration")
    code, _, err = run_cli(capsys, recipe, "--frozen")
    assert code == 1
    assert "the build differs from exlbuild.lock" in err
    assert "calibration: file calibration.safetensors content changed (000000000000 -> " in err
    assert "calibration-measurement" not in err.split("differs from exlbuild.lock")[1]
    assert lock.read_bytes() == edited
    assert len(published(project)) == 2  # what was built stays: its key is the lock's, its bytes this machine's

    # A rule that fails under --frozen leaves the lock as it was too.
    from exlbuild.rules.calibration import Calibration

    def fail(self, ctx):
        raise RuntimeError("no tokens today")

    monkeypatch.setattr(Calibration, "run", fail)
    run_cli(capsys, "clean", recipe, "calibration")
    code, _, err = run_cli(capsys, recipe, "--frozen")
    assert code == 1 and "calibration failed: RuntimeError: no tokens today" in err
    assert lock.read_bytes() == edited


def test_clean_and_gc(project, capsys):
    recipe = project / "recipe.yaml"
    run_cli(capsys, recipe)
    assert len(published(project)) == 2
    code, out, _ = run_cli(capsys, "clean", recipe, "calibration")
    assert code == 0 and "removed calibration" in out
    assert len(published(project)) == 1
    code, out, _ = run_cli(capsys, "status", recipe, "--json")
    states = {t["name"]: t["state"] for t in json.loads(out)["targets"]}
    assert states["calibration"] == "stale" and states["calibration-measurement"] == "up to date"

    run_cli(capsys, recipe)  # rows 4 again
    run_cli(capsys, recipe, "calibration.rows=3")  # the lock now references the rows=3 artifact
    assert len(published(project)) == 3
    code, out, _ = run_cli(capsys, "gc", recipe)
    assert code == 0 and "removed 1 artifacts" in out
    assert len(published(project)) == 2
    code, out, _ = run_cli(capsys, "status", recipe, "--json", "calibration.rows=3")
    assert all(t["state"] == "up to date" for t in json.loads(out)["targets"])


def test_a_store_of_the_old_layout_says_to_delete_it(project, capsys):
    recipe = project / "recipe.yaml"
    run_cli(capsys, recipe)
    store = project / ".exlbuild"
    for artifact in store.glob("store/*/*"):  # as an exlbuild before data/ left it
        for f in (artifact / "data").iterdir():
            f.rename(artifact / f.name)
        (artifact / "data").rmdir()
    (store / "layout.json").unlink()
    for command in ([recipe], ["status", recipe], ["clean", recipe]):
        code, _, err = run_cli(capsys, *command)
        assert code == 1 and f"delete {store / 'store'} and build again" in err, err
    shutil.rmtree(store / "store")
    code, _, err = run_cli(capsys, recipe)
    assert code == 0 and err.count("building ") == 2, err
    code, out, _ = run_cli(capsys, "verify", recipe)
    assert code == 0 and "verify: OK" in out


def test_two_concurrent_cli_builds(project):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "exlbuild.cli", str(project / "recipe.yaml")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    built = [line for _, err in results for line in err.splitlines() if line.startswith("building ")]
    assert sorted(built) == ["building calibration (calibration): never built",
                             "building calibration-measurement (calibration): never built"]
    assert len(published(project)) == 2
    lock = json.loads((project / "exlbuild.lock").read_text())
    assert set(lock["recipes"]["recipe.yaml"]["targets"]) == {"model", "tokenizer", "calibration",
                                                              "calibration-measurement"}


BAD_RECIPES = {
    "unknown key": ("calibraton:\n  rows: 2\n", [], "did you mean 'calibration'?"),
    "wrong type": (RECIPE.replace("rows: 4", "rows: many"), [], "bad value for 'calibration.rows'"),
    "bits out of range": (RECIPE, ["+variants.q.bits=9.5"], "variants.q.bits: 9.5 is out of range for exl2"),
    "head bits": (RECIPE + "sweep:\n  head_bits: 7\n", [], "sweep.head_bits: 7 is not allowed for exl2"),
    "missing model dir": (RECIPE.replace("path: model", "path: nowhere"), [], "directory not found"),
    "malformed yaml": (RECIPE + "  - [oops\n", [], "malformed YAML at line"),
    "bad override": (RECIPE, ["calibration.rows=[1,"], "bad override 'calibration.rows=[1,'"),
    "unknown override": (RECIPE, ["rope.sclae=2"], "did you mean 'rope.scale'?"),
    "deleting a recipe key": (RECIPE, ["~calibration.rows"], "set it to null instead"),
    "missing parquet": (RECIPE.replace("cal.parquet", "none.parquet"), [], "calibration.dataset: file not found"),
    "not a dataset": (RECIPE.replace("cal.parquet", "cal.txt"), [],
                      "calibration.dataset: 'cal.txt' is neither 'default', 'generated' nor a .parquet file"),
    "missing column": (RECIPE, ["calibration.text_column=txt"], "txt"),
    "negative probe": (RECIPE, ["measurement.probe_tokens=-1"], "measurement.probe_tokens: -1 is out of range"),
    "negative tuning steps": (RECIPE, ["tune.steps=-1"], "tune.steps: -1 is out of range"),
    "negative refining steps": (RECIPE, ["refine.steps=-1"], "refine.steps: -1 is out of range"),
    "refining rate above 1": (RECIPE, ["refine.lr=2"], "refine.lr: 2.0 is out of range; it must be in (0, 1]"),
    "no weights a refining fit": (RECIPE, ["refine.weights_per_fit=0"], "refine.weights_per_fit: 0 is out of range"),
    "refining below no bitrate": (RECIPE, ["refine.below_bits=0"], "refine.below_bits: 0.0 is out of range"),
    "tuning rate of zero": (RECIPE, ["tune.lr=0"], "tune.lr: 0.0 is out of range; it must be in (0, 1]"),
    "passes in float16": (RECIPE, ["passes.dtype=float16"],
                          "passes.dtype: 'float16' is not valid; valid: float32, float64"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes(project, capsys, case):
    text, overrides, message = BAD_RECIPES[case]
    (project / "recipe.yaml").write_text(text)
    code, out, err = run_cli(capsys, project / "recipe.yaml", *overrides)
    assert code == 1, (out, err)
    assert message in err, err
    assert published(project) == []
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_eval_on_cuda_without_a_gpu_says_so(project, capsys):
    code, out, err = run_cli(capsys, "eval", project / "model", "--text", project / "eval.txt", "--device", "cuda")
    assert code != 0 and "--device cuda: no CUDA GPU is available" in err, err


def test_calibration_sampled_from_the_model(project, capsys):
    """`calibration.dataset=generated`: both calibration sets are rows the model samples, every row counted as text,
    each starting with the model's BOS; the same recipe builds the same rows."""
    recipe = [project / "recipe.yaml", "calibration.dataset=generated"]
    code, _, err = run_cli(capsys, *recipe)
    assert code == 0, err
    code, out, _ = run_cli(capsys, "status", *recipe, "--json")
    targets = {t["name"]: t for t in json.loads(out)["targets"]}
    config = json.loads((project / "model" / "config.json").read_text())
    for name, shape in (("calibration", (4, 32)), ("calibration-measurement", (2, 32))):
        tensors = load_file(str(Path(targets[name]["out_dir"]) / "calibration.safetensors"))
        ids = tensors["input_ids"]
        assert ids.shape == shape and tensors["text_rows"].all()
        assert (ids[:, 0] == config["bos_token_id"]).all() and ((ids >= 0) & (ids < config["vocab_size"])).all()
    first = (Path(targets["calibration"]["out_dir"]) / "calibration.safetensors").read_bytes()
    run_cli(capsys, "clean", project / "recipe.yaml", "calibration", "calibration.dataset=generated")
    code, _, err = run_cli(capsys, *recipe)
    assert code == 0 and (Path(targets["calibration"]["out_dir"]) / "calibration.safetensors").read_bytes() == first


def test_missing_config_json(project, capsys):
    (project / "model" / "config.json").unlink()
    code, _, err = run_cli(capsys, project / "recipe.yaml")
    assert code == 1 and "has no config.json" in err and published(project) == []


def test_noop_build_imports_neither_torch_nor_triton(project, capsys):
    run_cli(capsys, project / "recipe.yaml")
    code = ("import sys; from exlbuild.cli import main; rc = main([sys.argv[1], '-q']); "
            "print(rc, 'torch' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(project / "recipe.yaml")], capture_output=True, text=True)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr
