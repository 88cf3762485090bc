"""Architectures, block weights, presets, gradients, elemental rules and include/exclude on
fabricated SD1, SDXL and Llama-shaped models (real key names, shrunk shapes)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base, make_finetune
from tests.conftest import build_json, load, mergefile, run_cli, write_model

U = "model.diffusion_model."


def reference_block(key: str, sdxl: bool = False, time_embed: str = "IN00") -> str:
    """The MBW key -> block rule of the reference (bbc-mc = sd-meh = supermerger), written out."""
    last = "OUT08" if sdxl else "OUT11"
    if key.startswith(U + "time_embed.") or key.startswith(U + "label_emb."):
        return time_embed
    if key.startswith(U + "out."):
        return last
    m = re.match(re.escape(U) + r"input_blocks\.(\d+)\.", key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if key.startswith(U + "middle_block."):
        return "M00"
    m = re.match(re.escape(U) + r"output_blocks\.(\d+)\.", key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


@pytest.fixture(scope="module")
def sd1_models(tmp_path_factory):
    return fabricate_family(tmp_path_factory.mktemp("sd1"), "sd1-ldm", shrink=32, names=("a", "b"), prefix="")


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    return fabricate_family(tmp_path_factory.mktemp("sdxl"), "sdxl-sgm", shrink=32, names=("a", "b"), prefix="")


def two_model_project(tmp_path, models, merge: str, settings: str = "") -> None:
    for model, name in zip(models, ("a", "b")):
        shutil.copy(model, tmp_path / f"{name}.safetensors")
    mergefile(tmp_path / "mergefile.toml", settings + """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        """ + merge)


WS = """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        output = "m.safetensors"
        dtype = "float32"
