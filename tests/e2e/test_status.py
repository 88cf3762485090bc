"""mergefile.lock, `mergebuild status` (like dvc status / make -q) and `mergebuild explain`."""

from __future__ import annotations

import json

from tests.conftest import chain, load, mergefile, run_cli, write_model


def status(project, *args):
    return json.loads(run_cli("status", "--json", *args, cwd=project, check=True).stdout)["targets"]


def test_lock_records_params_inputs_and_outputs(project):
    import hashlib

    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    lock = json.loads((project / "mergefile.lock").read_text())
    final = lock["merges"]["final"]
    assert final["params"] == {"alpha": 0.25} and final["method"] == "weighted_sum" and final["version"] == 1
    real_sha = hashlib.sha256((project / "models/real.safetensors").read_bytes()).hexdigest()
    assert final["input_files"]["real"] == {"path": "models/real.safetensors", "sha256": real_sha,
                                            "size": (project / "models/real.safetensors").stat().st_size}
    out = project / "out/final.safetensors"
    out_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    # the build does not read its output again only to hash it: the lock names it by identity and size
    assert final["output"] == {"path": "out/final.safetensors", "size": out.stat().st_size,
                               "identity": final["identity"]}
    stamp = (project / "mergefile.lock").stat().st_mtime_ns
    run_cli(cwd=project, check=True)
    assert (project / "mergefile.lock").stat().st_mtime_ns == stamp  # a no-op build rewrites nothing
    # once something hashed the output (inspect), the next build's lock carries it
    assert json.loads(run_cli("inspect", out, "--json", cwd=project, check=True).stdout)["hashes"]["sha256"] == out_sha
    run_cli(cwd=project, check=True)
    final = json.loads((project / "mergefile.lock").read_text())["merges"]["final"]
    assert final["output"]["sha256"] == out_sha and final["output"]["autov2"] == out_sha[:10]


def test_status_reasons_and_check_exit_code(project):
    import hashlib

    mf = mergefile(project / "mergefile.toml", chain())
    assert status(project) == {"final": {"up_to_date": False, "reasons": ["never built from this Mergefile"]}}
    run_cli(cwd=project, check=True)
    assert status(project)["final"] == {"up_to_date": True, "reasons": []}
    assert run_cli("status", "--check", cwd=project).returncode == 0

    mf.write_text(chain(a2=0.7))
    assert status(project)["final"]["reasons"] == ["mix2.alpha: 0.5 -> 0.7"]
    proc = run_cli("status", "--check", cwd=project)
    assert proc.returncode == 1 and "final: out of date" in proc.stdout
    mf.write_text(chain())
    assert status(project)["final"]["up_to_date"]  # back as it was built: nothing to do

    real = load(project / "models/real.safetensors")
    before = hashlib.sha256((project / "models/real.safetensors").read_bytes()).hexdigest()
    real["model.diffusion_model.out.0.bias"] += 1
    write_model(project / "models/real.safetensors", real)
    after = hashlib.sha256((project / "models/real.safetensors").read_bytes()).hexdigest()
    reasons = status(project)["final"]["reasons"]
    assert reasons == [f"models.real: content changed (sha256 {before[:4]}.. -> {after[:4]}..)"]


def test_status_sees_an_output_changed_on_disk(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    with open(project / "out/final.safetensors", "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert status(project)["final"]["reasons"] == ["out/final.safetensors changed on disk"]
    run_cli(cwd=project, check=True)
    assert status(project)["final"]["up_to_date"]


def test_explain_groups_dirty_tensors_by_block(project):
    mf = mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    mf.write_text(chain(a3=0.9))
    doc = json.loads(run_cli("explain", "final", "--json", cwd=project, check=True).stdout)["merges"]
    assert doc["mix1"]["dirty"] == 0 and doc["mix1"]["by_block"] == {}
    final = doc["final"]
    assert final["reasons"] == ["final.alpha: 0.25 -> 0.9"]
    assert sum(final["by_block"].values()) == final["dirty"] > 0
    assert set(final["by_block"]) == {"BASE", "IN00", "IN01", "IN11", "OUT11"}
    text = run_cli("explain", "final", cwd=project, check=True).stdout
    assert "because final.alpha: 0.25 -> 0.9" in text and "by block" in text
