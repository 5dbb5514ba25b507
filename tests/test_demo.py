"""End to end: the demo recipe's import and calibration targets through the CLI, killed mid-rule and resumed.

The demo's EXL2 variants are left out here (`sweep.bits=[]`): on a 2-core CPU they take minutes, and
tests/test_exl2_build.py builds the same rules on a tiny model; bench/results/demo-cpu.md times the whole demo.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ONLY_IMPORT_AND_CALIBRATION = ("sweep.bits=[]", "eval.text=null")


def exlbuild(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exlbuild.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_demo_killed_mid_rule_resumes_and_verifies(tmp_path):
    recipe = tmp_path / "demo.yaml"
    shutil.copy(REPO / "recipes" / "demo.yaml", recipe)
    proc = subprocess.Popen([sys.executable, "-m", "exlbuild.cli", str(recipe), *ONLY_IMPORT_AND_CALIBRATION],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = tmp_path / ".exlbuild" / "work" / "import-gguf"
    deadline = time.time() + 120
    while not any(work.glob("*/out/data/*")):  # the import rule has started writing
        assert proc.poll() is None and time.time() < deadline, "the import never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any((tmp_path / ".exlbuild" / "store").glob("*/*")), "a partial artifact was published"

    done = exlbuild(str(recipe), *ONLY_IMPORT_AND_CALIBRATION)
    assert done.returncode == 0, done.stderr
    assert "building model (model): never built" in done.stderr
    status = json.loads(exlbuild("status", str(recipe), "--json", *ONLY_IMPORT_AND_CALIBRATION).stdout)
    states = {t["name"]: t["state"] for t in status["targets"]}
    assert states == {"model": "up to date", "calibration": "up to date", "calibration-measurement": "up to date"}
    model_dir = Path(next(t["out_dir"] for t in status["targets"] if t["name"] == "model"))
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json"]  # the store's manifest is not here
    verified = exlbuild("verify", str(recipe), *ONLY_IMPORT_AND_CALIBRATION)
    assert verified.returncode == 0 and "verify: OK" in verified.stdout

    again = exlbuild(str(recipe), *ONLY_IMPORT_AND_CALIBRATION)
    assert again.returncode == 0 and "building" not in again.stderr and again.stdout.count("up to date") == 3
