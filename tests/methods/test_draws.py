"""Keep masks drawn by numpy (methods/draws.py) against torch's own `torch.rand(n) < keep`: the
same bits and the generator left where torch would leave it, from any position in its stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild.methods import draws
from mergebuild.methods.common import bernoulli_mask, generator_for


def torch_mask(n, keep, generator):
    return torch.rand(n, generator=generator, dtype=torch.float32) < keep


def pair(seed: int, before: int):
    """Two generators at the same place: `before` draws into seed's stream."""
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    torch.rand(before, generator=ours), torch.rand(before, generator=theirs)
    return ours, theirs


def test_the_self_check_passes_with_this_torch():
    assert draws._same_as_torch()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), before=st.integers(0, 2000), n=st.integers(0, 3000),
       keep=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, 0.2, 0.1, 0.9, 2**-24, 1 - 2**-24])))
def test_the_same_mask_and_the_same_stream_after(seed, before, n, keep):
    ours, theirs = pair(seed, before)
    assert torch.equal(draws.keep_mask(n, keep, ours), torch_mask(n, keep, theirs))
    assert torch.equal(torch.rand(700, generator=ours), torch.rand(700, generator=theirs))


def test_several_draw_chunks_and_a_draw_across_a_twist(monkeypatch):
    monkeypatch.setattr(draws, "DRAW", 97)
    for before in (0, 623, 624, 625, 1247):
        ours, theirs = pair(5, before)
        for n in (1, 624, 2000):
            assert torch.equal(draws.keep_mask(n, 0.37, ours), torch_mask(n, 0.37, theirs))


def test_keep_just_around_a_float32_step():
    """u < keep compares in float32: keep is rounded first, then every 24-bit u below it is kept."""
    step = 2.0**-24
    for keep in (0.2, 0.2 + step / 3, 0.25, 0.25 - step / 4, 0.25 + step / 4, 3 * step, 1e-12):
        ours, theirs = pair(11, 0)
        assert torch.equal(draws.keep_mask(20000, keep, ours), torch_mask(20000, keep, theirs)), keep


def test_a_nan_keep_is_drawn_by_torch():
    ours, theirs = pair(3, 10)
    assert torch.equal(draws.keep_mask(500, float("nan"), ours), torch_mask(500, float("nan"), theirs))
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


def test_another_torch_falls_back_to_torch_draws(monkeypatch):
    """A layout or rule that does not check out leaves the draws to torch: still the same masks."""
    monkeypatch.setattr(draws, "_checked", False)
    monkeypatch.setattr(draws, "_numpy_mask", lambda *a: pytest.fail("numpy drew although the check failed"))
    ours, theirs = pair(9, 3)
    assert torch.equal(draws.keep_mask(1000, 0.2, ours), torch_mask(1000, 0.2, theirs))


def test_an_unknown_state_layout_falls_back(monkeypatch):
    monkeypatch.setattr(draws, "_STATE_BYTES", 10**6)  # longer than any state: not the layout we know
    ours, theirs = pair(9, 3)
    assert torch.equal(draws.keep_mask(1000, 0.2, ours), torch_mask(1000, 0.2, theirs))


def test_the_self_check_fails_when_the_rule_or_the_state_differs(monkeypatch):
    """The check can fail: a threshold for another keep, or the stream written back one draw off."""
    threshold = draws._threshold
    with monkeypatch.context() as m:
        m.setattr(draws, "_threshold", lambda keep: threshold(keep + 0.01))
        assert not draws._same_as_torch()
    write = draws._write_state

    def one_draw_on(generator, state, rng):
        rng.integers(0, 1 << 32, size=1, dtype=np.uint32)
        write(generator, state, rng)
    monkeypatch.setattr(draws, "_write_state", one_draw_on)
    assert not draws._same_as_torch()


@pytest.mark.parametrize("keep", [0.2, 0.3, 0.25, 0.25 - 2**-26, 0.25 + 2**-26, 1e-7, 3 * 2**-24, 1 - 2**-25, 0.0, 1.0, -1.0, 7.0])
def test_the_threshold_is_torch_s_comparison_at_its_edge(keep):
    """m < T exactly where torch finds float32(m * 2**-24) < keep, checked at the m next to T."""
    t = draws._threshold(keep)
    ms = [m for m in range(t - 3, t + 4) if 0 <= m < 1 << 24]
    u = torch.tensor([m * 2.0**-24 for m in ms], dtype=torch.float32)
    assert (u < keep).tolist() == [m < t for m in ms]


def test_bernoulli_mask_of_a_shape_is_torch_s_mask():
    a, b = generator_for(1, "x.weight"), generator_for(1, "x.weight")
    assert torch.equal(bernoulli_mask((7, 9, 3), 0.4, a, "cpu"), torch.rand((7, 9, 3), generator=b) < 0.4)
    probabilities = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert torch.equal(bernoulli_mask((5, 5), probabilities, a, "cpu"), torch.rand((5, 5), generator=b) < probabilities)
