"""The papers' effects on the examples' own models (examples/wholemodel/, --fast: one pair),
trained here on scikit-learn's digits and merged by the real CLI: re-basin's matched midpoint
recovers most of the plain average's loss barrier; ZipIt! beats the plain average and re-basin
on the joint task of two models trained on disjoint digits. The training is deterministic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mergebuild.testing import digits

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "wholemodel"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"wholemodel_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, tmp_path_factory):
    """The example's fast run (one pair), trained and built once per module; its builds keep
    their per-user state in a folder of their own, as every test's do (conftest)."""
    module = example(name)
    work = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGEBUILD_HOME", str(tmp_path_factory.mktemp("mb-home")))
        return module, work, module.run(work, module.PAIRS[:1])


@pytest.fixture(scope="module")
def rebasin_run(tmp_path_factory):
    return run_example("rebasin", tmp_path_factory)


@pytest.fixture(scope="module")
def zipit_run(tmp_path_factory):
    return run_example("zipit", tmp_path_factory)


def test_weight_matching_recovers_most_of_the_plain_averages_barrier(rebasin_run):
    module, work, results = rebasin_run
    curves = results["0_1"]
    plain, matched = curves["weighted_sum"], curves["rebasin"]
    assert min(plain[0], plain[-1]) > 0.9  # both models learnt the task
    assert module.barrier(plain) > 0.2  # the plain midpoint loses much accuracy
    recovered = (matched[5] - plain[5]) / module.barrier(plain)
    assert recovered > 0.75, (plain, matched)
    assert matched[0] == plain[0] and matched[-1] == plain[-1]  # alpha 1: B permuted computes what B does


def test_zipit_beats_the_plain_average_and_rebasin_on_the_joint_task(zipit_run):
    module, work, results = zipit_run
    row = results["0_1"]
    assert row["ensemble"]["joint"] > 0.8
    for zipped in ("zip", "zip_2", "zip_1"):
        assert row[zipped]["joint"] > row["average"]["joint"] + 0.15, row
        assert row[zipped]["joint"] > row["rebasin"]["joint"] + 0.15, row
        assert row[zipped]["per_task"] > row["average"]["per_task"] + 0.1, row
        assert row[zipped]["joint"] <= row["ensemble"]["joint"] + 0.02, row
    assert row["zip_1"]["parameters"] > row["zip_2"]["parameters"] > row["zip"]["parameters"]


def test_the_partial_zip_is_one_file_with_a_head_per_input(zipit_run):
    module, work, results = zipit_run
    state = digits.load(work / "out" / "zip_1_0_1.safetensors")
    assert sorted(k for k in state if not k.startswith("heads.")) == ["layers.0.bias", "layers.0.weight"]
    assert sorted(digits.heads(state)) == ["high1", "low0"]
    assert state["heads.low0.layers.3.weight"].shape == (5, 128)


def test_training_is_deterministic_for_a_seed():
    split = digits.digits()
    first, again, other = (digits.train_mlp(split, hidden=(32, 32), seed=s, epochs=2) for s in (7, 7, 8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["layers.0.weight"], other["layers.0.weight"])
