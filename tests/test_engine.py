"""The engine on small fake rules: keys, staleness and why, publishing, resume after SIGKILL, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import engine_graph
from exlbuild.errors import ExlbuildError
from exlbuild.graph import explain
from exlbuild.hashing import HashCache
from exlbuild.runner import BUILT, REUSED, STALE, UP_TO_DATE, status
from exlbuild.store import Store

SCRIPT = Path(engine_graph.__file__)


@pytest.fixture
def env(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "words.txt").write_text("alpha beta gamma")
    log = tmp_path / "runs.log"
    monkeypatch.setenv("ENGINE_TEST_LOG", str(log))
    return src, tmp_path / "store", log


def runs(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def states(outcomes) -> dict[str, str]:
    return {o.node.name: o.state for o in outcomes}


def resolved(store_root: Path, src: Path, **kw):
    store = Store(store_root)
    graph = engine_graph.make_graph(src, **kw)
    graph.resolve(store.hashes)
    return store, graph


def record(graph) -> dict:
    """What the lock file keeps of a build: enough for `explain`."""
    return {n.name: {"key": n.key, "key_inputs": n.key_inputs} for n in graph.nodes}


def test_build_then_noop(env):
    src, store_root, log = env
    first = engine_graph.run(store_root, src)
    assert states(first) == {"src": UP_TO_DATE, "text": BUILT, "upper": BUILT, "slow": BUILT, "joined": BUILT}
    assert sorted(runs(log)) == ["joined", "slow", "text", "upper"]
    second = engine_graph.run(store_root, src)
    assert set(states(second).values()) == {UP_TO_DATE}
    assert len(runs(log)) == 4  # nothing ran again
    store, graph = resolved(store_root, src)
    joined = graph["joined"]
    assert (store.data_dir("joined", joined.key) / "joined.txt").read_text() == "alpha beta gamma|ALPHA BETA GAMMA|1"
    assert sorted(p.name for p in store.artifact_dir("joined", joined.key).iterdir()) == ["data", "manifest.json"]
    manifest = store.manifest("joined", joined.key)
    assert manifest["inputs"]["text"] == graph["text"].key
    assert manifest["files"]["joined.txt"]["size"] == len("alpha beta gamma|ALPHA BETA GAMMA|1")
    assert manifest["environment"]["python"]


def test_a_rule_sees_its_inputs_data_and_their_manifests_apart(env, monkeypatch):
    src, store_root, _ = env
    seen = {}

    def look(self, ctx):
        seen["files"] = sorted(p.name for p in ctx.inputs["text"].iterdir())
        seen["manifest"] = ctx.manifests["text"]
        (ctx.out / "upper.txt").write_text("")

    monkeypatch.setattr(engine_graph.Upper, "run", look)
    engine_graph.run(store_root, src)
    store, graph = resolved(store_root, src)
    assert seen["files"] == ["text.txt"]  # no manifest among the rule's files
    assert seen["manifest"] == store.manifest("text", graph["text"].key)


def old_layout_store(store_root: Path, src: Path) -> None:
    """A store as an exlbuild before the data/ directory wrote it: the rule's files beside manifest.json."""
    engine_graph.run(store_root, src)
    for artifact in store_root.glob("store/*/*"):
        data = artifact / "data"
        for f in data.iterdir():
            f.rename(artifact / f.name)
        data.rmdir()
    (store_root / "layout.json").unlink()


def test_a_new_store_records_its_layout(tmp_path):
    Store(tmp_path / "store").close()
    assert json.loads((tmp_path / "store" / "layout.json").read_text()) == {"version": 2}


def test_a_store_of_the_old_layout_is_refused_until_deleted(env):
    src, store_root, log = env
    old_layout_store(store_root, src)
    with pytest.raises(ExlbuildError, match="earlier exlbuild .*store layout 1.*delete .*store and build again"):
        Store(store_root)
    shutil.rmtree(store_root / "store")
    again = engine_graph.run(store_root, src)
    assert set(states(again).values()) == {UP_TO_DATE, BUILT}
    assert runs(log).count("text") == 2  # rebuilt into the new layout, never read from the old one


def test_a_store_of_a_newer_layout_is_refused(tmp_path):
    (tmp_path / "layout.json").write_text('{"version": 3}')
    with pytest.raises(ExlbuildError, match="newer exlbuild .*store layout 3"):
        Store(tmp_path)


