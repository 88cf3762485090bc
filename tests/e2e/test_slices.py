"""passthrough with slices through the real CLI: frankenmerges and depth up-scaling of model
folders (layers in slice order, renumbered, equal to their source layers; config.json's layer
count and per-layer lists), and a gradient over a vision-language model's language layers only."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.testing.fabricate import make_base, make_finetune
from mergebuild.testing.llms import family_config, family_keys
from tests.conftest import build_json, mergefile, run_cli, small_model, write_model

LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def folder(path, tensors: dict, config: dict | None) -> dict:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return tensors


def two(tmp_path, family: str, layers=(4, 4), style: str = "old", **config) -> tuple[dict, dict]:
    """Folders a and b of `family` (b with its own layer count, made from its own base)."""
    made = []
    for i, (name, n) in enumerate(zip("ab", layers)):
        tensors = make_finetune(make_base(family_keys(family, layers=n, style=style), seed=0, dtype=torch.float32),
                                seed=i + 1)
        made.append(folder(tmp_path / name, tensors, family_config(family, layers=n, **{
            k: v(name, n) if callable(v) else v for k, v in config.items()})))
    return made[0], made[1]


def passthrough(tmp_path, slices: str, inputs='["a", "b"]', extra: str = "") -> None:
    mergefile(tmp_path / "mergefile.toml", f"""
        [models.a]
        path = "a"
        [models.b]
        path = "b"
        [merges.frank]
        method = "passthrough"
        inputs = {inputs}
        slices = {slices}
        output = "out/frank"
    """ + extra)


def source_of(key: str, plan: list[tuple[dict, int]]) -> tuple[dict, str]:
    """The tensor an output layer key is: (the input's tensors, its key there)."""
    m = LAYER.match(key)
    model, layer = plan[int(m.group(2))]
    return model, f"{m.group(1)}{layer}{m.group(3)}"


def test_a_frankenmerge_stacks_renumbers_and_rewrites_the_config(tmp_path):
    names = lambda name, n: [f"{name}{i}" for i in range(n)]  # noqa: E731 - each layer's entry names it
    a, b = two(tmp_path, "qwen3", layers=(4, 6), layer_types=names)
    passthrough(tmp_path, '[ { input = "a", layer_range = [0, 3] }, { input = "b", layer_range = [2, 6] } ]')
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "7 layers: a 0-2, b 2-5" in proc.stderr and "qwen3 (config.json model_type 'qwen3'" in proc.stderr
    out_dir = tmp_path / "out/frank"
    out = load_file(str(out_dir / "model.safetensors"))
    plan = [(a, 0), (a, 1), (a, 2), (b, 2), (b, 3), (b, 4), (b, 5)]
    layer_keys = [k for k in out if LAYER.match(k)]
    assert {int(LAYER.match(k).group(2)) for k in layer_keys} == set(range(7))
    assert len(layer_keys) == 7 * 11  # qwen3: 11 tensors a layer
    for key in layer_keys:
        model, name = source_of(key, plan)
        assert torch.equal(out[key], model[name]), key
    # embeddings from the first slice's input; final norm and head from the last slice's (mergekit)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert len(out) == len(layer_keys) + 3
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    assert config["layer_types"] == ["a0", "a1", "a2", "b2", "b3", "b4", "b5"]
    assert config["model_type"] == "qwen3" and (out_dir / "tokenizer.json").exists()
    # nothing computed; a second build rewrites nothing; the lineage names the method
    again = build_json(cwd=tmp_path)
    assert again["merges"]["frank"]["computed"] == 0
    lineage = json.loads(run_cli("lineage", out_dir, "--json", cwd=tmp_path, check=True).stdout)
    assert lineage["made_by"]["method"] == "passthrough"


def test_depth_upscaling_of_one_model_keeps_each_layers_attention(tmp_path):
    """SOLAR's recipe on a Gemma 2: layers 0-2 then 1-3 of the one input, the input left unnamed."""
    a = folder(tmp_path / "a", make_base(family_keys("gemma2", layers=4), seed=3, dtype=torch.float32),
               family_config("gemma2", layers=4))
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a"
        [merges.up]
        method = "passthrough"
        inputs = ["a"]
        slices = [ { layer_range = [0, 3] }, { layer_range = [1, 4] } ]
        dtype = "bfloat16"
        output = "out/up"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = load_file(str(tmp_path / "out/up/model.safetensors"))
    plan = [(a, 0), (a, 1), (a, 2), (a, 1), (a, 2), (a, 3)]
    for key, t in out.items():
        model, name = source_of(key, plan) if LAYER.match(key) else (a, key)
        assert t.dtype == torch.bfloat16 and torch.equal(t, model[name].to(torch.bfloat16)), key
    assert "lm_head.weight" not in out  # Gemma ties its head to the embeddings
    config = json.loads((tmp_path / "out/up/config.json").read_text())
    s, f = "sliding_attention", "full_attention"
    assert config["num_hidden_layers"] == 6 and config["layer_types"] == [s, f, s, f, s, f]


@pytest.mark.parametrize("style", ["old", "new"])
def test_a_vlm_slices_its_language_model_and_keeps_its_vision_tower(tmp_path, style):
    a, b = two(tmp_path, "gemma3-vl", style=style)
    passthrough(tmp_path, '[ { input = "a", layer_range = [0, 4] }, { input = "b", layer_range = [2, 4] } ]')
    run_cli(cwd=tmp_path, check=True)
    out = load_file(str(tmp_path / "out/frank/model.safetensors"))
    plan = [(a, 0), (a, 1), (a, 2), (a, 3), (b, 2), (b, 3)]
    vision = [k for k in a if "vision_tower" in k]
    assert vision and all(torch.equal(out[k], a[k]) for k in vision)  # untouched, from the first slice's input
    language = [k for k in out if LAYER.match(k) and "vision_tower" not in k]
    assert {int(LAYER.match(k).group(2)) for k in language} == set(range(6))
    for key in language:
        model, name = source_of(key, plan)
        assert torch.equal(out[key], model[name]), key
    assert set(out) == set(language) | set(vision) | {k for k in a if not LAYER.match(k)}
    config = json.loads((tmp_path / "out/frank/config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6 and config["vision_config"] == {"num_hidden_layers": 3}
    assert len(config["text_config"]["layer_types"]) == 6


def test_scale_by_rule_zeroes_projections(tmp_path):
    a, _ = two(tmp_path, "llama")
    passthrough(tmp_path, '[ { layer_range = [0, 4] } ]', inputs='["a"]', extra="""
        [[merges.frank.rules]]
        match = ["o_proj", "down_proj"]
        scale = 0.0
    """)
    build = build_json(cwd=tmp_path)
    out = load_file(str(tmp_path / "out/frank/model.safetensors"))
    for key, t in out.items():
        assert torch.equal(t, torch.zeros_like(t) if ("o_proj" in key or "down_proj" in key) else a[key]), key
    assert build["merges"]["frank"]["computed"] == 8


@pytest.mark.parametrize("component,language,vision", [(None, "gradient", 0.5), ("vision", 0.5, "gradient")])
def test_a_gradient_on_a_vlm_spans_one_stack_of_layers(tmp_path, component, language, vision):
    a, b = two(tmp_path, "gemma3-vl", style="new")
    b = {k: v + 1.0 for k, v in b.items()}  # every element of b - a is about 1: shares read off the mean
    save_file(b, str(tmp_path / "b/model.safetensors"))
    extra = f', component = "{component}"' if component else ""
    mergefile(tmp_path / "mergefile.toml", f"""
        [models.a]
        path = "a"
        [models.b]
        path = "b"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {{ gradient = [0.0, 1.0], default = 0.5{extra} }}
        output = "out/m.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = load_file(str(tmp_path / "out/m.safetensors"))
    for key, t in out.items():
        share = ((t - a[key]) / (b[key] - a[key])).mean().item()
        m = LAYER.match(key)
        stack = None if m is None else ("vision" if "vision_tower" in key else "language")
        spans = {"language": (language, 3), "vision": (vision, 2)}
        want, last = spans.get(stack, (0.5, 1))
        expected = int(m.group(2)) / last if want == "gradient" else want
        assert share == pytest.approx(expected, abs=1e-4), key


BAD = {
    "a slice past the model's layers": (
        '[ { input = "a", layer_range = [0, 3] }, { input = "b", layer_range = [2, 9] } ]',
        ["[merges.frank]", "slices[1].layer_range [2, 9]: b has 4 layers (0..3"]),
    "an input no merge input names": (
        '[ { input = "a", layer_range = [0, 3] }, { input = "bb", layer_range = [0, 3] } ]',
        ["slices[1].input: 'bb' is not an input of this merge (a, b) (did you mean 'b'?)"]),
    "an input in no slice": (
        '[ { input = "a", layer_range = [0, 3] }, { input = "a", layer_range = [1, 4] } ]',
        ["input 'b' is in no slice"]),
    "a slice without its input": (
        '[ { layer_range = [0, 3] } ]', ["slices[0]: which input?"]),
    "mergekit's field names": (
        '[ { model = "a", layer_range = [0, 3] } ]', ["[merges.frank] slices[0].model", "did you mean 'input'"]),
    "a backwards range": (
        '[ { input = "a", layer_range = [3, 1] } ]', ["[merges.frank] slices[0].layer_range", "0 <= start < end"]),
    "no slices for two inputs": ("[]", ["passthrough of 2 inputs needs slices"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_slices_are_one_line_exit_2(tmp_path, case):
    two(tmp_path, "llama")
    slices, fragments = BAD[case]
    passthrough(tmp_path, slices)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("first_is_layered", [True, False])
def test_a_slice_of_a_model_without_layers_is_refused(tmp_path, first_is_layered):
    folder(tmp_path / "a", make_base(family_keys("llama"), seed=0, dtype=torch.float32), family_config("llama"))
    write_model(tmp_path / "sd.safetensors", small_model(0))
    mergefile(tmp_path / "mergefile.toml", f"""
        [models.a]
        path = "a"
        [models.sd]
        path = "sd.safetensors"
        [merges.frank]
        method = "passthrough"
        inputs = {'["a", "sd"]' if first_is_layered else '["sd", "a"]'}
        slices = [ {{ input = "a", layer_range = [0, 2] }}, {{ input = "sd", layer_range = [0, 2] }} ]
        output = "out/frank"
    """)
    proc = run_cli(cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    if first_is_layered:
        assert "slices[1]: sd is not a layered model: no key matches" in lines[0]
    else:
        assert "slices need a model with numbered layers: sd is sd1" in lines[0]


def test_a_gradient_names_a_stack_the_model_has(tmp_path):
    two(tmp_path, "gemma3-vl")
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a"
        [models.b]
        path = "b"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = { gradient = [0.0, 1.0], component = "audio" }
        output = "out/m.safetensors"
    """)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "alpha.component: gemma3-vl has no component 'audio' with layers (it has language, vision)" in proc.stderr
    text = (tmp_path / "mergefile.toml").read_text().replace('component = "audio"', "component = 3")
    (tmp_path / "mergefile.toml").write_text(text)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "alpha.component: expected a component name, got 3" in proc.stderr


def test_mistral_is_told_by_its_config_and_a_broken_config_is_a_note(tmp_path):
    two(tmp_path, "mistral")
    passthrough(tmp_path, '[ { input = "a", layer_range = [0, 2] }, { input = "b", layer_range = [2, 4] } ]')
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "architecture mistral (config.json model_type 'mistral'; 4 layers)" in proc.stderr
    (tmp_path / "a/config.json").write_text("{not json")
    proc = run_cli("-v", cwd=tmp_path, check=True)
    assert "not a readable config.json" in proc.stderr and "architecture llama (keys start with" in proc.stderr
