"""Hashing costs once per file per machine (the per-user fingerprint store), and an output is not
read again only to hash it: through the real CLI, with the hashes checked against hashlib."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
from safetensors import safe_open

from mergebuild.planning import sources
from mergebuild.record import hashes
from mergebuild.execute import commit
from tests.conftest import chain, load, mergefile, run_cli, write_model

ONE = """
[models.real]
path = "{models}/real.safetensors"
[models.anime]
path = "{models}/anime.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = 0.5
output = "out/mix.safetensors"
"""


@pytest.fixture
def counted(monkeypatch):
    """Which files the build hashes: the sources' tensors (xxh3) and any file's sha256."""
    seen = {"digests": [], "sha256": []}
    digest, sha = sources.digest_safetensors, hashes.file_sha256

    def digest_counted(path, entries):
        seen["digests"].append(str(path))
        return digest(path, entries)

    def sha_counted(path):
        seen["sha256"].append(os.path.basename(path))
        return sha(path)

    monkeypatch.setattr(sources, "digest_safetensors", digest_counted)
    monkeypatch.setattr(hashes, "file_sha256", sha_counted)
    monkeypatch.setattr(commit, "file_sha256", sha_counted)
    return seen


def project_at(root, models):
    root.mkdir(parents=True, exist_ok=True)
    mergefile(root / "mergefile.toml", ONE.format(models=models.as_posix()))
    return root


def lineage_sha(out, node: str) -> str:
    with safe_open(str(out), "pt") as f:
        return json.loads(f.metadata()["mergebuild.recipe"])["nodes"][node]["sha256"]


def sha_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_source_hashed_by_one_project_is_not_hashed_by_another(project, tmp_path, counted):
    models = project / "models"
    first, second = project_at(tmp_path / "p1", models), project_at(tmp_path / "p2", models)
    run_cli(cwd=first, check=True)
    assert sorted(counted["sha256"]) == ["anime.safetensors", "real.safetensors"] and len(counted["digests"]) == 2
    counted["sha256"].clear(), counted["digests"].clear()
    run_cli(cwd=second, check=True)  # its own cache, the same machine: nothing is hashed again
    assert counted == {"digests": [], "sha256": []}
    for node in ("real", "anime"):
        assert lineage_sha(second / "out/mix.safetensors", node) == sha_of(models / f"{node}.safetensors")
    assert torch.equal(load(first / "out/mix.safetensors")["alphas_cumprod"], load(second / "out/mix.safetensors")["alphas_cumprod"])


def test_a_source_rewritten_in_place_with_its_mtime_put_back_is_hashed_again(project, tmp_path, counted):
    models = project / "models"
    first, second = project_at(tmp_path / "p1", models), project_at(tmp_path / "p2", models)
    run_cli(cwd=first, check=True)
    real = models / "real.safetensors"
    st = real.stat()
    time.sleep(0.05)  # the change time's clock ticks coarsely on some file systems
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in load(real).items()}
    write_model(tmp_path / "other.safetensors", other)
    with open(real, "r+b") as f:  # same size, other bytes, mtime restored (as `rsync -t --inplace` does)
        f.write((tmp_path / "other.safetensors").read_bytes())
    os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert real.stat().st_size == st.st_size and real.stat().st_mtime_ns == st.st_mtime_ns
    counted["sha256"].clear(), counted["digests"].clear()
    run_cli(cwd=second, check=True)
    assert counted["sha256"] == ["real.safetensors"] and counted["digests"] == [str(real)]
    assert lineage_sha(second / "out/mix.safetensors", "real") == sha_of(real)
    key = "model.diffusion_model.out.0.bias"
    got = load(second / "out/mix.safetensors")[key].double()
    want = 0.5 * other[key].double() + 0.5 * load(models / "anime.safetensors")[key].double()
    assert torch.allclose(got, want, atol=1e-2)  # computed from the new bytes, not the remembered digests
    assert not torch.allclose(got, load(first / "out/mix.safetensors")[key].double(), atol=0.1)


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_an_unusable_store_is_one_warning_and_the_build_hashes(project, tmp_path, counted, damage):
    home = tmp_path / "home"
    if damage == "corrupt":
        home.mkdir()
        (home / "fingerprints.sqlite").write_bytes(b"not a database " * 300)
    else:
        home.write_text("a file where the folder should be")
    root = project_at(tmp_path / "p1", project / "models")
    proc = run_cli(cwd=root, env={"MERGEBUILD_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("fingerprint store") == 1 and "Traceback" not in proc.stderr
    assert lineage_sha(root / "out/mix.safetensors", "real") == sha_of(project / "models/real.safetensors")
    assert len(counted["digests"]) == 2


def test_the_output_is_not_hashed_unless_a_downstream_lineage_names_it(project, counted):
    text = chain().replace('[merges.mix2]', 'output = "out/mix1.safetensors"\n[merges.mix2]', 1)
    mergefile(project / "mergefile.toml", text)
    run_cli(cwd=project, check=True)
    # mix1's file is named by final's lineage (hashed while final computed); final's is not read again
    assert sorted(counted["sha256"]) == ["anime.safetensors", "base.safetensors", "mix1.safetensors",
                                         "real.safetensors"]
    final, mix1 = project / "out/final.safetensors", project / "out/mix1.safetensors"
    assert lineage_sha(final, "mix1") == sha_of(mix1)
    with safe_open(str(final), "pt") as f:  # ModelSpec's hash of the tensor data, written while the data was
        meta = f.metadata()
    raw = final.read_bytes()
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    lock = json.loads((project / "mergefile.lock").read_text())["merges"]
    assert lock["mix1"]["output"]["sha256"] == sha_of(mix1) and "sha256" not in lock["final"]["output"]
    # asked for (inspect), it is hashed once and remembered: inspect again and the next lock need no pass
    counted["sha256"].clear()
    assert json.loads(run_cli("inspect", final, "--json", cwd=project, check=True).stdout)["hashes"]["sha256"] == sha_of(final)
    run_cli("inspect", final, "--json", cwd=project, check=True)
    mergefile(project / "mergefile.toml", text.replace("alpha = 0.25", "alpha = 0.3"))
    run_cli(cwd=project, check=True)
    assert counted["sha256"] == []  # the new final is not hashed either; the sources are remembered
    assert lineage_sha(final, "mix1") == sha_of(mix1)


def test_an_output_read_as_a_source_by_the_next_generation_is_not_hashed(project, tmp_path, counted):
    from mergebuild.store.hashing import digest_safetensors
    from mergebuild.tensors.header import read_header

    first = project_at(tmp_path / "p1", project / "models")
    run_cli(cwd=first, check=True)
    mix = first / "out/mix.safetensors"
    second = tmp_path / "p2"
    second.mkdir()
    mergefile(second / "mergefile.toml", f"""