def stale_after(src, store_root, change, **kw) -> dict[str, list[str]]:
    store, before = resolved(store_root, src)
    previous = record(before)
    change()
    store, graph = resolved(store_root, src, **kw)
    return {st.node.name: st.reasons for st in status(graph, store, previous) if st.state == STALE}


def test_param_change_is_stale_downstream_only(env):
    src, store_root, _ = env
    engine_graph.run(store_root, src)
    stale = stale_after(src, store_root, lambda: None, sep="-")
    assert set(stale) == {"text", "upper", "joined"}
    assert stale["text"] == ['sep: " " -> "-"']
    assert stale["upper"][0].startswith("input 'text' changed")


def test_source_content_change(env):
    src, store_root, _ = env
    engine_graph.run(store_root, src)
    stale = stale_after(src, store_root, lambda: (src / "words.txt").write_text("delta"))
    assert set(stale) == {"text", "upper", "joined"}  # slow does not read the source
    assert stale["text"][0].startswith("input 'src' changed")


def test_rule_version_change(env, monkeypatch):
    src, store_root, _ = env
    engine_graph.run(store_root, src)
    store, before = resolved(store_root, src)
    monkeypatch.setattr(engine_graph.Upper, "version", 2)
    store, graph = resolved(store_root, src)
    stale = {st.node.name: st.reasons for st in status(graph, store, record(before)) if st.state == STALE}
    assert set(stale) == {"upper", "joined"}
    assert stale["upper"] == ["rule upper v1 -> upper v2"]


def test_explain_new_and_missing(env):
    src, store_root, _ = env
    store, graph = resolved(store_root, src)
    assert explain(graph["text"], None) == ["never built"]
    engine_graph.run(store_root, src)
    store, graph = resolved(store_root, src)
    store.remove("upper", graph["upper"].key)
    st = {s.node.name: s for s in status(graph, store, record(graph))}
    assert st["upper"].state == STALE and "missing from the store" in st["upper"].reasons[0]
    assert st["joined"].state == UP_TO_DATE  # its key does not change: upper's key is the same


