"""The rehearsal of a variant's fits (exlbuild.quant.exl2.rehearse) on a tiny random model, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from exlbuild.model.checkpoint import open_model
from exlbuild.quant.exl2 import rehearse
from exlbuild.quant.exl2.convert import layer_file
from exlbuild.recipe import RefineSpec, TuneSpec
from model_fixtures import tiny_model
from test_exl2_convert import SHAPE

ROPE = {"rope": {"scale": None, "alpha": None}}


def fit_params(spec: RefineSpec | TuneSpec) -> dict:
    """A fit node's params, as exlbuild.rules.exl2.variant_nodes makes them."""
    params = {k: v for k, v in vars(spec).items() if k != "below_bits"}
    return {**params, **ROPE}


def test_the_first_layer_model_holds_the_model_s_first_layer(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, num_hidden_layers=3, **SHAPE)
    small = rehearse.first_layer_model(model, tmp_path / "small")
    cfg, ckpt = open_model(small)
    assert cfg.num_hidden_layers == 1
    original = load_file(str(model / "model.safetensors"))
    for name in ckpt.names():
        assert torch.equal(ckpt.get(name, torch.float16), original[name].half()), name


def test_rehearsal_quantizes_and_refines_in_its_own_process(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    args = {"fit": "refined", "model_dir": str(model), "work": str(tmp_path / "work"), "length": 32,
            "params": fit_params(RefineSpec()), "head_bits": 6, "device": "cpu", "build": os.getpid()}
    subprocess.run([sys.executable, "-m", "exlbuild.quant.exl2.rehearse", json.dumps(args)], check=True, timeout=300)
    assert (tmp_path / "work" / "refined" / layer_file(0)).is_file()
    assert not (tmp_path / "work" / "refined" / layer_file(1)).exists()


def test_a_rehearsal_whose_build_was_killed_removes_its_own_files(tmp_path: Path) -> None:
    """A build killed with SIGKILL never ends its rehearsal: the rehearsal, orphaned, finishes and cleans up."""
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    work = tmp_path / "work"
    work.mkdir()
    args = {"fit": "tuned", "model_dir": str(model), "work": str(work), "length": 32,
            "params": fit_params(TuneSpec()), "head_bits": 6, "device": "cpu"}
    # A stand-in build that starts the rehearsal as start_rehearsal does and is gone at once.
    spawn = ("import json, os, subprocess, sys; spec = json.loads(sys.argv[1]); spec['build'] = os.getpid(); "
             "subprocess.Popen([sys.executable, '-m', 'exlbuild.quant.exl2.rehearse', json.dumps(spec)], "
             "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)")
    subprocess.run([sys.executable, "-c", spawn, json.dumps(args)], check=True, timeout=60)
    deadline = time.monotonic() + 300
    while work.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not work.exists()


def test_rehearsal_of_the_tuning(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    rehearse.rehearse("tuned", model, tmp_path / "work", 32, fit_params(TuneSpec()), 4, "cpu")
    assert (tmp_path / "work" / "tuned" / layer_file(0)).is_file()


def test_rehearsals_start_only_where_they_pay(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    start = dict(fit="tuned", model_dir=model, length=32, params=fit_params(TuneSpec()), head_bits=6)
    assert rehearse.start_rehearsal(**start, device="cpu") is None  # nothing to compile for the CPU
    monkeypatch.setenv("EXLBUILD_REHEARSE", "0")
    assert rehearse.start_rehearsal(**start, device="cuda") is None
    monkeypatch.delenv("EXLBUILD_REHEARSE")
    free = {"bytes": 1 << 20}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (free["bytes"], 80 << 30))
    assert rehearse.start_rehearsal(**start, device="cuda") is None  # the GPU too full to share
    free["bytes"] = 80 << 30
    monkeypatch.setattr(rehearse, "MAX_MODEL_BYTES", 1000)
    assert rehearse.start_rehearsal(**start, device="cuda") is None  # too large to be worth it


def test_a_started_rehearsal_runs_this_module_and_is_ended(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (80 << 30, 80 << 30))
    started = []

    class Process:  # stands in for subprocess.Popen: no GPU here to rehearse on
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.running, self.returncode = True, None

        def poll(self):
            return None if self.running else self.returncode

        def terminate(self):
            self.running, self.returncode = False, -15

        def wait(self):
            return self.returncode

    monkeypatch.setattr(rehearse.subprocess, "Popen", Process)
    stop = rehearse.start_rehearsal("refined", model, 2048, fit_params(RefineSpec()), 6, "cuda")
    argv = started[0]
    assert argv[:3] == [sys.executable, "-m", "exlbuild.quant.exl2.rehearse"]
    spec = json.loads(argv[3])
    assert (spec["fit"], spec["model_dir"], spec["length"], spec["device"]) == ("refined", str(model), 2048, "cuda")
    work = Path(spec["work"])
    assert work.is_dir()
    assert stop() is None  # ended by the build: nothing to report
    assert not work.exists()


def test_a_failed_rehearsal_says_why_when_ended(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model(tmp_path / "model", vocab_size=256, **SHAPE)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (80 << 30, 80 << 30))

    class Failed:  # a rehearsal process that has already exited with an error
        def __init__(self, argv, stderr, **kwargs):
            stderr.write(b"Traceback (most recent call last):\nRuntimeError: no CUDA GPUs are available\n")
            self.returncode = 1

        def poll(self):
            return self.returncode

        def wait(self):
            return self.returncode

    monkeypatch.setattr(rehearse.subprocess, "Popen", Failed)
    stop = rehearse.start_rehearsal("tuned", model, 2048, fit_params(TuneSpec()), 6, "cuda")
    assert stop() == "the tuned rehearsal failed (exit 1): RuntimeError: no CUDA GPUs are available"
