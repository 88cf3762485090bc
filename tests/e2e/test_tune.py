"""`mergebuild tune`: Optuna trials as incremental builds, resume, failing scorers, the score cache,
the best file, greedy soup. The real CLI in a subprocess on real safetensors files; the scorers are
tiny scripts whose optimum is known: the mean of one tensor should be 0.7 (or 0.5 for the soup)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergebuild.mergefile.search import Range
from mergebuild.tune.study import round_value
from tests.conftest import ROOT, SIM, build_json, load, mergefile, run_cli, small_model, write_model

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"  # the one tensor of block IN01

SCORE_PY = """
import os, sys, time
from pathlib import Path
from safetensors.numpy import load_file

calls = Path("calls.txt")
n = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
calls.write_text((calls.read_text() if calls.exists() else "") + f"{n}\\n")
if Path("hang").exists() and n == int(Path("hang").read_text()):
    Path("hanging").write_text("")
    time.sleep(120)
if Path("fail").exists() and str(n) in Path("fail").read_text().split():
    if n % 2:
        print("no score this time")
        sys.exit(0)
    else:
        print("boom: the scorer broke", file=sys.stderr)
        sys.exit(3)
with open("scored.txt", "a") as f:
    f.write(f"{sys.argv[1]} {os.environ['MERGEBUILD_OUTPUT']}\\n")
t = load_file(sys.argv[1])["__KEY__"].astype("float64")
print("epoch 1/1 done")
print("score", -abs(t.mean() - 0.7))
""".replace("__KEY__", KEY)

SCORER_MODULE = """
import time
from pathlib import Path
from safetensors.numpy import load_file

def score(path):
    with open("calls.txt", "a") as f:
        f.write(path + "\\n")
    if Path("hang").exists() and len(Path("calls.txt").read_text().splitlines()) == int(Path("hang").read_text()):
        Path("hanging").write_text("")
        time.sleep(120)
    t = load_file(path)["__KEY__"].astype("float64")
    return -abs(t.mean() - __TARGET__)

def broken(path):
    raise RuntimeError("no GPU here")
""".replace("__KEY__", KEY)

TUNE = """
# searching one block of a weighted sum
[models.a]
path = "models/a.safetensors"
[models.b]
path = "models/b.safetensors"

[merges.mix]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = {alpha}   # the searched block
output = "out/mix.safetensors"