[models.mix]
path = "{mix.as_posix()}"
[models.base]
path = "{(project / 'models/base.safetensors').as_posix()}"
[merges.again]
method = "weighted_sum"
inputs = ["mix", "base"]
alpha = 0.5
output = "out/again.safetensors"
""")
    counted["digests"].clear()
    run_cli(cwd=second, check=True)
    assert counted["digests"] == [str(project / "models/base.safetensors")]  # mix's digests came with its commit
    header = read_header(mix)
    from mergebuild.store.fingerprints import identity, user_store
    from mergebuild.portable import file_stamp

    known = user_store().lookup(identity(mix, file_stamp(mix)))
    hashed = digest_safetensors(mix, header.tensors)  # what hashing the file gives, independently
    assert {n: t[2] for n, t in known.tensors.items()} == hashed
    assert {n: (t[0], tuple(t[1])) for n, t in known.tensors.items()} == {n: (e.dtype, tuple(e.shape))
                                                                         for n, e in header.tensors.items()}
    fresh = {n: (e.dtype, list(e.shape), hashed[n]) for n, e in header.tensors.items()}
    assert known.content == sources._content(fresh, header.metadata)  # the identity hashing would give
    got, want = load(second / "out/again.safetensors"), load(mix)
    key = "model.diffusion_model.out.0.bias"
    assert torch.allclose(got[key].double(), 0.5 * want[key].double() + 0.5 * load(project / "models/base.safetensors")[key].double(), atol=1e-2)
