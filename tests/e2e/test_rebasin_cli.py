"""rebasin and permute through the real CLI on fabricated safetensors: B aligned to A is found
(a sequential MLP, an SD1 UNet), merged downstream, its statistic cached and recomputed
exactly when what it read (or iterations, seed) changes, never for alpha; models that do not fit
are one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mergebuild.layouts.blocks import architectures
from mergebuild.layouts.permutations import permutation_groups
from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base
from tests.conftest import load, mergefile, run_cli, write_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from test_permutation_specs import permuted, random_permutation, sequential_mlp  # noqa: E402

MERGEFILE = """
[models.a]
path = "a.safetensors"
[models.b]
path = "b.safetensors"

[merges.aligned]
method = "permute"
inputs = ["a", "b"]{extra}
output = "out/aligned.safetensors"

[merges.mix]
method = "rebasin"
inputs = ["a", "b"]
alpha = {alpha}{extra}
output = "out/mix.safetensors"

[merges.downstream]
method = "weighted_sum"
inputs = ["a", "aligned"]
alpha = {alpha}
output = "out/downstream.safetensors"
"""


def mlp_pair(tmp_path: Path, noise: float = 0.01):
    """A, and B = A plus a little noise with its hidden units shuffled; the noisy A aligned is
    what permute must give back."""
    a = {k: v.float() for k, v in sequential_mlp(sizes=(8, 32, 24, 4)).items()}
    groups = permutation_groups(architectures()["generic"], {k: tuple(v.shape) for k, v in a.items()})
    gen = torch.Generator().manual_seed(9)
    noisy = {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in a.items()}
    b = permuted(noisy, groups, {n: torch.randperm(g.size, generator=gen) for n, g in groups.items()})
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    return a, noisy


def write_mergefile(tmp_path: Path, alpha=0.25, extra="") -> None:
    mergefile(tmp_path / "mergefile.toml", MERGEFILE.format(alpha=alpha, extra=extra))


@pytest.fixture
def counted(monkeypatch):
    """How many times weight matching ran (the statistic's compute)."""
    from mergebuild.methods import weight_matching as wm

    calls = []
    real = wm.weight_matching

    def counting(*args, **kwargs):
        calls.append(kwargs.get("iterations"))
        return real(*args, **kwargs)

    monkeypatch.setattr(wm, "weight_matching", counting)
    return calls


def test_permute_aligns_b_and_rebasin_merges_it(tmp_path):
    a, noisy = mlp_pair(tmp_path)
    write_mergefile(tmp_path)
    run_cli(cwd=tmp_path, check=True)
    aligned = load(tmp_path / "out/aligned.safetensors")
    mix = load(tmp_path / "out/mix.safetensors")
    downstream = load(tmp_path / "out/downstream.safetensors")
    for key in a:
        assert torch.equal(aligned[key], noisy[key]), key
        expected = 0.75 * a[key].double() + 0.25 * noisy[key].double()
        torch.testing.assert_close(mix[key].double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(downstream[key], mix[key]), key


def test_the_permutation_is_cached_and_recomputed_exactly_when_its_inputs_change(tmp_path, counted):
    a, _ = mlp_pair(tmp_path)
    write_mergefile(tmp_path)
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 1  # one statistic, shared by permute and rebasin (same key)

    def statistic_state():
        proc = run_cli("-n", "--json", cwd=tmp_path, check=True)
        return json.loads(proc.stdout)["merges"]["mix"]["statistic"]["state"]

    assert statistic_state() == "cached"
    before = load(tmp_path / "out/mix.safetensors")
    write_mergefile(tmp_path, alpha=0.6)
    assert statistic_state() == "cached"
    text = run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
    assert "statistic rebasin.weight_matching: cached (reads 14 tensors of a, b)" in text
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 1  # alpha changed: sums recomputed, the permutation not
    assert not torch.equal(load(tmp_path / "out/mix.safetensors")["layers.0.weight"], before["layers.0.weight"])

    for extra in ("\niterations = 7", "\niterations = 7\nseed = 3"):
        write_mergefile(tmp_path, alpha=0.6, extra=extra)
        assert statistic_state() == "dirty"
        run_cli(cwd=tmp_path, check=True)
    assert counted[1:] == [7, 7]

    b = load(tmp_path / "b.safetensors")
    b["layers.3.weight"] = b["layers.3.weight"] * 1.5
    write_model(tmp_path / "b.safetensors", b)
    proc = run_cli("-n", "-v", cwd=tmp_path, check=True)
    assert "statistic rebasin.weight_matching: dirty" in proc.stdout
    assert "mix: rebasin.weight_matching to compute, then" in proc.stdout
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 4
    explain = json.loads(run_cli("explain", "mix", "--json", cwd=tmp_path, check=True).stdout)
    assert explain["merges"]["mix"]["statistic"]["state"] == "cached"


def test_a_bad_cached_permutation_is_computed_again(tmp_path, counted):
    a, noisy = mlp_pair(tmp_path)
    write_mergefile(tmp_path)
    run_cli(cwd=tmp_path, check=True)
    for blob in (tmp_path / "cache" / "objects").rglob("*"):
        if blob.is_file():
            blob.write_bytes(b"\0" * blob.stat().st_size)  # every intermediate, the permutations among them
    write_mergefile(tmp_path, alpha=0.3)  # the sums read the permutations again: found bad, computed again
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 2
    mix = load(tmp_path / "out/mix.safetensors")
    for key in a:
        torch.testing.assert_close(mix[key].double(), 0.7 * a[key].double() + 0.3 * noisy[key].double(),
                                   rtol=1e-6, atol=1e-6)


def test_an_sd1_unet_shuffled_within_its_spec_is_aligned_back(tmp_path):
    fabricate_family(tmp_path, "sd1-ldm", 10, torch.float32, names=("a",), prefix="")
    kept = ("cond_stage_model.transformer.text_model.final_layer_norm.", "first_stage_model.decoder.conv_out.",
            *(f"model.diffusion_model.{p}." for p in ("time_embed", "input_blocks.1", "input_blocks.4", "input_blocks.11")))
    a = {k: v for k, v in load(tmp_path / "a.safetensors").items() if k.startswith(kept)}  # part of the UNet: fast
    write_model(tmp_path / "a.safetensors", a)
    unet = {k: tuple(v.shape) for k, v in a.items() if k.startswith("model.diffusion_model.")}
    groups = permutation_groups(architectures()["sd1"], unet)
    gen = torch.Generator().manual_seed(5)
    b = permuted(a, groups, {n: random_permutation(g, gen) for n, g in groups.items()})
    assert sum(not torch.equal(a[k], b[k]) for k in a) > 60
    assert {n.rsplit(".", 1)[-1] for n in groups} >= {"hidden", "stream", "qk", "vo", "ff", "emb", "mlp"}
    write_model(tmp_path / "b.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", MERGEFILE.format(alpha=0.5, extra="\niterations = 20").split("[merges.mix]")[0])
    run_cli(cwd=tmp_path, check=True)
    aligned = load(tmp_path / "out/aligned.safetensors")
    wrong = [k for k in a if not torch.equal(aligned[k], a[k])]
    assert not wrong, wrong[:5]


def test_a_llama_whose_mlp_units_are_shuffled_is_aligned_back(tmp_path):
    a = {k: v.float() for k, v in make_base(llama_keys(layers=2, hidden=16, intermediate=24), seed=3).items()}
    groups = permutation_groups(architectures()["llama"], {k: tuple(v.shape) for k, v in a.items()})
    gen = torch.Generator().manual_seed(4)
    b = permuted(a, groups, {n: torch.randperm(g.size, generator=gen) for n, g in groups.items()})
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    write_mergefile(tmp_path)
    text = run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
    assert "statistic rebasin.weight_matching: dirty (reads 12 tensors of a, b)" in text
    run_cli(cwd=tmp_path, check=True)
    aligned = load(tmp_path / "out/aligned.safetensors")
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def hostile_cases(tmp_path: Path, case: str) -> list[str]:
    a = {k: v.float() for k, v in sequential_mlp(sizes=(8, 16, 12, 3)).items()}
    b = dict(a)
    if case == "shapes differ":
        b = {k: v.float() for k, v in sequential_mlp(sizes=(8, 20, 12, 3)).items()}
        expected = ["[merges.aligned]", "'layers.0.bias'", "shapes differ", "a [16] vs b [20]"]
    elif case == "not a chain":
        a["layers.3.weight"] = torch.zeros(3, 5)
        b = a
        expected = ["[merges.aligned]", "not a sequential chain", "layers.3.weight"]
    else:  # a UNet whose channels are not whole GroupNorm groups: the SD1 spec does not fit it
        fabricate_family(tmp_path, "sd1-ldm", 32, torch.float16, names=("a", "b"), prefix="")
        return ["[merges.aligned]", "do not fall in", "does not fit"]
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    return expected


@pytest.mark.parametrize("case", ["shapes differ", "not a chain", "unet spec does not fit"])
def test_models_the_spec_does_not_fit_are_one_line_and_exit_2(tmp_path, case):
    expected = hostile_cases(tmp_path, case)
    write_mergefile(tmp_path)
    for args in ((), ("-n",)):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        for fragment in expected:
            assert fragment in proc.stderr, (fragment, proc.stderr)
    assert not (tmp_path / "out").exists()


def test_a_source_rewritten_while_the_permutation_is_computed_records_nothing(tmp_path, monkeypatch):
    from mergebuild.methods import weight_matching as wm

    mlp_pair(tmp_path)
    write_mergefile(tmp_path)
    real = wm.weight_matching

    def rewrite_b_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        b = load(tmp_path / "b.safetensors")
        write_model(tmp_path / "b.safetensors", {k: v + 1 for k, v in b.items()})
        return result

    monkeypatch.setattr(wm, "weight_matching", rewrite_b_meanwhile)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "b.safetensors" in proc.stderr and "changed during the build" in proc.stderr
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(wm, "weight_matching", real)
    state = json.loads(run_cli("-n", "--json", cwd=tmp_path, check=True).stdout)["merges"]["mix"]["statistic"]["state"]
    assert state == "dirty"  # nothing computed from the old b was recorded


@pytest.mark.parametrize("value", ["{ default = 5, IN00 = 3 }", "0", "2.5", '"5"'])
def test_iterations_is_one_whole_number_for_the_whole_model(tmp_path, value):
    mlp_pair(tmp_path)
    write_mergefile(tmp_path, extra=f"\niterations = {value}")
    proc = run_cli("-n", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "[merges.aligned] iterations: expected a whole number of sweeps, at least 1" in proc.stderr


def test_the_statistics_read_window_is_emptied_and_handed_back_before_the_tasks_run(tmp_path, monkeypatch):
    """The merge's tasks must not stack their memory on the statistic's read window: it is
    dropped, and the freed heap pages handed back to the OS, before the first task runs."""
    from mergebuild.execute import executor as executor_module
    from mergebuild.execute import statistics

    events, readers = [], []
    real_init = statistics.StatisticReader.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(statistics.StatisticReader, "__init__", init)
    monkeypatch.setattr(statistics, "release_freed_memory",
                        lambda: events.append(("released", [r._bytes for r in readers])))
    real_compute = executor_module.Executor._compute
    monkeypatch.setattr(executor_module.Executor, "_compute",
                        lambda self, *a, **k: events.append(("task", None)) or real_compute(self, *a, **k))
    mlp_pair(tmp_path)
    write_mergefile(tmp_path)
    run_cli(cwd=tmp_path, check=True)
    assert events[0] == ("released", [0]), events[:3]  # one statistic, its window empty, before any task
    assert [e for e, _ in events].count("released") == 1 and ("task", None) in events