[tune]
target = "mix"
{scorer}
trials = {trials}
seed = {seed}
{extra}
"""

BLOCK = "{ default = 0.5, IN01 = { search = [0.0, 1.0] } }"
COMMAND = 'command = "{python} score.py {output}"'
PYTHON = 'python = "scorer:score"'


def project(tmp: Path, alpha=BLOCK, scorer=COMMAND, trials=3, seed=7, extra="", target=0.7) -> Path:
    """Models a and b differ only in IN01's tensor (all 0 in a, all 1 in b): weighted_sum puts the
    tensor's mean at IN01's alpha."""
    for name, value in (("a", 0.0), ("b", 1.0)):
        m = small_model(0, dtype=torch.float32)
        m[KEY] = torch.full((8, 8), value)
        write_model(tmp / "models" / f"{name}.safetensors", m)
    (tmp / "score.py").write_text(SCORE_PY)
    (tmp / "scorer.py").write_text(SCORER_MODULE.replace("__TARGET__", str(target)))
    mergefile(tmp / "mergefile.toml", TUNE.format(alpha=alpha, scorer=scorer, trials=trials, seed=seed, extra=extra))
    return tmp


def tune(*args, cwd: Path, code: int = 0) -> dict:
    proc = run_cli("tune", "--json", *args, cwd=cwd)
    assert proc.returncode == code, proc.stderr
    return json.loads(proc.stdout)


def calls(tmp: Path) -> int:
    return len((tmp / "calls.txt").read_text().splitlines())


def param(trial: dict) -> float:
    return trial["params"]["merges.mix.alpha.IN01"]


def test_resume_runs_only_the_missing_trials_and_each_recomputes_one_tensor(tmp_path):
    p = project(tmp_path, scorer=PYTHON, trials=3)
    first = tune(cwd=p)
    assert [t["number"] for t in first["trials"]] == [0, 1, 2]
    assert all(t["state"] == "COMPLETE" for t in first["trials"]) and calls(p) == 3
    second = tune("--trials", "6", cwd=p)
    trials = second["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4, 5] and calls(p) == 6  # 3 new, none repeated
    assert trials[:3] == first["trials"]
    assert len({param(t) for t in trials}) == 6
    # the cache: after the first build, a trial recomputes the one tensor of IN01 and reuses the rest
    assert trials[0]["computed"] > 1
    assert all(t["computed"] == 1 and t["reused"] == trials[0]["computed"] + trials[0]["reused"] - 1
               for t in trials[1:])
    for t in trials:
        assert abs(t["value"] + abs(param(t) - 0.7)) < 1e-6
    best = max(trials, key=lambda t: t["value"])
    assert second["best"] == {"number": best["number"], "params": best["params"], "value": best["value"]}
    # rerunning a finished study runs nothing
    assert tune("--trials", "6", cwd=p)["trials"] == trials and calls(p) == 6
    # the best file: the Mergefile with the value in place of the range, comments kept; it builds
    text = (p / "mergefile.best.toml").read_text()
    assert f"alpha = {{ default = 0.5, IN01 = {param(best)} }}   # the searched block" in text
    assert text.startswith("\n# searching one block of a weighted sum")
    build_json("-f", "mergefile.best.toml", cwd=p)
    assert abs(load(p / "out/mix.safetensors")[KEY].double().mean().item() - param(best)) < 1e-6
    assert not list(p.glob(".mergefile.*")), "hidden trial Mergefiles are removed"


def test_a_killed_study_resumes(tmp_path):
    p = project(tmp_path, scorer=PYTHON, trials=4)
    (p / "hang").write_text("2")  # the second scoring hangs: kill the study there
    env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_CACHE"}
    env.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(SIM)]))
    proc = subprocess.Popen([sys.executable, "-m", "mergebuild", "tune"], cwd=p, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (p / "hanging").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the scorer never hung"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (p / "hang").unlink()
    doc = tune(cwd=p)
    trials = doc["trials"]
    assert [t["number"] for t in trials] == list(range(5))
    assert trials[1]["state"] == "FAIL" and trials[1].get("interrupted") is True
    assert sum(t["state"] == "COMPLETE" for t in trials) == 4  # the interrupted trial does not count
    assert calls(p) == 2 + 3
    assert not list(p.glob(".mergefile.*")), "the killed run's hidden Mergefile is cleaned up"


def test_a_failing_scorer_fails_its_trial_and_the_study_goes_on(tmp_path):
    p = project(tmp_path, trials=4)
    (p / "fail").write_text("2 3")  # call 2 exits 3, call 3 prints no number
    proc = run_cli("tune", "--json", cwd=p)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert "exited with status 3" in trials[1]["error"] and "boom: the scorer broke" in trials[1]["stderr"]
    assert "no number" in trials[2]["error"]
    for t in (trials[0], trials[3]):  # the score is the last number printed
        assert abs(t["value"] + abs(param(t) - 0.7)) < 1e-6
    assert "trial 1" in proc.stderr and "boom: the scorer broke" in proc.stderr
    # a scorer that always fails: every trial FAIL, exit 1, no best file
    p2 = project(tmp_path / "broken", scorer='python = "scorer:broken"', trials=2)
    doc = tune(cwd=p2, code=1)
    assert [t["state"] for t in doc["trials"]] == ["FAIL", "FAIL"] and doc["best"] is None
    assert "RuntimeError: no GPU here" in doc["trials"][0]["error"]
    assert not (p2 / "mergefile.best.toml").exists()


def test_same_seed_same_params_and_plots(tmp_path):
    two = "{ default = { search = [0.0, 1.0] }, IN01 = { search = [0.0, 1.0] } }"
    runs = []
    for name in ("one", "two"):
        p = project(tmp_path / name, alpha=two, scorer=PYTHON, trials=4, seed=3)
        runs.append(tune(*(["--plot", "plots"] if name == "one" else []), cwd=p))
    params = [[t["params"] for t in doc["trials"]] for doc in runs]
    assert params[0] == params[1] and len({json.dumps(x) for x in params[0]}) == 4
    assert set(params[0][0]) == {"merges.mix.alpha.default", "merges.mix.alpha.IN01"}
    assert (tmp_path / "one/plots/history.png").stat().st_size > 0
    assert (tmp_path / "one/plots/importances.png").stat().st_size > 0


def test_grid_score_cache_and_apply(tmp_path):
    grid = "{ default = 0.5, IN01 = { search = [0.0, 1.0], step = 0.25 } }"
    p = project(tmp_path, alpha=grid, scorer=PYTHON, trials=50, extra='sampler = "grid"')
    doc = tune("--apply", cwd=p)
    assert sorted(param(t) for t in doc["trials"]) == [0.0, 0.25, 0.5, 0.75, 1.0]  # the grid, once
    assert doc["best"]["params"] == {"merges.mix.alpha.IN01": 0.75}
    assert "IN01 = 0.75 }" in (p / "mergefile.toml").read_text()
    assert load(p / "out/mix.safetensors")[KEY].mean().item() == 0.75  # the output holds the best point
    assert calls(p) == 5
    # a repeated point costs nothing: the same tensors under another name are not built nor scored
    mergefile(p / "mergefile.toml", TUNE.format(alpha="{ default = 0.5, IN01 = { choice = [0.25, 0.75] } }",
                                                scorer=PYTHON, trials=4, seed=1, extra=""))
    doc = tune(cwd=p)
    assert calls(p) == 5
    assert all(t["score_cached"] and t["computed"] == 0 for t in doc["trials"])


def test_greedy_soup_keeps_the_ingredients_that_help(tmp_path):
    text = ""
    for name, value in (("zero", 0.0), ("one", 1.0), ("near", 0.45), ("far", 0.6)):
        m = small_model(0, dtype=torch.float32)
        m[KEY] = torch.full((8, 8), value)
        write_model(tmp_path / "models" / f"{name}.safetensors", m)
        text += f'[models.{name}]\npath = "models/{name}.safetensors"\n'
    (tmp_path / "scorer.py").write_text(SCORER_MODULE.replace("__TARGET__", "0.5"))
    text += ('[merges.mix]\nmethod = "weighted_sum"\ninputs = ["zero", "one"]\nalpha = 0.5\n'
             '[soup]\ningredients = ["zero", "one", "near", "far"]\noutput = "out/soup.safetensors"\n'
             'python = "scorer:score"\n')
    mergefile(tmp_path / "mergefile.toml", text)
    doc = tune("--greedy-soup", cwd=tmp_path)
    # alone: near -0.05, far -0.1, zero and one -0.5; near+far -0.025 (kept); +zero, +one worse
    assert doc["ingredients"] == ["near", "far"]
    assert abs(doc["value"] + 0.025) < 1e-6 and abs(doc["scores"]["near"] + 0.05) < 1e-6
    assert [s["accepted"] for s in doc["steps"]] == [True, True, False, False]
    assert abs(load(tmp_path / "out/soup.safetensors")[KEY].mean().item() - 0.525) < 1e-6
    scored = [Path(line) for line in (tmp_path / "calls.txt").read_text().splitlines()]
    candidates = {path.resolve() for path in scored if "models" not in path.parts}
    assert len(scored) == 7 and len(candidates) == 1  # 4 ingredients alone, then 3 soups: in tune's folder
    assert candidates.pop().parent.parent == (tmp_path / ".cache-tune").resolve()
    lineage = run_cli("lineage", "out/soup.safetensors", cwd=tmp_path, check=True).stdout
    assert "near.safetensors" in lineage and "far.safetensors" in lineage and "zero" not in lineage


def test_tune_table_errors_are_located(tmp_path):
    p = project(tmp_path, extra='sampler = "annealing"')
    proc = run_cli("tune", cwd=p)
    assert proc.returncode == 2 and "[tune] sampler: expected one of tpe, random, grid, cmaes" in proc.stderr
    mergefile(p / "mergefile.toml", TUNE.format(alpha=BLOCK, scorer=COMMAND, trials=3, seed=1, extra="")
              .replace('target = "mix"', 'target = "mx"'))
    proc = run_cli("tune", cwd=p)
    assert proc.returncode == 2 and "[tune] target: 'mx' is not a merge (did you mean 'mix'?)" in proc.stderr
    proc = run_cli(cwd=p)  # a plain build points at tune
    assert proc.returncode == 2 and "mergebuild tune" in proc.stderr


WATCH = """
import hashlib
from pathlib import Path
from safetensors.numpy import load_file

