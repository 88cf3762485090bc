"""7 and 8. Values that parse are range-checked before anything runs; and the smaller faults: a
second build says whom it waits for and honours a timeout, the cache commands work on a named
cache without a Mergefile, stale temp files are judged by their lock, not a PID."""

from __future__ import annotations

import json
import os
import time

import pytest

from mergebuild.portable import FileLock
from tests.faults.conftest import leftovers, mb, mb_process, recovers, write_mergefile


@pytest.mark.parametrize("alpha, field", [
    ("nan", "alpha"), ("inf", "alpha"), ("-inf", "alpha"),
    ("{ default = 0.5, IN05 = nan }", "alpha.IN05"),
    ("[0.1, inf, 0.3]", "alpha[1]"),
    ("{ gradient = [0.0, nan] }", "alpha.gradient[1]"),
])
def test_numbers_that_are_not_finite_are_refused_at_parse_time(two, alpha, field):
    write_mergefile(two, alpha=alpha)
    mb(two, "-q").one_line_error(2, "[merges.m]", field, "not a finite number")
    assert not (two / "cache").exists() and not (two / "out").exists()


def test_a_rule_and_a_setting_that_are_not_finite(two):
    write_mergefile(two, extra="[[merges.m.rules]]\nmatch = \"proj\"\nalpha = nan\n")
    mb(two, "-q").one_line_error(2, "rules", "not a finite number")
    write_mergefile(two, settings="staging = inf")
    mb(two, "-q").one_line_error(2, "[settings]", "staging")


@pytest.mark.parametrize("args, words", [
    (("cache", "gc", "--keep", str(10**20)), "--keep takes a number of builds from 0"),
    (("cache", "gc", "--keep", "-5"), "--keep takes a number of builds from 0"),
    (("cache", "stats", "--keep", "3"), "with cache gc"),
    (("--device", "tpu"), "--device 'tpu'"),
    (("--device", "xla"), "--device 'xla'"),
    (("--device", "meta"), "--device 'meta'"),
    (("--lock-timeout", "-1"), "--lock-timeout takes seconds"),
])
def test_command_line_values_are_range_checked(two, args, words):
    mb(two, *args).one_line_error(2, words)
    assert not (two / "out").exists()


def test_a_device_this_torch_lacks_is_refused(two):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mb(two, "--device", "cuda:0", "-q").one_line_error(2, "CUDA is not available")
    assert not leftovers(two)


def test_gc_keep_zero_keeps_zero_builds(two):
    for alpha in ("0.1", "0.2", "0.3"):
        write_mergefile(two, alpha=alpha)
        assert mb(two, "-q").code == 0
    before = json.loads(mb(two, "cache", "stats", "--json").out)
    gc = json.loads(mb(two, "cache", "gc", "--keep", "0", "--json").out)
    assert gc["blobs_removed"] > 0  # the earlier alphas' tensors: no build is kept, nothing needs them
    after = json.loads(mb(two, "cache", "stats", "--json").out)
    assert after["blobs"] < before["blobs"]
    doc = json.loads(mb(two, "--json", "-q").out)["merges"]
    assert doc["m"]["computed"] == 0  # what the current target needs stayed


@pytest.mark.slow
def test_a_second_build_says_whom_it_waits_for_and_honours_a_timeout(two):
    assert mb(two, "-q").code == 0
    lock = FileLock(two / "cache/lock")
    lock.acquire()
    started = time.time()
    (two / "cache/lock.info").write_text(f"{os.getpid()} {started:.0f}\n")
    try:
        write_mergefile(two, alpha="0.6")
        proc = mb_process(two, "--lock-timeout", "1")
        assert proc.returncode == 1
        minute = time.strftime("%H:%M", time.localtime(round(started)))
        assert f"waiting for build PID {os.getpid()} (started {minute})" in proc.stderr
        assert "still holds the cache after 1 s" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        lock.release()
    assert mb(two, "-q").code == 0


def test_cache_commands_on_a_named_cache_need_no_mergefile(two, tmp_path_factory):
    assert mb(two, "-q").code == 0
    elsewhere = tmp_path_factory.mktemp("nowhere")
    for action in ("stats", "verify", "gc"):
        r = mb(elsewhere, "cache", action, "--cache-dir", two / "cache", "--json")
        assert r.code == 0, r.err
    r = mb(elsewhere, "cache", "stats")
    r.one_line_error(2, "no such Mergefile")


def test_stale_temps_are_judged_by_their_lock_not_their_pid(two):
    (two / "out").mkdir()
    stale = two / f"out/.m.safetensors.mergebuild-tmp-{os.getpid()}-abc"  # a live PID: ours
    stale.write_bytes(b"half written by a build that was killed")
    assert mb(two, "-q").code == 0
    assert not stale.exists()
    recovers(two)
