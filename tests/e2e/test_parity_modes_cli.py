"""The parity modes through the Mergefile and the real CLI: one Mergefile using every mode, the
old spellings keeping their cache keys, A1111's input dtypes reaching its tasks, and unknown
modes refused in one line. The modes' numbers are checked in tests/methods/test_parity_modes.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergebuild import api
from tests.conftest import mergefile, run_cli, write_model
from tests.methods.test_parity_modes import (
    a1111_add_difference, a1111_weighted_sum, as_torch, dare_masks, mergekit_l1, mergekit_ties, same_bytes, stored,
)
from tests.methods.test_parity_slerp import mecha_slerp

# --- through the Mergefile and the CLI ------------------------------------------------------


def sd_models(tmp_path):
    """Three float16 SD1-keyed files: a base and two fine-tunes, plus a float32 one."""
    keys = ["model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.out.0.bias",
            "model.diffusion_model.middle_block.1.proj_out.weight", "cond_stage_model.transformer.text_model."
            "final_layer_norm.weight"]
    shapes = [(32, 32), (32,), (32, 32), (48,)]
    out = {}
    for i, name in enumerate(("base", "real", "anime")):
        tensors = {}
        for j, (key, shape) in enumerate(zip(keys, shapes)):
            g = torch.Generator().manual_seed(100 * j)
            t = torch.randn(shape, generator=g) * 0.05
            if i:
                t = t + torch.randn(shape, generator=torch.Generator().manual_seed(100 * j + i)) * 0.01
            tensors[key] = t.half()
        write_model(tmp_path / "models" / f"{name}.safetensors", tensors)
        out[name] = tensors
    return out


MODELS = """
    [models.base]
    path = "models/base.safetensors"
    [models.real]
    path = "models/real.safetensors"
    [models.anime]
    path = "models/anime.safetensors"
"""


def test_parity_modes_end_to_end(tmp_path):
    models = sd_models(tmp_path)
    mergefile(tmp_path / "mergefile.toml", MODELS + """
    [merges.ws]
    method = "weighted_sum"
    inputs = ["real", "anime"]
    alpha = 0.3
    arithmetic = "a1111"
    output = "out/ws.safetensors"
    [merges.ad]
    method = "add_difference"
    inputs = ["ws", "anime", "base"]
    alpha = 0.5
    arithmetic = "a1111"
    output = "out/ad.safetensors"
    [merges.exact]
    method = "weighted_sum"
    inputs = ["real", "anime"]
    alpha = 0.3
    output = "out/exact.safetensors"
    [merges.dare]
    method = "dare"
    inputs = ["base", "real", "anime"]
    density = 0.3
    seed = 4
    rescale = "l1"
    output = "out/dare.safetensors"
    [merges.ties]
    method = "ties"
    inputs = ["base", "real", "anime"]
    density = 0.2
    sign = "count_mergekit"
    ties_rules = "mergekit"
    output = "out/ties.safetensors"
    [merges.slerp]
    method = "slerp"
    inputs = ["real", "anime"]
    alpha = 0.5
    variant = "mecha"
    output = "out/slerp.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = {n: load_file(str(tmp_path / "out" / f"{n}.safetensors")) for n in ("ws", "ad", "exact", "dare", "ties",
                                                                               "slerp")}
    base, real, anime = (models[n] for n in ("base", "real", "anime"))
    differs = 0
    for key in base:
        ws = as_torch(a1111_weighted_sum(stored(real[key], "F16"), stored(anime[key], "F16"), 0.3))
        assert same_bytes(out["ws"][key], ws), key  # A1111's float16 bytes, read back from the file
        ad = as_torch(a1111_add_difference(stored(ws, "F16"), stored(anime[key], "F16"), stored(base[key], "F16"), 0.5))
        assert same_bytes(out["ad"][key], ad), key
        assert same_bytes(out["exact"][key], torch.lerp(real[key].float(), anime[key].float(), 0.3).half())
        differs += int((out["exact"][key] != ws).sum())
        b, r, a = (m[key].float() for m in (base, real, anime))
        masks = dare_masks(b.shape, 2, 0.3, seed=4, key=key)
        dare = (b + (mergekit_l1(r - b, masks[0].float()) + mergekit_l1(a - b, masks[1].float()))).half()
        assert same_bytes(out["dare"][key], dare), key
        assert same_bytes(out["ties"][key], mergekit_ties(b, [r, a], 0.2, [1.0, 1.0], 1.0, "count").half()), key
        assert same_bytes(out["slerp"][key], mecha_slerp(r, a, torch.tensor(0.5)).half())
    assert differs > 0  # the modes are not the default