def score(path):
    shared = hashlib.sha256(Path("out/mix.safetensors").read_bytes()).hexdigest()
    with open("watch.txt", "a") as f:
        f.write(f"{path} {shared}\\n")
    return -abs(load_file(path)["__KEY__"].astype("float64").mean() - 0.7)
""".replace("__KEY__", KEY)

OTHER = """
[models.a]
path = "models/a.safetensors"
[models.b]
path = "models/b.safetensors"
[merges.other]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.1
output = "out/mix.safetensors"   # the tuned target's file
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trials_never_write_the_targets_output_nor_another_mergefiles(tmp_path):
    p = project(tmp_path, scorer='python = "watch:score"', trials=3)
    (p / "watch.py").write_text(WATCH)
    mergefile(p / "other.toml", OTHER)  # another Mergefile on the same cache, whose target is the same file
    build_json("-f", "other.toml", cwd=p)
    before = sha256(p / "out/mix.safetensors")
    doc = tune(cwd=p)
    rows = [line.split() for line in (p / "watch.txt").read_text().splitlines()]
    assert len(rows) == 3 and [shared for _, shared in rows] == [before] * 3  # untouched during the trials
    scored = {Path(path).resolve() for path, _ in rows}
    assert len(scored) == 1  # every trial writes (and the scorer reads) tune's own file, beside the cache
    trial = scored.pop()
    assert trial.name == "trial.safetensors" and trial.parent.parent == (p / ".cache-tune").resolve()
    # at the end the target's own output holds the best point, as before
    best = param(doc["best"])
    assert abs(load(p / "out/mix.safetensors")[KEY].double().mean().item() - best) < 1e-7


