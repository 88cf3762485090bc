"""`mergebuild import` of mergekit configs that use slices (frankenmerges, depth up-scaling,
merges per slice), a tokenizer (tokenizer_source, the tokenizer: block) and the methods mergebuild
has under mergekit's names: each imported, built through the real CLI and checked against
mergekit's formula computed here (float64), and for the methods against mergekit 0.1.5's own
output (tests/data/mergekit_0.1.5)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mergekit_digests, run_cli
from safetensors.torch import load_file, save_file
from test_import import LAYER, close, folder_tensors, gradient, import_and_build, llamas, mergekit_slerp  # noqa: F401

from mergebuild.testing.fabricate import llama_trio, tensor_sha256
from tests.methods import test_mergekit_methods as tm  # its cases and float64 references

DATA = Path(__file__).resolve().parent.parent / "data" / "mergekit_0.1.5"


def layer_of(key: str) -> int | None:
    m = LAYER.search(key)
    return None if m is None else int(m.group(1))


def renumbered(key: str, layer: int) -> str:
    return LAYER.sub(f".layers.{layer}.", key, count=1)


def stacked(plan: list[tuple[str, int]], models: dict, first: str, last: str, value) -> dict:
    """mergekit's output of one-source slices: output layer i is layer plan[i] = (model, layer)
    of that model, as value(model, its key, i) gives it; the keys before the layers come from
    the first slice's model, those after them from the last's (i is None for both)."""
    out = {}
    for key in models[first]:
        if layer_of(key) is None:
            out[key] = value(first if "embed" in key else last, key, None)
        elif layer_of(key) == 0:
            for i, (model, source) in enumerate(plan):
                out[renumbered(key, i)] = value(model, renumbered(key, source), i)
    return out


def flat(text: str) -> str:
    """A Mergefile's text with its comments' line breaks undone, for phrases that wrap."""
    return " ".join(re.sub(r"\n#\s*", " ", text).split())


def config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- slices ---------------------------------------------------------------------------------
def test_a_frankenmerge_is_a_passthrough_of_its_slices(llamas):
    """One source per slice: one passthrough merge; a scale every slice shares is its scale and rules."""
    root, m = llamas
    (root / "frank.yml").write_text("""
merge_method: passthrough
slices:
  - sources: [{model: ft1, layer_range: [0, 3]}]
  - sources: [{model: ft2, layer_range: [2, 4]}]
parameters:
  scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]
