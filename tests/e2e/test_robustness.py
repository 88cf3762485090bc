"""Crashes, interrupts, corruption and concurrency never leave a bad output or cache."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import ROOT, SIM, build_json, chain, load, mergefile, run_cli, write_model

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

BIG = """
[models.a]
path = "a.safetensors"
[models.b]
path = "b.safetensors"
[merges.m]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.5
output = "out/m.safetensors"
"""


def big_project(tmp_path, tensors=48, side=1024):
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)
        write_model(tmp_path / f"{name}.safetensors",
                    {f"model.diffusion_model.layer{i}.weight": torch.randn(side, side, generator=g) for i in range(tensors)})
    mergefile(tmp_path / "mergefile.toml", BIG)
    return tmp_path


def start_build(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_CACHE"}
    env.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(SIM)]))
    return subprocess.Popen([sys.executable, "-m", "mergebuild", "-q", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def temps(folder) -> list:
    """Files being written: an output is written as a temp beside its target, then renamed."""
    return [p for p in folder.rglob("*") if ".mergebuild-tmp-" in p.name] if folder.exists() else []


def wait_for_temp(folder, proc, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if temps(folder):
            return True
        time.sleep(0.002)
    return False


def test_sigkill_mid_build_leaves_no_partial_output(tmp_path):
    project = big_project(tmp_path)
    proc = start_build(project)
    assert wait_for_temp(project / "out", proc), "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project / "out/m.safetensors").exists()
    assert temps(project / "out")  # what the killed build was writing
    run_cli(cwd=project, check=True)
    assert not temps(project)  # removed by the next build
    out = load(project / "out/m.safetensors")
    a, b = load(project / "a.safetensors"), load(project / "b.safetensors")
    for key in a:
        torch.testing.assert_close(out[key], torch.lerp(a[key], b[key], 0.5))


def test_ctrl_c_removes_the_temp_file_and_exits_130(tmp_path):
    project = big_project(tmp_path)
    proc = start_build(project)
    assert wait_for_temp(project / "out", proc), "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not (project / "out/m.safetensors").exists() and not temps(project)


def test_two_builds_at_once_both_succeed(tmp_path):
    project = big_project(tmp_path, tensors=16, side=512)
    first, second = start_build(project, "--json"), start_build(project, "--json")
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    docs = [json.loads(o[0]) for o in outs]
    # one computed everything, the other waited for the lock and reused it all
    assert sorted(d["merges"]["m"]["computed"] for d in docs) == [0, 16]
    a, b = load(project / "a.safetensors"), load(project / "b.safetensors")
    out = load(project / "out/m.safetensors")
    torch.testing.assert_close(out["model.diffusion_model.layer3.weight"],
                               torch.lerp(a["model.diffusion_model.layer3.weight"], b["model.diffusion_model.layer3.weight"], 0.5))


def test_corrupt_blobs_are_detected_and_healed(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    first = (project / "out/final.safetensors").read_bytes()
    (project / "out/final.safetensors").unlink()
    blobs = [p for p in (project / "cache/objects").rglob("*") if p.is_file()]
    for blob in blobs:
        data = bytearray(blob.read_bytes())
        data[0] ^= 0xFF
        blob.write_bytes(bytes(data))
    for pack in (project / "cache/packs").glob("*.safetensors"):  # the target's tensors
        data = bytearray(pack.read_bytes())
        header = int.from_bytes(data[:8], "little")
        for i in range(8 + header, len(data), 64):
            data[i] ^= 0xFF
        pack.write_bytes(bytes(data))
    doc = build_json(cwd=project)["merges"]
    assert doc["final"]["computed"] > 0  # bad blobs were recomputed, not used
    assert (project / "out/final.safetensors").read_bytes() == first


def test_cache_verify_finds_and_removes_bad_blobs(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    blob = next(p for p in (project / "cache/objects").rglob("*") if p.is_file())
    blob.write_bytes(b"garbage")
    doc = json.loads(run_cli("cache", "verify", "--json", cwd=project, check=True).stdout)
    assert doc["bad_removed"] == 1 and doc["checked"] > 1
    assert not blob.exists()
    doc = json.loads(run_cli("cache", "verify", "--json", cwd=project, check=True).stdout)
    assert doc["bad_removed"] == 0


def test_noop_build_is_fast_and_never_imports_torch(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    code = ("import sys, time; t = time.perf_counter(); from mergebuild.cli import main; "
            "rc = main(['-q']); print(rc, 'torch._C' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SIM)])})
    rc, imported, _seconds = proc.stdout.split()
    assert (rc, imported) == ("0", "False"), proc.stderr