def significant(value: float, digits: int) -> bool:
    return float(f"{value:.{digits}g}") == value


def test_values_are_rounded_before_they_are_built(tmp_path):
    # no step: 4 significant digits, in --json, the table, the best file and --apply
    p = project(tmp_path / "free", trials=3)
    proc = run_cli("tune", "--json", "--apply", cwd=p)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    values = [param(t) for t in doc["trials"]]
    assert all(significant(v, 4) for v in values) and len(set(values)) == 3
    for t in doc["trials"]:  # what was built is the rounded number (float32 tensors: ~6e-8 off)
        assert abs(t["value"] + abs(param(t) - 0.7)) < 1e-7
        assert f"mix.alpha.IN01={param(t)}  score" in proc.stderr  # the table shows it rounded
    best = param(doc["best"])
    for name in ("mergefile.best.toml", "mergefile.toml"):
        assert f"IN01 = {best} }}" in (p / name).read_text()
    # the command scorer got the trial's output, as {output} and as MERGEBUILD_OUTPUT
    given = [line.split() for line in (p / "scored.txt").read_text().splitlines()]
    assert len(given) == 3 and all(a == b and Path(a).name == "trial.safetensors" for a, b in given)
    # with a step: multiples of the step, exactly as written
    grid = "{ default = 0.5, IN01 = { search = [0.0, 1.0], step = 0.05 } }"
    p = project(tmp_path / "step", alpha=grid, scorer=PYTHON, trials=6)
    doc = tune("--apply", cwd=p)
    allowed = {float(f"{k * 0.05:.2f}") for k in range(21)}  # 0.0, 0.05, ..., 0.35 (not 0.35000000000000003)
    assert {param(t) for t in doc["trials"]} <= allowed
    best = param(doc["best"])
    assert re.search(rf"IN01 = {re.escape(repr(best))} }}", (p / "mergefile.toml").read_text())


def test_round_value():
    free = Range("merges.m.alpha", "m", "alpha", None, 0.0, 1.0)
    assert round_value(free, 0.453498858948) == 0.4535
    assert round_value(free, 0.00012345678) == 0.0001235
    assert round_value(Range("merges.m.alpha", "m", "alpha", None, 0.0, 0.12345), 0.123449) == 0.1234
    assert round_value(Range("merges.m.alpha", "m", "alpha", None, 0.0, 0.12345), 0.1234499999) <= 0.12345
    stepped = Range("merges.m.alpha", "m", "alpha", None, 0.05, 0.95, step=0.1)
    assert round_value(stepped, 0.05 + 3 * 0.1) == 0.35 and round_value(stepped, 0.6499999999) == 0.65
    assert round_value(Range("merges.m.k", "m", "k", None, 1, 9, step=2), 5) == 5  # an integer stays one
    assert round_value(Range("merges.m.a", "m", "a", None, choices=(0.2, 0.5)), 0.5) == 0.5
