"""Fault injection: hostile paths, changing and malformed inputs, full and read-only disks,
broken caches, signals. Every case checks what a user would: the exit code, one line on stderr
naming the file or field, nothing left behind, `cache verify` clean, and that the next good
build is correct.

Most cases drive the CLI in-process (`mb`, no interpreter start-up per call); the ones that need
a process of their own (signals, descriptor limits, mounts) run it as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SIM, in_process, load, write_model

KEYS = ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.out.0.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_line_error(self, code: int, *fragments: str) -> str:
        """The failure is `code` and exactly one line on stderr, naming what it should."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == code, (self.code, self.err)
        assert len(lines) == 1 and lines[0].startswith("mergebuild: error: "), self.err
        assert "Traceback" not in self.err
        for f in fragments:
            assert f in lines[0], (f, lines[0])
        return lines[0]


def mb(cwd: Path, *args, env: dict | None = None) -> Result:
    """Run the CLI in this process, in `cwd`, with stdout and stderr captured."""
    full = {k: v for k, v in os.environ.items() if k not in ("MERGEBUILD_CACHE", "MERGEBUILD_REMOTE_CACHE")}
    full.update({"NO_COLOR": "1", "SOURCE_DATE_EPOCH": "1790000000", **(env or {})})
    proc = in_process([str(a) for a in args], cwd, full, width=80)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def mb_process(cwd: Path, *args, env: dict | None = None, shell_prefix: str = "", timeout: float = 120,
               **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MERGEBUILD_CACHE", "MERGEBUILD_REMOTE_CACHE")}
    full.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(SIM)]), SOURCE_DATE_EPOCH="1790000000",
                **(env or {}))
    command = [sys.executable, "-m", "mergebuild", *map(str, args)]
    if shell_prefix:
        command = ["bash", "-c", f"{shell_prefix} && exec " + " ".join(f"'{c}'" for c in command)]
    if popen.pop("background", False):
        return subprocess.Popen(command, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def model(seed: int, side: int = 8, tensors: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(side, side, generator=g) if "weight" in k and "norm" not in k else torch.randn(side, generator=g)
           for k in KEYS}
    for i in range(tensors):
        out[f"model.diffusion_model.middle_block.{i}.weight"] = torch.randn(side, side, generator=g)
    return out


def write_mergefile(folder: Path, output: str = "out/m.safetensors", alpha="0.3", extra: str = "",
                    settings: str = "") -> Path:
    path = folder / "mergefile.toml"
    path.write_text(textwrap.dedent(f"""
        [settings]
        cache = "cache"
        {settings}
        [models.a]
        path = "models/a.safetensors"
        [models.b]
        path = "models/b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {alpha}
        output = "{output}"
        {extra}
    """))
    return path


@pytest.fixture
def two(tmp_path: Path) -> Path:
    """A project: two small models, a Mergefile merging them, and a user's notes beside them."""
    write_model(tmp_path / "models/a.safetensors", model(1))
    write_model(tmp_path / "models/b.safetensors", model(2))
    (tmp_path / "models/notes.txt").write_text("mine")
    write_mergefile(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file outside the cache, with its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] != "cache":
            out[str(rel)] = p.read_bytes()
    return out


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".mergebuild-tmp-" in p.name or ".mergebuild-old-" in p.name]


def expected(folder: Path, alpha: float = 0.3) -> dict:
    a, b = load(folder / "models/a.safetensors"), load(folder / "models/b.safetensors")
    return {k: ((1 - alpha) * a[k].double() + alpha * b[k].double()).to(a[k].dtype) for k in a}


def recovers(folder: Path, output: str = "out/m.safetensors", alpha: float = 0.3) -> None:
    """After the fault: no temp files, `cache verify` finds nothing wrong, and a good build
    gives the right tensors."""
    assert not leftovers(folder), leftovers(folder)
    write_mergefile(folder, output, str(alpha))
    r = mb(folder, "-q")
    assert r.code == 0, r.err
    verify = mb(folder, "cache", "verify", "--json")
    assert verify.code == 0, verify.err
    doc = json.loads(verify.out)
    assert doc["bad_removed"] == 0 and doc["missing"] == 0, doc
    got = load(folder / output)
    for k, v in expected(folder, alpha).items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert not leftovers(folder)


def big_sources(folder: Path, tensors: int = 48, side: int = 512) -> None:
    """Sources large enough that a build takes a moment: something can happen during it."""
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)
        t = {f"model.diffusion_model.layer{i}.weight": torch.randn(side, side, generator=g) for i in range(tensors)}
        write_model(folder / f"models/{name}.safetensors", t)


def wait_for(predicate, proc=None, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False
