"""Bad input: a one-line message naming the file, table and field (or file, key and shapes),
exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import chain, mergefile, run_cli, small_model, write_model

CASES = {
    "unknown input": (
        chain().replace('inputs = ["real", "anime"]', 'inputs = ["real", "anmie"]'),
        ["[merges.mix1] inputs", "unknown model or merge 'anmie'", "did you mean 'anime'"],
    ),
    "unknown method": (
        chain().replace('method = "add_difference"', 'method = "add_diference"'),
        ["[merges.mix2] method", "unknown method 'add_diference'", "did you mean 'add_difference'"],
    ),
    "wrong number of inputs": (
        chain().replace('inputs = ["mix1", "anime", "base"]', 'inputs = ["mix1", "anime"]'),
        ["[merges.mix2] inputs", "add_difference takes 3 inputs (A, B, C), got 2"],
    ),
    "unknown parameter": (
        chain().replace("alpha = 0.25", "alpah = 0.25"),
        ["[merges.final] alpah", "unknown parameter of weighted_sum", "did you mean 'alpha'"],
    ),
    "missing parameter": (
        chain().replace("alpha = 0.25\n", ""),
        ["[merges.final] alpha", "missing: weighted_sum needs alpha"],
    ),
    "mistyped parameter": (
        chain().replace("alpha = 0.25", 'alpha = "0.25"'),
        ["[merges.final] alpha", "expected float", "got '0.25'"],
    ),
    "cycle": (
        chain().replace('inputs = ["real", "anime"]', 'inputs = ["final", "anime"]'),
        ["cycle:", "mix1", "mix2", "final"],
    ),
    "bad toml": (chain() + "\n[merges.x\n", ["mergefile.toml", "invalid TOML"]),
    "bad dtype": (
        chain().replace('output = "out/final.safetensors"', 'output = "out/final.safetensors"\ndtype = "fp8"'),
        ["[merges.final] dtype", "'fp8' is not one of float16, bfloat16, float32"],
    ),
    "missing file": (
        chain().replace("models/base.safetensors", "models/nope.safetensors"),
        ["[models.base] path", "file not found", "nope.safetensors"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_mergefile_exits_2_names_table_and_field(project, case):
    text, expected = CASES[case]
    mergefile(project / "mergefile.toml", text)
    proc = run_cli(cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert not (project / "out").exists()


def test_corrupt_safetensors_file(project):
    (project / "models/base.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    mergefile(project / "mergefile.toml", chain())
    proc = run_cli(cwd=project)
    assert proc.returncode == 2
    assert "base.safetensors: not a valid safetensors file" in proc.stderr
    assert not (project / "out").exists()


def test_truncated_safetensors_file(project):
    path = project / "models/anime.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    mergefile(project / "mergefile.toml", chain())
    proc = run_cli(cwd=project)
    assert proc.returncode == 2 and "outside the file (truncated?)" in proc.stderr


def test_shape_mismatch_names_key_and_both_shapes(project):
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    write_model(project / "models/anime.safetensors", small_model(5, extra={key: torch.zeros(8, 6).half()}))
    mergefile(project / "mergefile.toml", chain())
    proc = run_cli(cwd=project)
    assert proc.returncode == 2
    assert f"[merges.mix1] key '{key}': shapes differ: real [8, 8] vs anime [8, 6]" in proc.stderr
    assert not (project / "out").exists()


def test_unknown_target_is_a_usage_error(project):
    mergefile(project / "mergefile.toml", chain())
    proc = run_cli("nosuch", cwd=project)
    assert proc.returncode == 2 and "target 'nosuch' is unknown" in proc.stderr


def test_missing_mergefile(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "no such Mergefile" in proc.stderr


def test_unknown_option_is_exit_2(project):
    proc = run_cli("--no-such-flag", cwd=project)
    assert proc.returncode == 2
