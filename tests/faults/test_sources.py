"""2. Sources are verified, not trusted: a source that changes, even behind a restored mtime, is
noticed; one rewritten or truncated during a build records nothing and writes no output."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import load, write_model
from tests.faults.conftest import big_sources, leftovers, mb, mb_process, model, recovers, wait_for, write_mergefile

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)


def _rewrite_same_size(path, seed: int) -> None:
    """Rewrite a file in place with other values of the same size, then put its mtime back
    (as `cp -p`, `rsync -t --inplace` or `touch -d` leave it)."""
    st = path.stat()
    tensors = load(path)
    g = torch.Generator().manual_seed(seed)
    for k in tensors:
        tensors[k] = torch.randn(tensors[k].shape, generator=g)
    write_model(path.with_name("tmp.safetensors"), tensors)
    with open(path, "r+b") as f:
        f.write(path.with_name("tmp.safetensors").read_bytes())
    path.with_name("tmp.safetensors").unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_an_in_place_rewrite_behind_a_restored_mtime_is_seen(two):
    assert mb(two, "-q").code == 0
    _rewrite_same_size(two / "models/b.safetensors", 77)
    dry = json.loads(mb(two, "-n", "--json").out)["merges"]["m"]
    assert dry["dirty"] > 0 and dry["reasons"][0].startswith("models.b: content changed (sha256 ")
    status = mb(two, "status", "--check")
    assert status.code == 1 and "models.b: content changed" in status.out
    assert mb(two, "-q").code == 0
    recovers(two)  # the output holds the new b


def test_a_copy_with_preserved_times_is_seen(two):
    assert mb(two, "-q").code == 0
    write_model(two / "other.safetensors", model(55))
    st = (two / "models/b.safetensors").stat()
    shutil.copyfile(two / "other.safetensors", two / "models/b.safetensors")
    os.utime(two / "models/b.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mb(two, "-q").code == 0
    recovers(two)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["rewritten", "truncated"])
def test_a_source_changed_during_a_build_records_nothing(tmp_path, how):
    big_sources(tmp_path)
    write_mergefile(tmp_path)
    original = (tmp_path / "models/b.safetensors").read_bytes()
    proc = mb_process(tmp_path, "-q", background=True)
    assert wait_for(lambda: leftovers(tmp_path / "out") if (tmp_path / "out").exists() else False, proc), \
        "the build finished before the source could be changed"
    b = tmp_path / "models/b.safetensors"
    if how == "rewritten":
        with open(b, "r+b") as f:  # same size, other bytes, in place
            f.seek(len(original) // 2)
            f.write(os.urandom(len(original) // 2 - 64))
    else:
        os.truncate(b, len(original) // 3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)  # never SIGBUS (-7), never a traceback
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "b.safetensors" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out/m.safetensors").exists() and not leftovers(tmp_path)
    b.write_bytes(original)  # put the original back: the cache must not serve what it read meanwhile
    recovers(tmp_path)


def test_sources_that_are_not_regular_files_are_refused_at_once(two):
    os.mkfifo(two / "models/pipe.safetensors")
    (two / "mergefile.toml").write_text((two / "mergefile.toml").read_text().replace("models/b.safetensors",
                                                                                     "models/pipe.safetensors"))
    proc = mb_process(two, "-q", timeout=60)  # a pipe would block a reader forever
    assert proc.returncode == 2 and "is not a regular file" in proc.stderr and "pipe.safetensors" in proc.stderr


def test_a_model_folder_index_pointing_outside_is_refused(two):
    folder = two / "llm"
    write_model(folder / "model-00001-of-00001.safetensors", model(3))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../models/a.safetensors" for k in model(3)}}))
    (two / "mergefile.toml").write_text(
        '[models.a]\npath = "llm"\n[models.b]\npath = "models/b.safetensors"\n'
        '[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.3\noutput = "out/m.safetensors"\n')
    mb(two, "-q").one_line_error(2, "model.safetensors.index.json", "may only point at shards beside it")
