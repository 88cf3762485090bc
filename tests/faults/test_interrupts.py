"""6. Interrupts keep finished work: SIGINT, SIGTERM and SIGHUP stop a build cleanly (130, 143,
129), tensors finished before it go into the cache (never left in a temp output), the next build
computes only the rest, and no index entry points at bytes that are not stored."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.faults.conftest import big_sources, leftovers, mb, mb_process, wait_for

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

CHAIN = """
[models.a]
path = "models/a.safetensors"
[models.b]
path = "models/b.safetensors"
[merges.mid]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.5
[merges.m]
method = "add_difference"
inputs = ["mid", "a", "b"]
alpha = 0.3
output = "out/m.safetensors"
"""


def _target_data_written(out) -> bool:
    """True once the temp output holds some tensor's bytes: it is preallocated with zeros and
    its header is written last, so any non-zero byte is data."""
    temps = [p for p in leftovers(out) if not p.name.endswith(".lock")] if out.exists() else []
    try:
        with open(temps[0], "rb") as f:
            size = f.seek(0, 2)
            for at in range(0, size, 1 << 18):  # a sample from every 256 KiB
                f.seek(at)
                if any(f.read(4096)):
                    return True
    except (IndexError, OSError):
        pass
    return False


def _interrupted(tmp_path, signals: list[int]):
    big_sources(tmp_path, tensors=64)
    (tmp_path / "mergefile.toml").write_text(CHAIN)
    proc = mb_process(tmp_path, "-q", background=True)
    assert wait_for(lambda: _target_data_written(tmp_path / "out"), proc), "the build finished first"
    for i, signum in enumerate(signals):
        proc.send_signal(signum)
        if i + 1 < len(signals):
            time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_the_build_and_keeps_finished_work(tmp_path, signum, code):
    rc, err = _interrupted(tmp_path, [signum])
    assert rc == code, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "finished work is kept" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out/m.safetensors").exists() and not leftovers(tmp_path)
    verify = json.loads(mb(tmp_path, "cache", "verify", "--json").out)
    assert verify["bad_removed"] == 0 and verify["missing"] == 0  # no entry without its bytes
    doc = json.loads(mb(tmp_path, "--json", "-q").out)["merges"]
    assert doc["mid"]["computed"] == 0  # finished before the signal: kept
    assert doc["m"]["computed"] < doc["m"]["tensors"]  # some of the target's tensors were salvaged
    assert not (tmp_path / "cache/packs").exists() or not any((tmp_path / "cache/packs").iterdir())


@pytest.mark.slow
def test_a_second_signal_during_shutdown_leaves_no_traceback_nor_temp(tmp_path):
    rc, err = _interrupted(tmp_path, [signal.SIGINT, signal.SIGINT, signal.SIGTERM])
    assert rc == 130, (rc, err)
    assert "Traceback" not in err and not leftovers(tmp_path)
    (tmp_path / "mergefile.toml").write_text(CHAIN)
    assert mb(tmp_path, "-q").code == 0


@pytest.mark.slow
def test_sigkill_leaves_temps_that_the_next_build_removes(tmp_path):
    rc, _ = _interrupted(tmp_path, [signal.SIGKILL])
    assert rc == -signal.SIGKILL
    assert leftovers(tmp_path)  # what the killed build was writing, under temp names only
    assert not (tmp_path / "out/m.safetensors").exists()
    assert mb(tmp_path, "-q").code == 0
    assert not leftovers(tmp_path)



# A stop signal lands at one bytecode of the main thread: wherever that is, nothing may stay.
# These put it, deterministically, in the windows a real Ctrl-C hits only now and then.
class _StoppedOnceLocked:
    """The temp lock of an output: the signal arrives once the lock's file exists and is held,
    before acquire() returns (the window a Ctrl-C at the first sight of a temp file hits)."""

    def __init__(self, real):
        self.real = real

    def __call__(self, path):
        lock = self.real(path)
        acquire = lock.acquire

        def stopped(*args, **kwargs):
            acquire(*args, **kwargs)
            raise KeyboardInterrupt

        lock.acquire = stopped
        return lock


def _stopped_after(real):
    def opened(*args, **kwargs):
        real(*args, **kwargs)  # the output's temp exists; nothing owns it yet
        raise KeyboardInterrupt

    return opened


@pytest.mark.parametrize("output", ["out/m.safetensors", "out/m"])  # a file and a folder output
@pytest.mark.parametrize("where", ["in the temp lock", "before the build owns the output"])
def test_a_signal_in_any_window_of_opening_an_output_leaves_nothing(tmp_path, monkeypatch, output, where):
    from mergebuild.execute import executor
    from mergebuild.tensors import folder, writer

    big_sources(tmp_path, tensors=4, side=64)
    (tmp_path / "mergefile.toml").write_text(CHAIN.replace('"out/m.safetensors"', f'"{output}"'))
    if where == "in the temp lock":
        monkeypatch.setattr(writer, "FileLock", _StoppedOnceLocked(writer.FileLock))
        monkeypatch.setattr(folder, "FileLock", _StoppedOnceLocked(folder.FileLock))
    else:
        monkeypatch.setattr(executor, "open_sink", _stopped_after(executor.open_sink))
    result = mb(tmp_path, "-q")
    assert result.code == 130 and "interrupted" in result.err and "Traceback" not in result.err
    assert not leftovers(tmp_path) and not (tmp_path / output).exists()
    monkeypatch.undo()
    assert mb(tmp_path, "-q").code == 0 and (tmp_path / output).exists() and not leftovers(tmp_path)


def test_a_build_aborts_only_its_own_unfinished_writers(tmp_path):
    from mergebuild.tensors.writer import SafetensorsWriter, unfinished

    tensors = [("w", "F32", (4,))]
    mine, other = (SafetensorsWriter(tmp_path / f"{n}.safetensors", tensors, {}, token) for n, token in
                   (("mine", "1-aa"), ("other", "2-bb")))
    unfinished.abort_all("1-aa")
    assert not mine.temp.exists() and other.temp.exists()  # another build in this process keeps its own
    other.write("w", bytes(16))
    other.commit({})
    assert (tmp_path / "other.safetensors").exists() and not leftovers(tmp_path)
    unfinished.abort_all("2-bb")  # a committed writer is no longer unfinished
    assert (tmp_path / "other.safetensors").exists()
