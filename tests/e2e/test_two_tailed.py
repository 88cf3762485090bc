"""tail_average with k = "auto": the two-tailed rule (Melis 2022) replayed over the inputs, each
candidate an incremental build: checked against the rule written out here on the checkpoints
themselves (float64), incremental replay after one more checkpoint (counted tensors), the
chosen tail in the summary, --json and the lineage, and hostile scorers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import build_json, run_cli, write_model

SCORE = """
from safetensors.torch import load_file

def score(path):
    t = load_file(path)
    return -float(t["layers.0.weight"].double().pow(2).sum() + t["layers.0.bias"].double().pow(2).sum())
"""


def _checkpoints(n: int, seed: int = 0) -> list[dict]:
    """A noisy run converging to 0: the mean of a well-chosen tail beats the last checkpoint."""
    g = torch.Generator().manual_seed(seed)
    return [{"layers.0.weight": 3.0 * 0.6 ** i + 0.5 * torch.randn(4, 4, generator=g),
             "layers.0.bias": 0.5 * torch.randn(4, generator=g)} for i in range(n)]


def _score(state: dict) -> float:
    return -float(state["layers.0.weight"].double().pow(2).sum() + state["layers.0.bias"].double().pow(2).sum())


def _project(tmp_path: Path, n: int, extra: str = 'scorer = { python = "score:score" }', seed: int = 0) -> Path:
    for i, state in enumerate(_checkpoints(n, seed)):
        write_model(tmp_path / f"c{i}.safetensors", state)
    (tmp_path / "score.py").write_text(textwrap.dedent(SCORE))
    _mergefile(tmp_path, n, extra)
    return tmp_path


def _mergefile(tmp_path: Path, n: int, extra: str) -> None:
    models = "".join(f'[models.c{i}]\npath = "c{i}.safetensors"\n' for i in range(n))
    names = ", ".join(f'"c{i}"' for i in range(n))
    (tmp_path / "mergefile.toml").write_text(
        f'{models}\n[merges.avg]\nmethod = "tail_average"\ninputs = [{names}]\nk = "auto"\n{extra}\n'
        'output = "out/avg.safetensors"\n')


def _mean(states: list[dict]) -> dict:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def _rule(states: list[dict]) -> int:
    """The two-tailed rule as the paper's author writes it, on the checkpoints themselves."""
    s = l = 0
    for t in range(1, len(states) + 1):
        s, l = s + 1, l + 1
        short, long = _score(_mean(states[t - s:t])), _score(_mean(states[t - l:t]))
        if short >= long:
            l, s = s, 0
    return l


def test_the_rule_keeps_the_tail_a_replay_written_out_keeps(tmp_path):
    n = 9
    _project(tmp_path, n)
    doc = build_json(cwd=tmp_path)
    states = _checkpoints(n)
    k = _rule(states)
    assert doc["tails"]["avg"]["k"] == k and doc["tails"]["avg"]["of"] == n
    assert doc["tails"]["avg"]["first"] == f"c{n - k}"
    out = load_file(str(tmp_path / "out" / "avg.safetensors"))
    for key, value in _mean(states[n - k:]).items():
        torch.testing.assert_close(out[key].double(), value, rtol=1e-6, atol=1e-6)
    assert doc["merges"]["avg"]["computed"] == 0  # the kept average is the last step's candidate
    assert _score(out) >= _score(states[-1])  # no worse than the last checkpoint


def test_one_more_checkpoint_costs_only_the_new_step(tmp_path):
    n = 7
    _project(tmp_path, n + 1)
    _mergefile(tmp_path, n, 'scorer = { python = "score:score" }')
    first = build_json(cwd=tmp_path)["tails"]["avg"]
    assert first["computed"] > 0
    again = build_json(cwd=tmp_path)["tails"]["avg"]
    assert again["computed"] == 0 and again["evaluated"] == 0 and again["k"] == first["k"]
    _mergefile(tmp_path, n + 1, 'scorer = { python = "score:score" }')
    dry = run_cli("-n", "-v", cwd=tmp_path)
    assert "two-tailed rule has" in dry.stdout and "avg.k:" not in dry.stdout
    grown = build_json(cwd=tmp_path)["tails"]["avg"]
    assert 1 <= grown["evaluated"] <= 2  # the new step's short and long averages at most
    assert grown["computed"] == 2 * grown["evaluated"]  # two tensors per candidate, nothing older
    assert grown["k"] == _rule(_checkpoints(n + 1))