dtype: float32
""")
    text = import_and_build(root, "frank.yml", "--models", "models")
    assert len(re.findall(r"^\[merges\.", text, re.M)) == 1 and 'method = "passthrough"' in text
    assert '{ input = "ft1", layer_range = [0, 3] }, { input = "ft2", layer_range = [2, 4] }' in text
    out = root / "out" / "frank"
    expected = stacked([("ft1", 0), ("ft1", 1), ("ft1", 2), ("ft2", 2), ("ft2", 3)], m, "ft1", "ft2",
                       lambda model, key, _: m[model][key].double() * (0.5 if "o_proj" in key else 1.0))
    result = folder_tensors(out)
    assert set(result) == set(expected)
    close(result, expected)
    assert config(out)["num_hidden_layers"] == 5


def test_depth_up_scaling_with_a_slice_of_its_own_scale(llamas):
    """SOLAR's recipe with the repeated layers' o_proj zeroed and down_proj scaled by a gradient over
    the slice (mergekit's t = i / (n - 1) within it): that slice is cut out and scaled on its own."""
    root, m = llamas
    (root / "up.yml").write_text("""
merge_method: passthrough
slices:
  - sources: [{model: base, layer_range: [0, 3]}]
  - sources:
      - model: base
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: [0.5, 1.5]
            - value: 1.0
""")
    text = import_and_build(root, "up.yml", "--models", "models")
    assert "[merges.base_layers1-3]" in text and "[merges.up_slice1]" in text
    plan = [("base", 0), ("base", 1), ("base", 2), ("base", 1), ("base", 2), ("base", 3)]

    def value(model, key, i):
        x = m[model][key].double()
        if i is None or i < 3:  # the first slice's layers and embeddings; the final norm and head match no filter
            return x
        return x * (0.0 if "o_proj" in key else gradient([0.5, 1.5], (i - 3) / 2) if "down_proj" in key else 1.0)

    expected = stacked(plan, m, "base", "base", value)
    out = root / "out" / "up"
    result = folder_tensors(out)
    assert set(result) == set(expected)
    close(result, expected)
    assert config(out)["num_hidden_layers"] == 6


def test_a_scaled_passthrough_of_one_model(llamas):
    """passthrough of one model with scale: a filter, and a gradient over its layers (the layer
    count from its config.json), as mergekit's t = layer / (layers - 1)."""
    root, m = llamas
    (root / "scaled.yml").write_text("""
merge_method: passthrough
models:
  - model: ft1
    parameters:
      scale: [{filter: mlp, value: 0.0}, {value: [1.0, 2.0]}]
""")
    text = import_and_build(root, "scaled.yml", "--models", "models")
    assert 'method = "passthrough"' in text and "slices" not in text
    expected = {k: v.double() * (0.0 if "mlp" in k else 1.0 if layer_of(k) is None else 1.0 + layer_of(k) / 3)
                for k, v in m["ft1"].items()}
    close(folder_tensors(root / "out" / "scaled"), expected)


def test_merges_per_slice_become_a_merge_each_then_a_passthrough(llamas):
    """slerp in slices that mix layers (layers 2-3 of the base with 1-2 of ft1) and repeat them:
    each slice a slerp of its sources' cut layers, with its own gradient and filter, stacked."""
    root, m = llamas
    (root / "per.yml").write_text("""
merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 3]}
      - {model: ft1, layer_range: [0, 3]}
    parameters: {t: [0.2, 0.8]}
  - sources:
      - {model: base, layer_range: [2, 4]}
      - {model: ft1, layer_range: [1, 3]}
    parameters:
      t: [{filter: mlp, value: [0.0, 1.0]}, {value: 0.3}]
dtype: float32
""")
    text = import_and_build(root, "per.yml", "--models", "models")
    assert "[merges.per_slice0]" in text and "[merges.per_slice1]" in text and 'method = "slerp"' in text
    slices = [((0, 3), (0, 3), lambda key, t: gradient([0.2, 0.8], t)),
              ((2, 4), (1, 3), lambda key, t: gradient([0.0, 1.0], t) if "mlp" in key else 0.3)]
    expected, out_layer = {}, 0
    for (b0, b1), (f0, _), t_of in slices:
        n = b1 - b0
        for i in range(n):
            for key in (k for k in m["base"] if layer_of(k) == 0):
                t = t_of(key, i / (n - 1))
                expected[renumbered(key, out_layer)] = mergekit_slerp(t, m["base"][renumbered(key, b0 + i)],
                                                                      m["ft1"][renumbered(key, f0 + i)])
            out_layer += 1
    for key in (k for k in m["base"] if layer_of(k) is None):  # t = 0: the first slice's for the embeddings
        t = 0.2 if "embed" in key else 0.3
        expected[key] = mergekit_slerp(t, m["base"][key], m["ft1"][key])
    result = folder_tensors(root / "out" / "per")
    assert set(result) == set(expected)
    close(result, expected)


def test_slices_that_still_have_no_mergefile_form_are_listed(llamas):
    root, _ = llamas
    (root / "odd.yml").write_text("""
merge_method: passthrough
slices:
  - sources:
      - {model: ft1, layer_range: [0, 2]}
      - {model: ft2, layer_range: [0, 2]}
---
name: uneven
merge_method: linear
slices:
  - sources:
      - {model: ft1, layer_range: [0, 2], parameters: {weight: 1}}
      - {model: ft2, layer_range: [0, 3], parameters: {weight: 1}}
---
name: residual
merge_method: linear
slices:
  - sources: [{model: ft1, layer_range: [0, 2], parameters: {weight: 1}}]
    residual_weight: 0.5
---
name: baseless
merge_method: slerp
base_model: base
parameters: {t: 0.5}
slices:
  - sources: [{model: base, layer_range: [0, 2]}, {model: ft1, layer_range: [0, 2]}]
  - sources: [{model: ft1, layer_range: [1, 3]}, {model: ft2, layer_range: [1, 3]}]
---
name: kept
merge_method: passthrough
slices:
  - sources: [{model: ft1, layer_range: [0, 2]}]
  - sources: [{model: ft2, layer_range: [1, 4]}]
tokenizer_source: union
""")
    proc = run_cli("import", "odd.yml", "-o", "mergefile.toml", "--models", "models", cwd=root, check=True)
    text = flat((root / "mergefile.toml").read_text())
    for what in ("passthrough with several sources in a slice", "its sources have different numbers of layers",
                 "residual_weight: no Mergefile form", "tokenizer_source union: mergebuild's passthrough copies",
                 "a slice without the base_model base among its sources"):
        assert what in proc.stderr and what in text, what
    assert "[merges.kept]" in text


# --- tokenizers -----------------------------------------------------------------------------
@pytest.fixture
def vocab_trio(tmp_path):
    """test_vocab's folders a, b, c: tiny Llamas with their own WordLevel tokenizers."""
    tv = pytest.importorskip("test_vocab")
    models = {n: tv.model_folder(tmp_path / "models" / n, n, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    return tmp_path, tv, models, {n: tv.vocab_of(tmp_path / "models" / n) for n in models}


def test_tokenizer_source_union_is_vocab_union(vocab_trio):
    root, tv, models, vocabs = vocab_trio
    (root / "u.yml").write_text("""
merge_method: linear
base_model: a
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
  - {model: c, parameters: {weight: 0.2}}
tokenizer_source: union
""")
    text = import_and_build(root, "u.yml", "--models", "models")
    assert 'vocab = "union"' in text
    out = root / "out" / "u"
    order = [vocabs[n] for n in "abc"]
    union = tv.union_vocab(order, set(tv.ADDED["b"]))
    assert tv.vocab_of(out) == union
    result = load_file(str(out / "model.safetensors"))
    for key in (tv.EMBED, tv.HEAD):  # mergekit's PermutedEmbeddings with base_model a, then linear
        rows = tv.permuted(order, [models[n][key] for n in "abc"], union, len(union))
        torch.testing.assert_close(result[key].double(), tv.soup(rows, [0.5, 0.3, 0.2]), rtol=0, atol=1e-6)


def test_a_tokenizer_block_with_source_base_is_vocab_base(vocab_trio):
    """tokenizer: {source: base}; its pad_to_multiple_of and tokens are listed, not expressed."""
    root, tv, models, vocabs = vocab_trio
    (root / "t.yml").write_text("""
merge_method: task_arithmetic
base_model: a
models:
  - {model: b, parameters: {weight: 0.7}}
tokenizer:
  source: base
  pad_to_multiple_of: 8
  tokens:
    "<|im_start|>": {source: b}
""")
    proc = run_cli("import", "t.yml", "-o", "mergefile.toml", "--models", "models", cwd=root, check=True)
    assert "tokenizer.pad_to_multiple_of" in proc.stderr and "tokenizer.tokens ('<|im_start|>')" in proc.stderr
    assert 'vocab = "base"' in (root / "mergefile.toml").read_text()
    run_cli("-q", cwd=root, check=True)
    out = root / "out" / "t"
    base, other = tv.permuted([vocabs["a"], vocabs["b"]], [models[n][tv.EMBED] for n in "ab"], vocabs["a"],
                              len(vocabs["a"]))
    result = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(result[tv.EMBED].double(), base + 0.7 * (other - base), rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (root / "models" / "a" / "tokenizer.json").read_bytes()


def test_tokenizer_source_naming_a_model_is_its_tokenizer_source(vocab_trio):
    root, tv, models, vocabs = vocab_trio
    (root / "s.yml").write_text("""
merge_method: linear
models:
  - {model: a, parameters: {weight: 0.75}}
  - {model: b, parameters: {weight: 0.25}}
tokenizer_source: b
""")
    assert 'tokenizer_source = "b"' in import_and_build(root, "s.yml", "--models", "models")
    out = root / "out" / "s"
    xa, xb = tv.permuted([vocabs["a"], vocabs["b"]], [models[n][tv.HEAD] for n in "ab"], vocabs["b"], len(vocabs["b"]))
    result = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(result[tv.HEAD].double(), 0.75 * xa + 0.25 * xb, rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (root / "models" / "b" / "tokenizer.json").read_bytes()
    # a model that is not merged: listed, the merge kept
    (root / "e.yml").write_text((root / "s.yml").read_text().replace("tokenizer_source: b", "tokenizer_source: c"))
    proc = run_cli("import", "e.yml", "-o", "e.toml", "--models", "models", cwd=root, check=True)
    assert "tokenizer_source c: not one of the models merged here" in proc.stderr
    assert "[merges.e]" in (root / "e.toml").read_text()


def test_merges_per_slice_align_each_slice_to_the_union(vocab_trio):
    """tokenizer_source union on slices that repeat a layer: each slice's merge aligns its rows to
    the union, so the stacked embeddings (first slice) and head (last) are mergekit's."""
    root, tv, models, vocabs = vocab_trio
    (root / "c.yml").write_text("""
merge_method: linear
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: 0.6}}
      - {model: b, layer_range: [0, 2], parameters: {weight: 0.4}}
  - sources:
      - {model: a, layer_range: [1, 2], parameters: {weight: 0.6}}
      - {model: b, layer_range: [1, 2], parameters: {weight: 0.4}}
tokenizer_source: union
""")
    text = import_and_build(root, "c.yml", "--models", "models")
    assert text.count('vocab = "union"') == 2 and "[merges.a_layers1]" in text
    out = root / "out" / "c"
    order = [vocabs["a"], vocabs["b"]]
    union = tv.union_vocab(order, set(tv.ADDED["b"]))
    assert tv.vocab_of(out) == union and config(out)["vocab_size"] == len(union)
    assert config(out)["num_hidden_layers"] == 3
    result = load_file(str(out / "model.safetensors"))
    for key in (tv.EMBED, tv.HEAD):
        rows = tv.permuted(order, [models[n][key] for n in "ab"], union, len(union))
        torch.testing.assert_close(result[key].double(), tv.soup(rows, [0.6, 0.4]), rtol=0, atol=1e-6)
    key = "model.layers.{}.mlp.up_proj.weight"
    for i, source in enumerate((0, 1, 1)):
        want = tv.soup([models[n][key.format(source)] for n in "ab"], [0.6, 0.4]).double()
        torch.testing.assert_close(result[key.format(i)].double(), want, rtol=0, atol=1e-6)


# --- mergekit's methods ---------------------------------------------------------------------
def mergekit_folders(root) -> dict:
    """The trio mergekit merged (tests/data/mergekit_0.1.5/make.py), as the Llama folders it
    read: model.safetensors and config.json."""
    models = llama_trio(seed=17, **tm.TRIO_SHAPE)
    for name in ("base", "a", "b"):
        (root / name).mkdir(parents=True)
        save_file(models[name], str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                             "model_type": "llama", "num_hidden_layers": 1}))
    return models


def test_mergekits_methods_import_to_its_own_bytes(tmp_path):
    """Each config mergekit 0.1.5 ran (cases.json), as stages of one mergekit-multi file: the
    import gives the inputs and parameters of tests/methods' cases, and the build gives mergekit's
    bytes (on the torch that made them; else within 1e-6) and the float64 formula. karcher with a
    base_model takes it as one more model, last, as mergekit does; the weight it does not read
    is left out."""
    made = json.loads((DATA / "cases.json").read_text())
    m = mergekit_folders(tmp_path)
    stages = [{"name": case, **cfg} for case, cfg in made["cases"].items()]
    stages.append({"name": "karcher_base", "merge_method": "karcher", "base_model": "base",
                   "models": [{"model": "a", "parameters": {"weight": 3.0}}, {"model": "b"}], "dtype": "float32"})
    (tmp_path / "cases.yml").write_text(yaml.safe_dump_all(stages, sort_keys=False))
    text = import_and_build(tmp_path, "cases.yml")
    assert "weight: not read by mergekit's karcher" in flat(text)
    theirs = json.loads((DATA / "outputs.json").read_text())  # sha256 of mergekit's tensors
    same_torch = made["torch"] == torch.__version__
    for case, (inputs, params) in {**tm.CASES, "karcher_base": (["a", "b", "base"], {})}.items():
        section = re.search(rf"\[merges\.{case}\]\n(.*?)(?:\n\n|\Z)", text, re.S).group(1)
        assert f"inputs = {json.dumps(inputs)}" in section, (case, section)
        for name, value in params.items():
            assert f"{name} = {tm.toml_value(value)}" in section, (case, name)
        ours = load_file(str(tmp_path / "out" / case / "model.safetensors"))
        assert set(ours) == set(m["base"])
        for key, t in ours.items():
            assert t.dtype == torch.float32
            if case == "karcher_base":
                tm.close(t, tm.ref_karcher([m[n][key].float() for n in inputs]), tol=1e-5)
                continue
            tm.close(t, tm.reference(case, m, key), tol=1e-5)
            if same_torch:  # else the float64 formula only
                assert tensor_sha256(t) in mergekit_digests(theirs[case][key]), (case, key)


def test_what_mergekits_methods_refuse_is_listed(tmp_path):
    mergekit_folders(tmp_path)
    (tmp_path / "bad.yml").write_text("""
name: three
merge_method: nuslerp
models:
  - {model: a, parameters: {weight: 1}}
  - {model: b, parameters: {weight: 1}}
  - {model: base, parameters: {weight: 1}}
---
name: nobase
merge_method: sce
models: [{model: a}, {model: b}]
---
merge_method: nearswap
base_model: base
models: [{model: a}]
parameters: {t: 0.01}
""")
    proc = run_cli("import", "bad.yml", "-o", "mergefile.toml", cwd=tmp_path, check=True)
    assert "nuslerp merges two models (besides the base_model), got 3" in proc.stderr
    assert "sce needs a base_model" in proc.stderr
    assert 'method = "nearswap"' in (tmp_path / "mergefile.toml").read_text()
