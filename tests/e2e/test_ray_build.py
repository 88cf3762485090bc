"""`mergebuild --ray`: the tensor tasks run on a local Ray cluster's workers (loopback only), with
the same bytes as the local executor, on fabricated SD1-shaped and Llama-shaped models; healing
an input a worker cannot read; the one-line errors when Ray is missing or unreachable; and a
plain build never importing Ray. The cluster (tests/e2e/ray_fixtures.py) starts once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base, make_finetune
from tests.conftest import ROOT, build_json, load, mergefile

pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_cluster")

SD1_CHAIN = """
[models.base]
path = "../sd15-base.safetensors"
[models.real]
path = "../sd15-real.safetensors"
[models.anime]
path = "../sd15-anime.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {a1}
[merges.diff]
method = "add_difference"
inputs = ["mix", "anime", "base"]
alpha = 0.5
[merges.final]
method = "ties"
inputs = ["base", "diff", "real", "anime"]
density = 0.4
output = "{out}"
"""


def same_files(a: Path, b: Path) -> None:
    ta, tb = load(a), load(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.read_bytes() == b.read_bytes()  # the header and its lineage too


def projects(tmp_path: Path, text: str) -> None:
    """The same Mergefile in local/ and ray/ (an output's lineage names its Mergefile's folder)."""
    for name in ("local", "ray"):
        (tmp_path / name).mkdir(exist_ok=True)
        mergefile(tmp_path / name / "mergefile.toml", text)


def sd1(tmp_path: Path, a1=0.35, shrink=32) -> None:
    fabricate_family(tmp_path, "sd1-ldm", shrink=shrink)  # 1143 tensors, most in batches of small ones
    projects(tmp_path, SD1_CHAIN.format(a1=a1, out="final.safetensors"))


def both(tmp_path: Path) -> dict:
    """Build local/ with the local executor, ray/ on the cluster; the --ray build's JSON."""
    build_json("--cache-dir", tmp_path / "local" / "cache", cwd=tmp_path / "local")
    return build_json("--ray", "--cache-dir", tmp_path / "ray" / "cache", cwd=tmp_path / "ray")


@pytest.mark.slow
def test_an_sd1_chain_built_on_ray_has_the_local_bytes(tmp_path):
    sd1(tmp_path, shrink=16)
    doc = both(tmp_path)
    assert {m["computed"] for m in doc["merges"].values()} == {1130}
    ray = doc["ray"]
    assert ray["tensors"] == 3 * 1130 and ray["computed_on_driver"] == 0
    assert len(ray["worker_pids"]) >= 2, ray  # the tasks were spread over the workers
    assert os.getpid() not in ray["worker_pids"]
    # the mix and diff results are blobs the workers stored; only the target's came back
    assert 0 < ray["bytes_to_driver"] <= (tmp_path / "ray" / "final.safetensors").stat().st_size
    same_files(tmp_path / "local" / "final.safetensors", tmp_path / "ray" / "final.safetensors")

    # a rebuild after an edit, on the cluster: the same bytes again; then nothing to do
    projects(tmp_path, SD1_CHAIN.format(a1=0.6, out="final.safetensors"))
    assert both(tmp_path)["ray"]["tensors"] == 3 * 1130
    same_files(tmp_path / "local" / "final.safetensors", tmp_path / "ray" / "final.safetensors")
    again = build_json("--ray", "--cache-dir", tmp_path / "ray" / "cache", cwd=tmp_path / "ray")
    assert again["ray"]["tasks"] == 0 and {m["computed"] for m in again["merges"].values()} == {0}


LLAMA = """
[models.base]
path = "../base"
[models.a]
path = "../a"
[models.b]
path = "../b"
[merges.merged]
method = "dare_ties"
inputs = ["base", "a", "b"]
density = 0.5
seed = 7
output = "{out}"
"""


def test_a_llama_folder_built_on_ray_has_the_local_bytes(tmp_path):
    base = make_base(llama_keys(layers=4, hidden=64, intermediate=160, vocab=256), seed=5, dtype=torch.float16)
    models = {"base": base, "a": make_finetune(base, seed=6), "b": make_finetune(base, seed=7)}
    for name, tensors in models.items():
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                                 "num_hidden_layers": 4}))
    projects(tmp_path, LLAMA.format(out="merged"))
    doc = both(tmp_path)
    assert len(doc["ray"]["worker_pids"]) >= 2
    local, ray = sorted((tmp_path / "local" / "merged").iterdir()), sorted((tmp_path / "ray" / "merged").iterdir())
    assert [p.name for p in local] == [p.name for p in ray]
    for a, b in zip(local, ray):
        if a.name != ".mergebuild-manifest.json":  # it records the files' mtimes
            assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.slow
def test_a_cached_input_gone_bad_is_recomputed_by_the_driver(tmp_path):
    sd1(tmp_path)
    both(tmp_path)
    # final's inputs are diff's blobs: corrupt every one, then make final recompute
    for blob in (tmp_path / "ray" / "cache" / "objects").rglob("*"):
        if blob.is_file():
            blob.write_bytes(b"\0" * blob.stat().st_size)
    projects(tmp_path, SD1_CHAIN.format(a1=0.35, out="final.safetensors").replace("density = 0.4", "density = 0.3"))
    doc = both(tmp_path)
    assert doc["ray"]["computed_on_driver"] > 0  # the workers said so; nothing was guessed
    same_files(tmp_path / "local" / "final.safetensors", tmp_path / "ray" / "final.safetensors")


def _cli(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def test_without_ray_installed_a_ray_build_is_one_line(tmp_path):
    sd1(tmp_path)
    proc = _cli("import sys; sys.modules['ray'] = None\nfrom mergebuild.cli import main\n"
                "sys.exit(main(['--ray', '-q']))", tmp_path / "ray")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mergebuild: error: --ray needs Ray, which is not installed here: pip install mergebuild[ray]"]
    assert not (tmp_path / "ray" / "final.safetensors").exists()


def test_an_unreachable_cluster_is_one_line(tmp_path):
    sd1(tmp_path)
    proc = _cli("import sys\nfrom mergebuild.cli import main\n"
                "sys.exit(main(['--ray=127.0.0.1:9', '-q']))", tmp_path / "ray")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergebuild: error: --ray: cannot reach the Ray cluster at 127.0.0.1:9")
    assert not (tmp_path / "ray" / "final.safetensors").exists()


def test_importing_mergebuild_and_a_plain_build_never_import_ray(tmp_path):
    sd1(tmp_path)
    proc = _cli("import sys\nimport mergebuild, mergebuild.api, mergebuild.tune\nfrom mergebuild.cli import main\n"
                "assert main(['-q']) == 0\n"
                "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))", tmp_path / "local")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
