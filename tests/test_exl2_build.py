"""EXL2 through the engine and the CLI on a tiny model: measurement, a sweep of variants sharing it, output
directories, the report, adding a variant, an exllamav2 measurement.json as input, and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exlbuild.model.checkpoint import Checkpoint, open_model
from exlbuild.quant.exl2.pack import validate_layer
from model_fixtures import recipe_project, run_cli, tiny_model_with_tokenizer
from test_tokenizer import make_bpe_dir

FIXTURES = Path(__file__).parent / "fixtures"

# The shapes of the model exllamav2's measurement fixture was made from (see test_exl2_reference.py).
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=1024, max_position_embeddings=512)

RECIPE = """\
model:
  path: model
calibration:
  dataset: cal.parquet
  rows: 4
  length: 64
  measurement_rows: 2
  measurement_length: 64
sweep:
  bits: [3.0, 4.0]
  shard_size: 0
refine:
  steps: 0  # refined and tuned in test_sweep_builds_loadable_directories_and_a_report's last step
tune:
  steps: 0
eval:
  text: eval.txt
  window: 64
"""


@pytest.fixture(scope="module")
def model_template(tmp_path_factory) -> Path:
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("exl2-template") / "model", dtype=torch.float16, **TINY)


@pytest.fixture
def project(tmp_path, model_template) -> Path:
    return recipe_project(tmp_path, model_template, RECIPE, calibration_paragraphs=150, eval_paragraphs=100)


def test_only_variants_below_refine_below_bits_are_refined(project, capsys):
    """refine.below_bits (default 5.0): a variant at or above it goes from its quantized tensors straight to the
    tuning; the threshold is not part of a refined variant's key (it decides whether the node exists)."""
    recipe = project / "recipe.yaml"

    def fits(*overrides: str) -> dict[str, dict]:
        code, out, err = run_cli(capsys, "status", recipe, "sweep.bits=[4.0,5.0]", "refine.steps=3", "tune.steps=5",
                                 "eval.text=null", *overrides, "--json")
        assert code == 0, err
        return {t["name"]: t for t in json.loads(out)["targets"] if t["kind"] in ("refined", "tuned")}

    default, everything = fits(), fits("refine.below_bits=8.1")
    assert sorted(default) == ["exl2-4.0bpw/refined", "exl2-4.0bpw/tuned", "exl2-5.0bpw/tuned"]
    assert sorted(everything) == ["exl2-4.0bpw/refined", "exl2-4.0bpw/tuned", "exl2-5.0bpw/refined",
                                  "exl2-5.0bpw/tuned"]
    assert default["exl2-4.0bpw/refined"]["key"] == everything["exl2-4.0bpw/refined"]["key"]
    assert default["exl2-5.0bpw/tuned"]["key"] != everything["exl2-5.0bpw/tuned"]["key"]  # tuned from quantized


