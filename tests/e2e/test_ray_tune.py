"""`mergebuild tune --ray`: trials evaluated in parallel by workers of a local Ray cluster
(loopback; tests/conftest.py ray_cluster). The same grid and best value as a serial run, trials
that overlap in time on different worker processes, and a worker killed mid-trial losing only
that trial's work (it is run again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SIM, run_cli
from tests.e2e.test_tune import KEY, param, project

pytest.importorskip("ray")

GRID = "{ default = 0.5, IN01 = { search = [0.0, 1.0], step = 0.25 } }"  # 5 points

SLOW_SCORER = """
import os, time
from pathlib import Path
from safetensors.numpy import load_file

def score(path):
    if Path("victim").exists() and not Path("victim.pid").exists():  # the first one to get here is killed
        Path("victim.pid").write_text(str(os.getpid()))
        time.sleep(60)
    time.sleep(0.6)  # a scorer's work (an evaluation): what parallel trials overlap
    t = load_file(path)["__KEY__"].astype("float64")
    return -abs(t.mean() - 0.7)
""".replace("__KEY__", KEY)


def grid_project(tmp: Path) -> Path:
    p = project(tmp, alpha=GRID, scorer='python = "slow:score"', trials=50, extra='sampler = "grid"')
    (p / "slow.py").write_text(SLOW_SCORER)
    return p


def tune(p: Path, *args) -> dict:
    proc = run_cli("tune", "--json", *args, cwd=p)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def overlap(a: dict, b: dict) -> bool:
    return a["started"] < b["finished"] and b["started"] < a["finished"]


def test_parallel_trials_search_the_same_grid_and_overlap(tmp_path, ray_cluster):
    serial = tune(grid_project(tmp_path / "serial"))
    parallel = tune(grid_project(tmp_path / "ray"), f"--ray={ray_cluster}", "--parallel", "2")
    assert sorted(param(t) for t in parallel["trials"]) == sorted(param(t) for t in serial["trials"]) \
        == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parallel["best"]["value"] == serial["best"]["value"]
    assert param(parallel["best"]) == param(serial["best"]) == 0.75
    assert {t["state"] for t in parallel["trials"]} == {"COMPLETE"}
    runs = [t["ray"] for t in parallel["trials"]]
    assert len({r["pid"] for r in runs}) == 2  # two worker processes
    assert any(overlap(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]), runs
    # each trial an incremental build against the shared cache: one tensor per point after the first
    assert sum(t["computed"] for t in parallel["trials"]) <= 1 + 4 + 13  # IN01, plus the first build's rest


@pytest.mark.slow
def test_a_worker_killed_mid_trial_loses_only_its_trial(tmp_path, ray_cluster):
    p = grid_project(tmp_path)
    (p / "victim").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_CACHE"}
    env.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(SIM)]))
    proc = subprocess.Popen([sys.executable, "-m", "mergebuild", "tune", "--json", "-v", f"--ray={ray_cluster}",
                             "--parallel", "2"], cwd=p, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (p / "victim.pid").exists() or not (p / "victim.pid").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        victim = int((p / "victim.pid").read_text())
        assert victim != proc.pid
        os.kill(victim, signal.SIGKILL)  # the worker process, mid-trial
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert sorted(param(t) for t in doc["trials"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {t["state"] for t in doc["trials"]} == {"COMPLETE"}
    retried = [t for t in doc["trials"] if t["ray"]["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["ray"]["pid"] != victim
    assert param(doc["best"]) == 0.75


def test_parallel_without_ray_and_bad_ray_fields_are_one_line(tmp_path):
    p = grid_project(tmp_path)
    proc = run_cli("tune", "--parallel", "2", cwd=p)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mergebuild: error: --parallel runs trials on Ray workers: give --ray too"
    (p / "mergefile.toml").write_text((p / "mergefile.toml").read_text() + "gpus_per_trial = -1\n")
    proc = run_cli("tune", "--ray", cwd=p)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "[tune] gpus_per_trial: expected a number >= 0" in proc.stderr
