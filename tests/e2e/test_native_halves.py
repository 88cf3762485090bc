"""A weighted sum of float16 files is computed on the halves themselves where torch gives the
float32 path's bits (execute/native.py): built through the CLI, the output must hold the bytes
of the float32 path and of an independent torch.lerp in float32, tensors longer than a chunk
and of odd lengths included; NaN in a source and an overflow are still reported as before."""

from __future__ import annotations

import pytest
import torch

from mergebuild.execute import device, executor, native
from tests.conftest import build_json, load, mergefile, run_cli, small_model, write_model

LONG = "model.diffusion_model.input_blocks.1.1.proj_out.weight"  # more than two chunks, odd length
SHORT = "model.diffusion_model.output_blocks.2.1.proj_in.weight"  # shorter than ALIGN
N_LONG = 2 * executor.CHUNK + 1072  # a last chunk of 1072: 48 past the aligned prefix, where the loops differ

MERGEFILE = """
[settings]
cache = "cache"
[models]
a = {{ path = "models/a.safetensors" }}
b = {{ path = "models/b.safetensors" }}
[merges.mix]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = {alpha}
output = "out/mix.safetensors"
[merges.a1111]
method = "add_difference"
inputs = ["mix", "b", "a"]
alpha = 0.7
arithmetic = "a1111"
output = "out/a1111.safetensors"
"""


def _project(root, alpha=0.3, nan_at=None, scale=1.0):
    g = torch.Generator().manual_seed(3)
    long_a, short_a = torch.randn(N_LONG, generator=g) * scale, torch.randn(999, generator=g)
    b_long = long_a + 0.1 * torch.randn(N_LONG, generator=g)
    long_a[::4099] = -0.0  # signed zeros: torch's vector and scalar lerp round lerp(x, -0.0, 1.0)
    b_long[-64:] = -0.0  # to zeros of different signs, and the tail is where the two loops differ
    if nan_at is not None:
        b_long[nan_at] = float("nan")
    write_model(root / "models" / "a.safetensors", small_model(1, extra={LONG: long_a.half(), SHORT: short_a.half()}))
    write_model(root / "models" / "b.safetensors",
                small_model(2, extra={LONG: b_long.half(), SHORT: (short_a + 0.1).half()}))
    mergefile(root / "mergefile.toml", MERGEFILE.format(alpha=alpha))


@pytest.fixture
def one_thread(monkeypatch):
    """As on a machine of two cores: elementwise merges get one torch thread. Counts the
    elements computed on the halves."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    threads = torch.get_num_threads()
    counted = []
    compute = native.compute
    monkeypatch.setattr(native, "compute", lambda fn, p, xs, out: (counted.append(out.numel()), compute(fn, p, xs, out))[1])
    yield counted
    torch.set_num_threads(threads)


def test_the_halves_give_the_bytes_of_the_float32_path_and_of_an_independent_lerp(tmp_path, monkeypatch, one_thread):
    fast, wide = tmp_path / "fast", tmp_path / "wide"
    for root in (fast, wide):
        _project(root, alpha=1.0)  # alpha 1: B itself, signed zeros kept as the float32 path keeps them
    build_json(cwd=fast)
    assert sum(one_thread) >= 2 * (N_LONG // native.ALIGN * native.ALIGN)  # both merges took the fast path
    with monkeypatch.context() as m:
        m.setattr(native, "eligible", lambda *args: False)
        before = len(one_thread)
        build_json(cwd=wide)
        assert len(one_thread) == before
    for name in ("mix", "a1111"):
        got, expected = load(fast / "out" / f"{name}.safetensors"), load(wide / "out" / f"{name}.safetensors")
        assert got.keys() == expected.keys()
        for key in got:
            assert torch.equal(got[key].view(torch.int16), expected[key].view(torch.int16)), (name, key)
    a, b = load(fast / "models" / "a.safetensors"), load(fast / "models" / "b.safetensors")
    torch.set_num_threads(1)
    reference = torch.lerp(a[LONG].float(), b[LONG].float(), 1.0).half()
    assert torch.equal(load(fast / "out" / "mix.safetensors")[LONG].view(torch.int16), reference.view(torch.int16))


def test_an_edited_alpha_on_the_fast_path_rebuilds_the_same_bytes_as_a_cold_float32_build(tmp_path, monkeypatch, one_thread):
    """A cache filled on the fast path serves a rebuild; its digests are the float32 path's."""
    _project(tmp_path)
    build_json(cwd=tmp_path)
    _project(tmp_path, alpha=0.45)
    report = build_json(cwd=tmp_path)
    assert report["merges"]["mix"]["computed"] > 0
    cold = tmp_path / "cold"
    _project(cold, alpha=0.45)
    with monkeypatch.context() as m:
        m.setattr(native, "eligible", lambda *args: False)
        build_json(cwd=cold)
    for name in ("mix", "a1111"):
        got, expected = load(tmp_path / "out" / f"{name}.safetensors"), load(cold / "out" / f"{name}.safetensors")
        assert all(torch.equal(got[k].view(torch.int16), expected[k].view(torch.int16)) for k in got)


def test_nan_in_a_source_is_still_named(tmp_path, one_thread):
    _project(tmp_path, nan_at=N_LONG - 5000)
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode == 2
    assert "[models.b]" in proc.stderr and LONG in proc.stderr and "Traceback" not in proc.stderr
    assert one_thread  # it was found on the fast path


def test_an_overflow_to_inf_is_the_float32_paths_and_stops_the_next_merge(tmp_path, monkeypatch, one_thread):
    """Extrapolating past float16's 65504: the float32 result is finite and its cast is inf, on
    either path (the cast is checked by the merge that reads it, not by the one that makes it)."""
    fast, wide = tmp_path / "fast", tmp_path / "wide"
    procs = []
    for root in (fast, wide):
        _project(root, alpha=30.0, scale=3000.0)
        with monkeypatch.context() as m:
            if root == wide:
                m.setattr(native, "eligible", lambda *args: False)
            procs.append(run_cli("-q", cwd=root))
    assert one_thread
    for proc in procs:
        assert proc.returncode == 2
        assert "[merges.mix]" in proc.stderr and "holds NaN or Inf" in proc.stderr and "Traceback" not in proc.stderr
    got, expected = load(fast / "out" / "mix.safetensors")[LONG], load(wide / "out" / "mix.safetensors")[LONG]
    assert got.isinf().any() and torch.equal(got.view(torch.int16), expected.view(torch.int16))