@pytest.mark.slow
def test_sweep_builds_loadable_directories_and_a_report(project, capsys):
    recipe = project / "recipe.yaml"
    store = project / ".exlbuild" / "store"
    code, out, err = run_cli(capsys, recipe)
    assert code == 0, err
    for target in ("measurement", "exl2-3.0bpw/allocation", "exl2-3.0bpw/quantized", "exl2-3.0bpw",
                   "exl2-4.0bpw", "fp16/eval", "report"):
        assert f"building {target} " in err
    assert err.count("building measurement ") == 1  # one measurement serves both bitrates
    assert "| exl2-3.0bpw |" in out and "| exl2-4.0bpw |" in out  # the report

    for bits in ("3.0", "4.0"):
        d = project / "out" / f"exl2-{bits}bpw"
        assert (d / "output.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert not (d / "manifest.json").exists()
        config = json.loads((d / "config.json").read_text())
        q = config["quantization_config"]
        assert q["quant_method"] == "exl2" and q["bits"] == float(bits) and q["head_bits"] == 6
        assert q["calibration"] == {"rows": 4, "length": 64, "dataset": "cal.parquet"}
        ckpt = Checkpoint(d)
        names = set(ckpt.names())
        assert "lm_head.q_weight" in names and "model.embed_tokens.weight" in names
        assert not any(n.endswith("_proj.weight") for n in names)
        stored = load_file(str(d / "output.safetensors"))
        tensors = {k: stored[f"model.layers.1.mlp.down_proj.{k}"]
                   for k in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")}
        validate_layer(tensors, layer="down_proj", in_features=512, out_features=256, bias=False)

    report = json.loads(next((project / ".exlbuild/store/report").glob("*/data/report.json")).read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["exl2-3.0bpw"]["decoder_bpw"] <= 3.0 + 1e-9 and rows["exl2-3.0bpw"]["decoder_bpw"] > 2.9
    assert rows["exl2-4.0bpw"]["decoder_bpw"] <= 4.0 + 1e-9 and rows["exl2-4.0bpw"]["decoder_bpw"] > 3.9
    fp16 = report["fp16_perplexity"]
    assert fp16 < rows["exl2-4.0bpw"]["perplexity"] * 1.05  # quantization does not help, beyond noise
    # More bits come closer to FP16: judged on the decoder's weights as exlbuild's reader decodes them. (Not on this
    # random model's perplexity: 3.0 and 4.0 bpw lie within 3 % of FP16's and of each other, and their order changed
    # with the test dependencies' versions, exlbuild unchanged.)
    fp16_model = Checkpoint(project / "model")
    fp16_weights = {n: fp16_model.get(n) for n in fp16_model.names()
                    if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    reference = sum(float(w.square().sum()) for w in fp16_weights.values())

    def relative_error(bits: str) -> float:
        _, ckpt = open_model(project / "out" / f"exl2-{bits}bpw")
        return sum(float((ckpt.get(n) - w).square().sum()) for n, w in fp16_weights.items()) / reference

    assert len(fp16_weights) == 14 and relative_error("4.0") < 0.75 * relative_error("3.0")  # (0.45 here)
    assert list((project / ".exlbuild/store/report").glob("*/data/*.svg"))
    # The allocation weighed the blocks by the sensitivities the measurement wrote beside measurement.json.
    assert len(json.loads(next(store.glob("exl2-measurement/*/data/sensitivity.json")).read_text())["sensitivity"]) == 4
    for path in store.glob("exl2-allocation/*/data/strategy.json"):
        assert json.loads(path.read_text())["objective_kind"].startswith("predicted KL")

    code, out, err = run_cli(capsys, "verify", recipe)
    assert code == 0, out  # including the exported output directories

    # Adding a bitrate builds only that variant (and re-makes the report); the measurement is reused.
    code, out, err = run_cli(capsys, recipe, "sweep.bits=[3.0,4.0,5.0]")
    assert code == 0, err
    built = sorted(line.split()[1] for line in err.splitlines() if line.startswith("building "))
    assert built == ["exl2-5.0bpw", "exl2-5.0bpw/allocation", "exl2-5.0bpw/eval", "exl2-5.0bpw/quantized", "report"]

    # With refinement and tuning, each variant's quantized tensors are refined, tuned and compiled again; nothing
    # before them is rebuilt. (On this random model tuning towards FP16's distributions can also flatten them, and
    # a random model's perplexity, far above its vocabulary's size, then falls: no perplexity checks here.)
    code, out, err = run_cli(capsys, recipe, "refine.steps=3", "tune.steps=5", "eval.text=null")
    assert code == 0, err
    built = sorted(line.split()[1] for line in err.splitlines() if line.startswith("building "))
    assert built == ["exl2-3.0bpw", "exl2-3.0bpw/refined", "exl2-3.0bpw/tuned",
                     "exl2-4.0bpw", "exl2-4.0bpw/refined", "exl2-4.0bpw/tuned", "report"]
    # The report gives the calibration perplexity of the tensors compiled (the last fit's) and the time of all passes.
    code, out, err = run_cli(capsys, "status", recipe, "refine.steps=3", "tune.steps=5", "eval.text=null", "--json")
    targets = {t["name"]: t for t in json.loads(out)["targets"]}
    manifests = {name: json.loads((Path(t["out_dir"]).parent / "manifest.json").read_text())
                 for name, t in targets.items() if t["kind"] in ("quantized", "refined", "tuned")}
    report = json.loads((Path(targets["report"]["out_dir"]) / "report.json").read_text())
    for row in report["variants"]:
        passes = [manifests[f"{row['variant']}/{step}"] for step in ("quantized", "refined", "tuned")]
        assert row["calibration_perplexity"] == passes[-1]["metrics"]["calibration_perplexity"]
        assert row["quantize_seconds"] == pytest.approx(sum(p["seconds"] for p in passes))
    code, out, err = run_cli(capsys, recipe)  # back to the recipe without them: nothing to build
    assert code == 0 and "building" not in err

    # eval of a compiled directory through exlbuild's own EXL2 reader
    code, out, err = run_cli(capsys, "eval", project / "out" / "exl2-4.0bpw", "--text", project / "eval.txt",
                             "--window", "64", "--json")
    assert code == 0, err
    assert abs(json.loads(out)["perplexity"] - rows["exl2-4.0bpw"]["perplexity"]) < 1e-3
    code, out, err = run_cli(capsys, "eval", project / "out" / "exl2-4.0bpw", "--text", project / "eval.txt",
                             "--window", "64", "--json", "--device", "cpu")
    assert code == 0 and abs(json.loads(out)["perplexity"] - rows["exl2-4.0bpw"]["perplexity"]) < 1e-3, err


@pytest.mark.slow
def test_a_parallel_sweep_writes_what_a_sequential_one_does(project, tmp_path, capsys):
    """`-j 2`: the variants are built two at a time in worker processes, with the keys and bytes of a sequential
    build, and the workers' messages reach the build's own output."""
    sequential = shutil.copytree(project, tmp_path / "sequential")
    fits = ["refine.steps=2", "tune.steps=2", "eval.text=null"]
    code, out, err = run_cli(capsys, project / "recipe.yaml", "-j", "2", *fits)
    assert code == 0, err
    assert "building exl2-3.0bpw/tuned " in err and "| exl2-4.0bpw |" in out
    # The sequential build, held by --frozen to the parallel build's lock: the artifacts' files must be the lock's.
    shutil.copy(project / "exlbuild.lock", sequential / "exlbuild.lock")
    code, _, err = run_cli(capsys, sequential / "recipe.yaml", "--frozen", *fits)
    assert code == 0, err
    assert ("built 14 targets; every artifact matches exlbuild.lock (not compared: measurement, "
            "exl2-3.0bpw/allocation, exl2-4.0bpw/allocation, report, whose numbers are the machine's)") in err

    def files(root: Path, rule: str) -> list[dict]:
        manifests = sorted((root / ".exlbuild/store" / rule).glob("*/manifest.json"))
        return [json.loads(m.read_text())["files"] for m in manifests]

    # On one machine those are the same bytes too (the report aside: it records the times of the passes).
    for rule in ("exl2-measurement", "exl2-allocation"):
        assert files(project, rule) == files(sequential, rule)


@pytest.mark.slow
def test_exllamav2_measurement_as_input(project, capsys):
    measurement = FIXTURES / "exllamav2_tiny_measurement.json"
    code, out, err = run_cli(capsys, project / "recipe.yaml", f"measurement.file={measurement}", "sweep.bits=[4.0]",
                             "eval.text=null")
    assert code == 0, err
    assert "building measurement (measurement)" in err
    strategy = json.loads(next((project / ".exlbuild/store/exl2-allocation").glob("*/data/strategy.json")).read_text())
    assert 3.9 < strategy["bits_per_weight"] <= 4.0
    assert strategy["objective_kind"] == "squared error (no sensitivity measured)"  # exllamav2 measures none


def test_measurement_of_another_model_is_refused(project, capsys):
    cfg = json.loads((project / "model" / "config.json").read_text())
    cfg["intermediate_size"] = 256  # now the measurement's costs do not fit this model
    (project / "model" / "config.json").write_text(json.dumps(cfg))
    measurement = FIXTURES / "exllamav2_tiny_measurement.json"
    code, out, err = run_cli(capsys, project / "recipe.yaml", f"measurement.file={measurement}", "eval.text=null")
    assert code == 1 and "measurement of another model" in err
    assert not list((project / ".exlbuild/store").glob("exl2-*/*"))


def test_bits_below_the_smallest_option(project, capsys):
    measurement = FIXTURES / "exllamav2_tiny_measurement.json"
    code, out, err = run_cli(capsys, project / "recipe.yaml", f"measurement.file={measurement}", "sweep.bits=[2.0]",
                             "eval.text=null")
    assert code == 1 and "bits 2.0" in err and "smallest achievable" in err
    assert not list((project / ".exlbuild/store").glob("exl2-allocation/*"))


def test_dimensions_exl2_cannot_store(project, capsys):
    shutil.rmtree(project / "model")
    tiny_model_with_tokenizer(project / "model", **{**TINY, "intermediate_size": 200})
    code, out, err = run_cli(capsys, project / "recipe.yaml", "eval.text=null")
    assert code == 1 and "intermediate_size = 200 cannot be stored as EXL2" in err


def test_unsupported_architecture(project, capsys):
    cfg = json.loads((project / "model" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (project / "model" / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(capsys, project / "recipe.yaml", "eval.text=null")
    assert code == 1 and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


def test_tokenizer_larger_than_the_embedding(project, capsys):
    make_bpe_dir(project / "model", vocab_size=1100)  # ids up to 1099, embedding rows 1024
    code, out, err = run_cli(capsys, project / "recipe.yaml", "eval.text=null")
    assert code == 1 and "1024" in err and str(project / "model") in err