def test_failed_rule_publishes_nothing(env, monkeypatch):
    src, store_root, _ = env

    def boom(self, ctx):
        (ctx.out / "partial.txt").write_text("half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine_graph.Upper, "run", boom)
    from exlbuild.runner import BuildFailed

    with pytest.raises(BuildFailed) as e:
        engine_graph.run(store_root, src)
    assert [o.state for o in e.value.outcomes][-1] == "failed"
    store, graph = resolved(store_root, src)
    assert not store.artifact_dir("upper", graph["upper"].key).exists()
    assert store.has("text", graph["text"].key)  # what was finished before stays


def test_a_rule_rehearses_its_stale_node_once_its_inputs_are_there(env, monkeypatch):
    src, store_root, log = env
    asked = []

    def rehearse(self, node, ready):
        asked.append(sorted(ready))
        if "text" not in ready:
            return None
        engine_graph.log_run("rehearsal")
        return lambda: engine_graph.log_run("rehearsal-ended")

    monkeypatch.setattr(engine_graph.Upper, "rehearse", rehearse)
    engine_graph.run(store_root, src)
    order = runs(log)
    # Started as soon as its input was built, before the rule itself ran; ended once, when the build ended.
    assert order.index("text") < order.index("rehearsal") < order.index("upper")
    assert order[-1] == "rehearsal-ended" and order.count("rehearsal") == 1
    assert asked[0] == [] and asked[-1] == ["text"]
    asked.clear()
    engine_graph.run(store_root, src)  # nothing stale: nothing rehearsed
    assert asked == [] and runs(log).count("rehearsal") == 1


def test_a_failed_rehearsal_is_reported_and_the_build_goes_on(env, monkeypatch, capsys):
    src, store_root, _ = env
    monkeypatch.setattr(engine_graph.Upper, "rehearse", lambda self, node, ready: lambda: "the upper rehearsal failed")
    outcomes = engine_graph.run(store_root, src)
    assert all(o.state in (BUILT, UP_TO_DATE) for o in outcomes)
    assert "note: the upper rehearsal failed" in capsys.readouterr().out


def test_a_failed_build_ends_its_rehearsals(env, monkeypatch):
    src, store_root, log = env
    monkeypatch.setattr(engine_graph.Upper, "rehearse",
                        lambda self, node, ready: lambda: engine_graph.log_run("rehearsal-ended"))
    monkeypatch.setenv("ENGINE_TEST_UPPER_FAILS", "1")
    from exlbuild.runner import BuildFailed

    with pytest.raises(BuildFailed):
        engine_graph.run(store_root, src)
    assert runs(log)[-1] == "rehearsal-ended"


def test_parallel_build_runs_independent_targets_at_once(env, monkeypatch, tmp_path):
    """-j 2: `slow` (no inputs but the source) and `text` run at the same time in two worker processes (`text` waits
    for `slow` to start: a build one at a time would fail); everything is built once, with the keys and bytes of
    a sequential build."""
    src, store_root, log = env
    kw = {"steps": 8, "step_seconds": 0.5}
    monkeypatch.setenv("ENGINE_TEST_RENDEZVOUS", str(tmp_path / "slow-started"))
    outcomes = engine_graph.run(store_root, src, jobs=2, **kw)
    assert states(outcomes) == {"src": UP_TO_DATE, "text": BUILT, "upper": BUILT, "slow": BUILT, "joined": BUILT}
    pids = {name: int(pid) for name, pid, *_ in (line.split() for line in log.read_text().splitlines())}
    assert os.getpid() not in pids.values() and pids["slow"] != pids["text"]
    monkeypatch.delenv("ENGINE_TEST_RENDEZVOUS")
    sequential = engine_graph.run(store_root.with_name("sequential"), src, **kw)
    store, graph = resolved(store_root, src, **kw)
    other = Store(store_root.with_name("sequential"))
    for outcome in sequential[1:]:
        node = outcome.node
        assert graph[node.name].key == node.key
        assert store.manifest(node.rule_name, node.key)["files"] == other.manifest(node.rule_name, node.key)["files"]
    store.close()
    other.close()


def test_parallel_build_stops_at_a_failure(env, monkeypatch):
    """A failing target in a worker: the error comes back, nothing of it is published, what was started beside it
    finishes and stays, its dependents are not built."""
    src, store_root, log = env
    monkeypatch.setenv("ENGINE_TEST_UPPER_FAILS", "1")
    from exlbuild.runner import BuildFailed

    with pytest.raises(BuildFailed) as e:
        engine_graph.run(store_root, src, jobs=2, steps=4, step_seconds=0.25)
    assert "upper failed on purpose" in str(e.value.cause)
    assert e.value.outcomes[-1].node.name == "upper" and e.value.outcomes[-1].state == "failed"
    store, graph = resolved(store_root, src, steps=4, step_seconds=0.25)
    assert not store.has("upper", graph["upper"].key) and not store.has("joined", graph["joined"].key)
    assert store.has("text", graph["text"].key) and store.has("slow", graph["slow"].key)
    assert "joined" not in runs(log)


def _spawn(store_root: Path, src: Path, own_group: bool = False, **kw) -> subprocess.Popen:
    """engine_graph.py building in a subprocess; `own_group`: in a process group of its own, as a terminal's job,
    with the interrupt's default action (so that a SIGINT to the group reaches it and its workers)."""
    group = {"start_new_session": True, "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(store_root), str(src), json.dumps(kw)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            **(group if own_group else {}))


def _wait_for_checkpoints(state: Path, steps: int) -> None:
    """Until the slow rule has checkpointed `steps` steps in `state`."""
    deadline = time.time() + 60
    while len(list(state.glob("step-*"))) < steps:
        assert time.time() < deadline, "the slow rule never started"
        time.sleep(0.05)


def _final_states(proc: subprocess.Popen) -> dict[str, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_sigkill_mid_rule_then_resume(env):
    src, store_root, log = env
    kw = {"steps": 6, "step_seconds": 0.3}
    proc = _spawn(store_root, src, **kw)
    store, graph = resolved(store_root, src, **kw)
    key = graph["slow"].key
    state = store.work_dir("slow", key) / "state"
    _wait_for_checkpoints(state, 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.has("slow", key)  # never visible as published
    assert not store.artifact_dir("slow", key).exists()
    done_before = len(list(state.glob("step-*")))

    again = engine_graph.run(store_root, src, **kw)
    assert states(again)["slow"] == BUILT and states(again)["joined"] == BUILT
    starts = [line for line in log.read_text().splitlines() if line.startswith("slow")]
    assert starts[0].endswith("start=0") and starts[1].endswith(f"start={done_before}")
    assert (store.data_dir("slow", key) / "count.txt").read_text() == "6"
    assert not store.work_dir("slow", key).exists()  # checkpoints go once published


def test_parallel_build_interrupted_then_resumed(env):
    """Ctrl-C (SIGINT to the build's process group) during a -j 2 build: the target being built stops
    unpublished, the idle worker lets the signal pass (it died with a traceback of its own before), and the next
    build resumes from the checkpoints."""
    src, store_root, log = env
    kw = {"steps": 40, "step_seconds": 0.1}
    proc = _spawn(store_root, src, own_group=True, jobs=2, **kw)
    store, graph = resolved(store_root, src, **kw)
    key = graph["slow"].key
    state = store.work_dir("slow", key) / "state"
    _wait_for_checkpoints(state, 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "recv_bytes" not in err  # no worker died waiting on its task queue
    assert not store.has("slow", key) and not store.has("joined", graph["joined"].key)
    done_before = len(list(state.glob("step-*")))
    again = engine_graph.run(store_root, src, jobs=2, **kw)
    assert states(again)["slow"] == BUILT and states(again)["joined"] == BUILT
    starts = [line for line in log.read_text().splitlines() if line.startswith("slow")]
    assert starts[0].endswith("start=0") and starts[1].endswith(f"start={done_before}") and done_before >= 3


def test_two_concurrent_builds_build_each_artifact_once(env):
    src, store_root, log = env
    kw = {"steps": 4, "step_seconds": 0.25}
    a = _spawn(store_root, src, **kw)
    b = _spawn(store_root, src, **kw)
    sa, sb = _final_states(a), _final_states(b)
    assert sorted(runs(log)) == ["joined", "slow", "text", "upper"]  # each rule ran exactly once
    for name in ("text", "upper", "slow", "joined"):
        assert {sa[name], sb[name]} <= {BUILT, REUSED, UP_TO_DATE}
        assert BUILT in (sa[name], sb[name])
    store, graph = resolved(store_root, src, **kw)
    assert (store.data_dir("joined", graph["joined"].key) / "joined.txt").read_text().endswith("|4")


def test_a_fresh_hash_cache_opened_by_many_at_once(tmp_path):
    # Two builds starting on a new store both set up its SQLite hash cache; without the setup lock about one
    # opening in 200 failed with "database is locked" (seen in CI). Threads race like processes here.
    errors = []

    def open_cache(db: Path) -> None:
        try:
            HashCache(db).close()
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    for i in range(30):
        db = tmp_path / str(i) / "hashes.sqlite"
        threads = [threading.Thread(target=open_cache, args=(db,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_lock_of_a_dead_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from exlbuild.store import Store\n"
        "s = Store(Path(sys.argv[1]))\n"
        "with s.lock('k'):\n"
        "    print('held', flush=True); time.sleep(600)\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    store = Store(tmp_path)
    waited = []
    holder_killed = False

    def on_wait(who: str) -> None:
        nonlocal holder_killed
        waited.append(who)
        os.kill(holder.pid, signal.SIGKILL)  # the owner dies while we wait
        holder_killed = True

    t0 = time.time()
    with store.lock("k", on_wait=on_wait):
        pass
    holder.wait()
    assert holder_killed and f"process {holder.pid}" in waited[0]
    assert time.time() - t0 < 30


def test_export_dir_follows_the_artifact(env, tmp_path, capsys):
    src, store_root, _ = env
    out = tmp_path / "published" / "joined"
    engine_graph.run(store_root, src, export=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["joined.txt"]  # no manifest
    assert (out / "joined.txt").read_text() == "alpha beta gamma|ALPHA BETA GAMMA|1"
    assert "exported joined" in capsys.readouterr().out

    engine_graph.run(store_root, src, export=str(out))
    assert "exported" not in capsys.readouterr().out  # already there: nothing copied

    (out / "joined.txt").unlink()
    (out / "stray.txt").write_text("x")
    engine_graph.run(store_root, src, export=str(out))
    assert "exported joined" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["joined.txt"]

    engine_graph.run(store_root, src, sep="+", export=str(out))
    assert (out / "joined.txt").read_text().startswith("alpha+beta+gamma|")