"""


def share_of_b(tmp_path) -> dict[str, float]:
    """For each merged key, the alpha the build used: (out - a) / (b - a)."""
    a, b, out = (load(tmp_path / f"{n}.safetensors") for n in ("a", "b", "m"))
    shares = {}
    for key, t in out.items():
        if t.is_floating_point() and "." in key and not torch.equal(a[key], b[key]):
            d = (b[key].double() - a[key].double())
            i = d.abs().argmax()
            shares[key] = round(((t.double() - a[key].double()).flatten()[i] / d.flatten()[i]).item(), 2)
    return shares


def test_block_table_reaches_the_right_keys_sd1(tmp_path, sd1_models):
    blocks = {"BASE": 0.1, "IN00": 0.2, "IN05": 0.3, "M00": 0.4, "OUT11": 0.5}
    table = ", ".join(f"{k} = {v}" for k, v in blocks.items())
    two_model_project(tmp_path, sd1_models, WS + f"        alpha = {{ default = 0.9, {table} }}\n")
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "sd1" in proc.stderr
    for key, share in share_of_b(tmp_path).items():
        assert share == blocks.get(reference_block(key), 0.9), key


def test_time_embed_in_base_setting(tmp_path, sd1_models):
    two_model_project(tmp_path, sd1_models, WS + "        alpha = { default = 0.0, BASE = 1.0 }\n",
                      settings='[settings]\ntime_embed = "BASE"\n')
    run_cli(cwd=tmp_path, check=True)
    shares = share_of_b(tmp_path)
    assert shares[U + "time_embed.0.weight"] == 1.0 and shares[U + "input_blocks.0.0.weight"] == 0.0


def test_list_of_26_and_preset(tmp_path, sd1_models):
    values = [round(i / 25, 2) for i in range(26)]
    two_model_project(tmp_path, sd1_models, WS + f"        alpha = {values}\n")
    run_cli(cwd=tmp_path, check=True)
    names = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    for key, share in share_of_b(tmp_path).items():
        assert share == values[names.index(reference_block(key))], key
    (tmp_path / "mergefile.toml").write_text((tmp_path / "mergefile.toml").read_text().replace(str(values), '"GRAD_V"'))
    run_cli(cwd=tmp_path, check=True)
    shares = share_of_b(tmp_path)
    assert shares[U + "middle_block.1.proj_in.weight"] == 0.0
    assert shares[U + "input_blocks.1.1.proj_in.weight"] == 0.92  # IN01 = 11/12
    assert shares[U + "out.2.weight"] == 1.0


def test_changing_one_block_recomputes_only_it_and_its_readers(tmp_path, sd1_models):
    shutil.copy(sd1_models[0], tmp_path / "c.safetensors")
    chain = WS.replace('output = "m.safetensors"\n', "") + """
        alpha = {{ default = 0.5, IN05 = {w} }}
        [merges.down]
        method = "add_difference"
        inputs = ["m", "b", "c"]
        alpha = 0.3
        output = "down.safetensors"
        [models.c]
        path = "c.safetensors"
    """
    two_model_project(tmp_path, sd1_models, chain.format(w=0.2))
    build_json(cwd=tmp_path)
    (tmp_path / "mergefile.toml").write_text((tmp_path / "mergefile.toml").read_text().replace("IN05 = 0.2", "IN05 = 0.7"))
    doc = build_json(cwd=tmp_path)["merges"]
    a = load(tmp_path / "a.safetensors")
    in05 = [k for k, t in a.items() if t.is_floating_point() and reference_block(k) == "IN05"]
    assert doc["m"]["computed"] == len(in05) == doc["down"]["computed"]


def test_sdxl_blocks_and_a_block_it_does_not_have(tmp_path, sdxl_models):
    two_model_project(tmp_path, sdxl_models, WS + "        alpha = { default = 0.0, IN08 = 0.6, OUT08 = 1.0 }\n")
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "sdxl" in proc.stderr
    for key, share in share_of_b(tmp_path).items():
        assert share == {"IN08": 0.6, "OUT08": 1.0}.get(reference_block(key, sdxl=True), 0.0), key
    text = (tmp_path / "mergefile.toml").read_text().replace("IN08 = 0.6", "IN11 = 0.6")
    (tmp_path / "mergefile.toml").write_text(text)
    (tmp_path / "m.safetensors").unlink()
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "[merges.m] alpha.IN11: block IN11 does not exist in sdxl" in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_rules_later_wins_with_blocks_match_regex_and_not(tmp_path, sd1_models):
    rules = """
        alpha = 0.0
        [[merges.m.rules]]
        blocks = "IN04-IN08 M00"
        match = "attn2"
        alpha = 0.2
        [[merges.m.rules]]
        blocks = "M00"
        match = "attn2"
        alpha = 0.3
        [[merges.m.rules]]
        regex = "^cond_stage_model\\\\..*mlp"
        alpha = 0.4
        [[merges.m.rules]]
        blocks = "OUT11"
        match = ["norm"]
        not = true
        alpha = 0.5
    """
    two_model_project(tmp_path, sd1_models, WS + rules)
    run_cli(cwd=tmp_path, check=True)
    in_range = {"IN04", "IN05", "IN06", "IN07", "IN08", "M00"}
    for key, share in share_of_b(tmp_path).items():
        block = reference_block(key)
        expected = 0.0
        if block in in_range and "attn2" in key:
            expected = 0.3 if block == "M00" else 0.2
        if re.search(r"^cond_stage_model\..*mlp", key):
            expected = 0.4
        if block == "OUT11" and "norm" not in key:
            expected = 0.5
        assert share == expected, key


def test_include_and_exclude(tmp_path, sd1_models):
    two_model_project(tmp_path, sd1_models, WS + """
        alpha = 1.0
        include = ["^model\\\\.diffusion_model\\\\."]
        exclude = "middle_block"
    """)
    run_cli(cwd=tmp_path, check=True)
    a, out = load(tmp_path / "a.safetensors"), load(tmp_path / "m.safetensors")
    shares = share_of_b(tmp_path)
    for key in out:
        if key.startswith(U) and "middle_block" not in key:
            assert shares.get(key, 1.0) == 1.0
        else:
            assert torch.equal(out[key], a[key].float() if a[key].is_floating_point() else a[key]), key


def llama_project(tmp_path, alpha: str, layers: int = 2, nan_at: str | None = None) -> None:
    """Two Llama-shaped models a and b (b a fine-tune of a) and WS with the given alpha."""
    base = make_base(llama_keys(layers=layers), seed=0, dtype=torch.float32)
    tuned = make_finetune(base, seed=1)
    if nan_at is not None:
        tuned[nan_at][0, 0] = float("nan")
    write_model(tmp_path / "a.safetensors", base)
    write_model(tmp_path / "b.safetensors", tuned)
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
    """ + WS + f"        alpha = {alpha}\n")


def test_generic_llama_layer_gradient(tmp_path):
    llama_project(tmp_path, "{ gradient = [0.0, 0.6], default = 1.0 }", layers=4)
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "llama" in proc.stderr and "4 layers" in proc.stderr
    for key, share in share_of_b(tmp_path).items():
        m = re.search(r"layers\.(\d+)\.", key)
        assert share == (round(0.6 * int(m.group(1)) / 3, 2) if m else 1.0), key


def test_generic_models_reject_block_tables(tmp_path):
    llama_project(tmp_path, "{ default = 0.5, IN05 = 0.2 }")
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "block IN05 does not exist in llama" in proc.stderr


def test_nan_in_an_input_is_a_clear_error(tmp_path):
    llama_project(tmp_path, "0.5", nan_at="model.layers.1.mlp.up_proj.weight")
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "[models.b]" in proc.stderr and "'model.layers.1.mlp.up_proj.weight' holds NaN or Inf" in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_json_reports_the_architecture(tmp_path, sd1_models):
    two_model_project(tmp_path, sd1_models, WS + "        alpha = 0.5\n")
    doc = json.loads(run_cli("--json", "-q", cwd=tmp_path, check=True).stdout)
    assert doc["merges"]["m"]["architecture"] == "sd1"