def test_old_spellings_keep_their_cache_keys(tmp_path):
    """rescale = true is the old Mergefile's default, and a weighted_sum that does not name
    arithmetic plans the parameters it had: the same cache keys as before the modes."""
    sd_models(tmp_path)
    body = MODELS + """
    [merges.ws]
    method = "weighted_sum"
    inputs = ["real", "anime"]
    alpha = 0.3
    output = "out/ws.safetensors"
    [merges.dare]
    method = "dare"
    inputs = ["base", "real", "anime"]
    {rescale}
    output = "out/dare.safetensors"
    """

    def tasks(rescale: str):
        mergefile(tmp_path / "mergefile.toml", body.format(rescale=rescale))
        plan = api.plan(tmp_path / "mergefile.toml")
        return {m: {n: t for n, t in plan.merges[m].tasks.items() if t.method is not None} for m in ("ws", "dare")}

    default, true, density = tasks(""), tasks("rescale = true"), tasks('rescale = "density"')
    assert all(t.params == {"alpha": 0.3} for t in default["ws"].values())
    assert all(t.params["rescale"] is True for t in default["dare"].values())
    assert {n: t.key for n, t in true["dare"].items()} == {n: t.key for n, t in default["dare"].items()}
    assert all(density["dare"][n].key != t.key for n, t in default["dare"].items())  # same bytes, its own key
    mergefile(tmp_path / "mergefile.toml", body.format(rescale="rescale = false"))
    run_cli(cwd=tmp_path, check=True)


def test_a1111_tasks_carry_their_inputs_dtypes(tmp_path):
    sd_models(tmp_path)
    mergefile(tmp_path / "mergefile.toml", MODELS + """
    [merges.ws]
    method = "weighted_sum"
    inputs = ["real", "anime"]
    alpha = 0.3
    arithmetic = "a1111"
    output = "out/ws.safetensors"
    """)
    tasks = [t for t in api.plan(tmp_path / "mergefile.toml").merges["ws"].tasks.values() if t.method is not None]
    assert tasks and all(t.params == {"alpha": 0.3, "arithmetic": "a1111", "dtypes": ["F16", "F16"]} for t in tasks)


UNKNOWN = {
    "arithmetic": ('method = "weighted_sum"\ninputs = ["real", "anime"]\nalpha = 0.3\narithmetic = "A1111"',
                   "arithmetic: expected 'exact' | 'a1111', got 'A1111'"),
    "sign": ('method = "ties"\ninputs = ["base", "real", "anime"]\nsign = "majority"',
             "sign: expected 'mass' | 'count' | 'count_mergekit', got 'majority'"),
    "rescale": ('method = "dare"\ninputs = ["base", "real", "anime"]\nrescale = "L2"',
                "rescale: expected 'density' | 'l1' | 'none' (true = 'density', false = 'none'), got 'L2'"),
    "rescale-number": ('method = "della"\ninputs = ["base", "real", "anime"]\nrescale = 1', "got 1"),
    "ties_rules": ('method = "ties"\ninputs = ["base", "real", "anime"]\nties_rules = "sd-mecha"',
                   "ties_rules: expected 'mergebuild' | 'mergekit', got 'sd-mecha'"),
    "variant": ('method = "slerp"\ninputs = ["real", "anime"]\nalpha = 0.5\nvariant = "comfy"',
                "variant: expected 'mergekit' | 'mecha', got 'comfy'"),
    "ties_rules-elsewhere": ('method = "dare_ties"\ninputs = ["base", "real", "anime"]\nties_rules = "mergekit"',
                             "unknown parameter of dare_ties"),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_an_unknown_mode_is_one_mergefile_error(tmp_path, case):
    sd_models(tmp_path)
    text, message = UNKNOWN[case]
    mergefile(tmp_path / "mergefile.toml", MODELS + "[merges.m]\n" + text + '\noutput = "out/m.safetensors"\n')
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "[merges.m]" in proc.stderr and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()