def test_summary_and_lineage_name_the_tail(tmp_path):
    _project(tmp_path, 6)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "two-tailed averaging kept the last" in proc.stderr
    tree = run_cli("lineage", "out/avg.safetensors", cwd=tmp_path, check=True).stdout
    k = _rule(_checkpoints(6))
    assert f"tail_average(k={k}) [k auto: two-tailed kept the last {k} of 6]" in tree
    doc = json.loads(run_cli("lineage", "out/avg.safetensors", "--json", cwd=tmp_path, check=True).stdout)
    assert doc["made_by"]["tail"]["rule"] == "two-tailed" and doc["made_by"]["tail"]["k"] == k
    assert "up to date" in run_cli("status", cwd=tmp_path).stdout


def test_an_int_k_is_as_before(tmp_path):
    _project(tmp_path, 4, extra="")
    text = (tmp_path / "mergefile.toml").read_text().replace('k = "auto"', "k = 2")
    (tmp_path / "mergefile.toml").write_text(text)
    doc = build_json(cwd=tmp_path)
    assert "tails" not in doc
    out = load_file(str(tmp_path / "out" / "avg.safetensors"))
    torch.testing.assert_close(out["layers.0.bias"].double(), _mean(_checkpoints(4)[2:])["layers.0.bias"])
    spec = json.loads(run_cli("methods", "tail_average", "--json", cwd=tmp_path, check=True).stdout)
    assert spec["params"]["k"]["type"] == "int" and spec["params"]["k"]["words"] == ["auto"]


def test_hostile_scorers_are_one_line(tmp_path):
    _project(tmp_path, 3)
    cases = [('', 2, 'k = "auto" needs a scorer'),
             ('scorer = { python = "nosuch:score" }', 2, "cannot load nosuch:score"),
             ('scorer = { python = "score:score", command = "echo 1" }', 2, "exactly one"),
             ('scorer = { command = "exit 3" }', 1, "the scorer exited with status 3")]
    for extra, code, words in cases:
        _mergefile(tmp_path, 3, extra)
        proc = run_cli("-q", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and words in lines[0], (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
    text = (tmp_path / "mergefile.toml").read_text().replace('k = "auto"', "k = 2")
    (tmp_path / "mergefile.toml").write_text(text)
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode == 2 and 'a scorer is for k = "auto" only' in proc.stderr


def test_tune_resolves_an_auto_tail_in_every_trial(tmp_path):
    """A study whose Mergefile holds k = "auto": each trial builds the tail the rule keeps, then
    the searched merge on it; the best trial is scored on that output."""
    n = 5
    _project(tmp_path, n)
    text = (tmp_path / "mergefile.toml").read_text()
    text += ('\n[merges.final]\nmethod = "weighted_sum"\ninputs = ["avg", "c0"]\n'
             'alpha = { search = [0.0, 1.0] }\noutput = "out/final.safetensors"\n\n'
             '[tune]\ntarget = "final"\npython = "score:score"\ntrials = 3\nseed = 0\nsampler = "random"\n')
    (tmp_path / "mergefile.toml").write_text(text)
    proc = run_cli("tune", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    trials = doc["trials"]
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials), trials
    k = _rule(_checkpoints(n))
    tail = _mean(_checkpoints(n)[n - k:])
    for t in trials:  # the score of final = alpha * tail + (1 - alpha) * c0, as written out here
        alpha = t["params"]["merges.final.alpha"]
        final = {key: (1 - alpha) * tail[key] + alpha * _checkpoints(n)[0][key].double() for key in tail}
        assert abs(t["value"] - _score(final)) < 1e-4 * (1 + abs(_score(final))), (t, k)
