"""`mergebuild import`: another tool's recipe becomes a Mergefile whose build is that recipe's
formula, computed here independently (float64) on fabricated tensors; and `lineage` reads
sd-mecha's and mergekit's records."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
from conftest import load, run_cli, small_model, write_model
from safetensors.torch import load_file

from mergebuild.testing.fabricate import llama_keys, make_base

LAYERS = 4
LAYER = re.compile(r"\.layers\.(\d+)\.")


# --- fabricated models -----------------------------------------------------------------------
def llama(folder, seed: int, base: dict | None = None, scale: float = 0.5) -> dict:
    """A tiny Hugging Face Llama folder (config.json, model.safetensors): a base, or a fine-tune
    of `base` far enough from it that slerp really is spherical."""
    if base is None:
        tensors = make_base(llama_keys(layers=LAYERS), seed, torch.float32)
    else:
        g = torch.Generator().manual_seed(seed)
        tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS}))
    write_model(folder / "model.safetensors", tensors)
    return tensors


@pytest.fixture
def llamas(tmp_path):
    base = llama(tmp_path / "models" / "base", 0)
    return tmp_path, {"base": base, "ft1": llama(tmp_path / "models" / "ft1", 1, base),
                      "ft2": llama(tmp_path / "models" / "ft2", 2, base)}


def folder_tensors(folder) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def import_and_build(root, recipe, *extra):
    run_cli("import", recipe, "-o", "mergefile.toml", *extra, cwd=root, check=True)
    run_cli("-q", cwd=root, check=True)
    return (root / "mergefile.toml").read_text()


def close(result: dict, expected: dict, atol: float = 1e-5) -> None:
    assert set(expected) <= set(result), set(expected) - set(result)
    for key, want in expected.items():
        got = result[key].double()
        assert torch.allclose(got, want.to(got.dtype), rtol=1e-5, atol=atol), (key, (got - want).abs().max())


# --- mergekit's formulas, independently --------------------------------------------------------
def t_of(key: str, n: int = LAYERS, start: int = 0) -> float:
    """mergekit's t: layer / (layers - 1) within the slice; 0 outside the layers."""
    m = LAYER.search(key)
    return 0.0 if m is None else (int(m.group(1)) - start) / (n - 1)


def gradient(points, t: float) -> float:
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    return (1 - (scaled - i0)) * points[i0] + (scaled - i0) * points[i1]


def mergekit_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit/merge_methods/slerp.py's slerp, in float64."""
    a, b = v0.double(), v1.double()
    na, nb = a / a.norm() if a.norm() > 1e-8 else a, b / b.norm() if b.norm() > 1e-8 else b
    dot = float((na * nb).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta) * a + math.sin(theta * t) / math.sin(theta) * b


# --- the importers ---------------------------------------------------------------------------
def test_a_mergekit_yaml_builds_its_formula(llamas):
    """task_arithmetic with per-model weights, normalize (folded into lambda) and a lambda that
    varies by filter and by layer (the layer count from the models' config.json)."""
    root, m = llamas
    (root / "merge.yml").write_text("""
merge_method: task_arithmetic
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.7}
  - model: ft2
    parameters: {weight: 0.5}
parameters:
  normalize: true
  lambda:
    - filter: self_attn
      value: [0.5, 1.5]
    - filter: mlp
      value: 0.8
    - value: [1.0, 0.6]
dtype: float32
""")
    text = import_and_build(root, "merge.yml", "--models", "models")
    assert 'method = "task_arithmetic"' in text and "# mergekit task_arithmetic" in text
    expected = {}
    for key, base in m["base"].items():
        t = t_of(key)
        lam = gradient([0.5, 1.5], t) if "self_attn" in key else 0.8 if "mlp" in key else gradient([1.0, 0.6], t)
        delta = 0.7 * (m["ft1"][key].double() - base.double()) + 0.5 * (m["ft2"][key].double() - base.double())
        expected[key] = base.double() + lam * delta / 1.2
    close(folder_tensors(root / "out" / "merge"), expected)


def test_a_multi_stage_file_builds_each_stage(llamas):
    """mergekit-multi: a slerp over two slices (a gradient in one, a filter in the other; the
    final norm and head take the last slice's value), read by name by a linear final merge."""
    root, m = llamas
    (root / "multi.yml").write_text("""
name: smooth
merge_method: slerp
base_model: base
slices:
  - sources:
      - model: base
        layer_range: [0, 2]
      - model: ft1
        layer_range: [0, 2]
    parameters:
      t: [0.2, 0.8]
  - sources:
      - model: base
        layer_range: [2, 4]
      - model: ft1
        layer_range: [2, 4]
    parameters:
      t:
        - filter: mlp
          value: 0.9
        - value: 0.3
---
merge_method: linear
models:
  - model: smooth
    parameters: {weight: 3}
  - model: ft2
    parameters: {weight: 1}
""")
    text = import_and_build(root, "multi.yml", "--models", "models")
    assert "[merges.smooth]" in text and "[merges.multi]" in text
    assert 'output = "out/multi"' in text and 'output = "out/smooth"' not in text
    expected = {}
    for key, base in m["base"].items():
        layer = LAYER.search(key)
        if layer is None:  # pre weights: the first slice at t = 0; post weights: the last slice's
            t = 0.2 if "embed" in key else 0.3
        elif int(layer.group(1)) < 2:
            t = gradient([0.2, 0.8], int(layer.group(1)) / 1)
        else:
            t = 0.9 if "mlp" in key else 0.3
        smooth = mergekit_slerp(t, base, m["ft1"][key])
        expected[key] = (3 * smooth + m["ft2"][key].double()) / 4
    close(folder_tensors(root / "out" / "multi"), expected)


SD_BLOCKS = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]


def sd_mecha_block(key: str) -> str:
    """sd-mecha 1.1's convert_sd1_blocks_to_ldm."""
    if not key.startswith("model.diffusion_model."):
        return "BASE"
    if ".time_embed" in key:
        return "BASE"
    if ".out." in key:
        return "OUT11"
    for pattern, name in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
        found = re.search(pattern, key)
        if found:
            return f"{name}{int(found.group(1)):02}"
    return "M00" if ".middle_block." in key else "OUT11"


def test_a_mecha_recipe_builds_its_formula(tmp_path):
    """The text sd-mecha 1.1.8 serializes for add_difference(weighted_sum(a, b, 0.3), b, c,
    alpha=<block weights>): literals, conversions, subtract and fallback read back."""
    models = {n: small_model(i, dtype=torch.float32) for i, n in enumerate("abc")}
    for n, t in models.items():
        write_model(tmp_path / "models" / f"{n}.safetensors", t)
    blocks = {name: round(i / 25, 3) for i, name in enumerate(SD_BLOCKS)}
    (tmp_path / "mix.mecha").write_text("\n".join([
        "version 0.1.0",
        'model "models/a.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'model "models/b.safetensors" model_config="sd1-ldm" merge_space="weight"',
        "dict key=0.3",
        'literal &2 model_config="singleton-mecha" merge_space="param"',
        'merge "convert_singleton" &3',
        'merge "weighted_sum" &0 &1 &4',
        'model "models/c.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'merge "subtract" &1 &6',
        "dict " + " ".join(f"{k}={v}" for k, v in blocks.items()),
        'literal &8 model_config="sd1-supermerger_blocks" merge_space="param"',
        'merge "convert_sd1_blocks_to_ldm" &9',
        'merge "add_difference" &5 &7 &10',
        'merge "fallback" &11 &5',
    ]))
    text = import_and_build(tmp_path, "mix.mecha")
    assert 'time_embed = "BASE"' in text and 'method = "add_difference"' in text
    a, b, c = (models[n] for n in "abc")
    expected = {}
    for key in a:
        if not a[key].is_floating_point() or "model" not in key:
            continue
        mix = torch.lerp(a[key].double(), b[key].double(), 0.3)
        expected[key] = mix + blocks[sd_mecha_block(key)] * (b[key].double() - c[key].double())
    close(load(tmp_path / "out" / "mix.safetensors"), expected)


def a1111_recipe(primary, secondary, tertiary, method, multiplier, name, half=False) -> dict:
    """sd_merge_recipe as A1111's modules/extras.py run_modelmerger writes it."""
    return {"type": "webui", "primary_model_hash": primary, "secondary_model_hash": secondary,
            "tertiary_model_hash": tertiary, "interp_method": method, "multiplier": multiplier,
            "save_as_half": half, "custom_name": name, "config_source": 0, "bake_in_vae": "None",
            "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}


def test_an_a1111_file_is_rebuilt_from_its_parents(tmp_path):
    """A file A1111 wrote (Add difference of an intermediate Weighted sum, saved as half): its
    parents found by sha256 in --models, the intermediate, whose file is gone, rebuilt from the
    recipe it records."""
    parents = {n: small_model(10 + i, dtype=torch.float32) for i, n in enumerate(("real", "anime", "sd15"))}
    sha = {}
    for n, t in parents.items():
        path = write_model(tmp_path / "models" / f"{n}.safetensors", t)
        sha[n] = hashlib.sha256(path.read_bytes()).hexdigest()
    gone = "f" * 64  # the intermediate mix.safetensors, not kept
    inner = a1111_recipe(sha["real"], sha["anime"], None, "Weighted sum", 0.3, "mix")
    outer = a1111_recipe(gone, sha["anime"], sha["sd15"], "Add difference", 0.5, "final", half=True)
    models = {gone: {"name": "mix.safetensors", "legacy_hash": "12345678", "sd_merge_recipe": json.dumps(inner)},
              sha["anime"]: {"name": "anime.safetensors", "legacy_hash": "23456789", "sd_merge_recipe": None},
              sha["sd15"]: {"name": "sd15.safetensors", "legacy_hash": "34567890", "sd_merge_recipe": None},
              sha["real"]: {"name": "real.safetensors", "legacy_hash": "45678901", "sd_merge_recipe": None}}
    write_model(tmp_path / "final.safetensors", small_model(99), metadata={
        "sd_merge_recipe": json.dumps(outer), "sd_merge_models": json.dumps(models), "format": "pt"})
    text = import_and_build(tmp_path, "final.safetensors", "--models", "models")
    assert "was not found: rebuilt from the recipe it records" in text
    real, anime, sd15 = (parents[n] for n in ("real", "anime", "sd15"))
    result = load(tmp_path / "out" / "final.safetensors")
    expected = {}
    for key in real:
        if real[key].is_floating_point() and "model" in key:
            mix = 0.7 * real[key].double() + 0.3 * anime[key].double()
            expected[key] = mix + 0.5 * (anime[key].double() - sd15[key].double())
            assert result[key].dtype == torch.float16
    close(result, expected, atol=2e-3)


def test_a_parent_not_found_makes_the_dry_run_fail_naming_it(tmp_path):
    real = write_model(tmp_path / "models" / "real.safetensors", small_model(1, dtype=torch.float32))
    recipe = a1111_recipe(hashlib.sha256(real.read_bytes()).hexdigest(), "a" * 64, None, "Weighted sum", 0.4, "m")
    write_model(tmp_path / "m.safetensors", small_model(2), metadata={
        "sd_merge_recipe": json.dumps(recipe),
        "sd_merge_models": json.dumps({"a" * 64: {"name": "lost.safetensors", "sd_merge_recipe": None}})})
    proc = run_cli("import", "m.safetensors", "-o", "mergefile.toml", "--models", "models", cwd=tmp_path, check=True)
    assert "parent not found: lost.safetensors (sha256 aaaa" in proc.stderr
    text = (tmp_path / "mergefile.toml").read_text()
    assert re.search(r'path = "models/real.safetensors"', text) and "MISSING: lost.safetensors" in text
    dry = run_cli("-n", cwd=tmp_path)
    assert dry.returncode == 2 and "MISSING: lost.safetensors" in dry.stderr and "file not found" in dry.stderr


# --- the command ------------------------------------------------------------------------------
def test_import_never_replaces_a_file_without_force(llamas):
    root, _ = llamas
    (root / "merge.yml").write_text("merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1}\n"
                                    "  - model: ft2\n    parameters: {weight: 1}\n")
    (root / "mergefile.toml").write_text("# mine\n")
    proc = run_cli("import", "merge.yml", "-o", "mergefile.toml", cwd=root)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr
    assert (root / "mergefile.toml").read_text() == "# mine\n"
    run_cli("import", "merge.yml", "-o", "mergefile.toml", "--force", "--models", "models", cwd=root, check=True)
    assert 'method = "soup"' in (root / "mergefile.toml").read_text()
    printed = run_cli("import", "merge.yml", "--models", "models", cwd=root, check=True).stdout
    assert printed.startswith("# A Mergefile imported by `mergebuild import`") and "[merges.merge]" in printed


def test_what_cannot_be_expressed_is_listed(llamas):
    root, _ = llamas
    (root / "multi.yml").write_text("""
name: odd
merge_method: linear
slices:
  - sources:
      - model: ft1
        layer_range: [0, 3]
    residual_weight: 0.5
  - sources:
      - model: ft2
        layer_range: [2, 4]
---
name: tied
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters:
      weight: [{filter: mlp, value: 0.5}, {value: 1.0}]
  - model: ft2
    parameters: {weight: 0.5, density: 0.4}
tokenizer:
  source: union
  tokens: {"<|im_start|>": {source: ft1}}
---
merge_method: linear
models:
  - model: odd
    parameters: {weight: 1}
  - model: tied
    parameters: {weight: 1}
""")
    proc = run_cli("import", "multi.yml", "-o", "mergefile.toml", "--models", "models", cwd=root, check=True)
    text = (root / "mergefile.toml").read_text()
    lines = [l for l in proc.stderr.splitlines() if l.startswith("warning: not expressible")]
    wanted = ("residual_weight: no Mergefile form", "reads stage 'odd'", "ft1's weight varies by tensor",
              "density differs", "tokenizer.tokens ('<|im_start|>')")
    for what in wanted:
        assert any(what in l for l in lines), (what, proc.stderr)
        assert what in " ".join(text.split()), what
    assert "[merges.tied]" in text and "[merges.odd]" not in text and 'vocab = "union"' in text


@pytest.mark.parametrize("name, content, message", [
    ("bad.yml", "merge_method: [linear\nmodels: {", "not valid YAML"),
    ("loop.yaml", "a: &x [*x]\n", "too large or recursive"),
    ("list.yaml", "- 1\n- 2\n", "not a mergekit config"),
    ("bomb.yml", "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                 "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
                 "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n", "too large or recursive"),
    ("bad.mecha", 'version 0.1.0\nmodel "a.safetensors" model_config="sd1-ldm"\nmerge "weighted_sum" &0 &7\n',
     "line 3: reference &7 out of bounds"),
    ("old.mecha", "version 0.0.4\n", "this reader knows `version 0.1.0`"),
    ("quote.mecha", 'version 0.1.0\nmodel "a.safetensors\n', "mismatched quotes"),
    ("nan.yml", "merge_method: linear\nparameters: {t: .nan}\nmodels: [{model: a}]\n", "not a finite number"),
])
def test_malformed_recipes_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    proc = run_cli("import", name, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr


# --- lineage ----------------------------------------------------------------------------------
def test_lineage_reads_sd_mechas_recipe_and_mergekits_config(tmp_path):
    recipe = "\n".join(['version 0.1.0', 'model "/m/a.safetensors" model_config="sd1-ldm" merge_space="weight"',
                        'model "/m/b.safetensors" model_config="sd1-ldm" merge_space="weight"', "dict key=0.3",
                        'literal &2 model_config="singleton-mecha" merge_space="param"', 'merge "convert_singleton" &3',
                        'merge "weighted_sum" &0 &1 &4', 'merge "fallback" &5 &0'])
    mecha = write_model(tmp_path / "mecha.safetensors", small_model(0), metadata={"mecha_recipe": recipe})
    tree = json.loads(run_cli("lineage", mecha, "--json", cwd=tmp_path, check=True).stdout)["made_by"]
    assert (tree["tool"], tree["method"], tree["params"]) == ("sd-mecha", "weighted_sum", {"alpha": 0.3})
    assert [c["name"] for c in tree["inputs"]] == ["a.safetensors", "b.safetensors"]

    folder = tmp_path / "merged"
    llama(folder, 3)
    (folder / "mergekit_config.yml").write_text("merge_method: slerp\nbase_model: org/base\nmodels:\n"
                                                "  - model: org/base\n  - model: org/tuned\nparameters:\n  t: 0.4\n")
    tree = json.loads(run_cli("lineage", folder, "--json", cwd=tmp_path, check=True).stdout)["made_by"]
    assert (tree["tool"], tree["method"], tree["params"]) == ("mergekit", "slerp", {"t": 0.4})
    assert [c["name"] for c in tree["inputs"]] == ["org/base", "org/tuned"]
    text = run_cli("lineage", folder, cwd=tmp_path, check=True).stdout
    assert "slerp" in text and "org/tuned" in text


def test_a_mergebuild_output_is_rebuilt_from_its_own_recipe(project):
    """mergebuild.recipe: every merge of the chain, its rules and dtype, its sources by sha256."""
    from conftest import chain, mergefile

    mergefile(project / "mergefile.toml", chain() + '\ndtype = "float16"\n[[merges.mix1.rules]]\nblocks = "IN00-IN05"\n'
              'alpha = 0.7\n')
    run_cli("-q", cwd=project, check=True)
    run_cli("import", "out/final.safetensors", "-o", "rebuild/mergefile.toml", "--models", "models", cwd=project,
            check=True)
    text = (project / "rebuild" / "mergefile.toml").read_text()
    assert "[merges.mix1]" in text and 'blocks = "IN00-IN05"' in text and 'dtype = "float16"' in text
    run_cli("-q", cwd=project / "rebuild", check=True)
    original, rebuilt = load(project / "out" / "final.safetensors"), load(project / "rebuild" / "out" / "final.safetensors")
    assert original.keys() == rebuilt.keys()
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)


def test_an_upstream_output_at_hand_is_read_not_rebuilt(project):
    from conftest import chain, mergefile

    mergefile(project / "mergefile.toml", chain().replace('alpha = 0.5\n', 'alpha = 0.5\noutput = "out/mix2.safetensors"\n'))
    run_cli("-q", cwd=project, check=True)
    text = run_cli("import", "out/final.safetensors", "--models", "models", "out", cwd=project, check=True).stdout
    assert 'path = "out/mix2.safetensors"' in text and "[merges.mix1]" not in text and "[merges.final]" in text


def test_parents_are_hashed_once_each_the_named_one_first(tmp_path):
    from mergebuild.record.foreign.finder import ModelFinder

    paths = [write_model(tmp_path / "models" / f"m{i}.safetensors", small_model(i)) for i in range(4)]
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    finder = ModelFinder([tmp_path / "models"])
    assert finder.by_hash(sha["m2.safetensors"], "m2.safetensors") == paths[2] and finder.hashed == 1
    assert finder.by_hash(sha["m3.safetensors"][:10], "renamed.safetensors") == paths[3]  # AutoV2, by content
    hashed = finder.hashed
    assert finder.by_hash(sha["m3.safetensors"]) == paths[3] and finder.hashed == hashed  # kept by (size, mtime)
    assert finder.by_hash("0" * 64) is None and finder.hashed == 4


def test_a_mergekit_output_folder_is_imported_from_its_config(llamas):
    root, _ = llamas
    folder = root / "merged"
    llama(folder, 5)
    (folder / "mergekit_config.yml").write_text("merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n"
                                                "  - model: ft1\nparameters:\n  t: 0.4\n")
    text = run_cli("import", folder, "--models", "models", cwd=root, check=True).stdout
    assert 'method = "slerp"' in text and "alpha = 0.4" in text and 'output = "out/merged"' in text
    assert 'path = "models/ft1"' in text


def test_a_mergekit_method_mergebuild_has_by_name_keeps_its_parameters(llamas):
    from mergebuild.methods.registry import get_method

    if get_method("nuslerp") is None:
        pytest.skip("this mergebuild has no nuslerp")
    root, _ = llamas
    (root / "nu.yml").write_text("merge_method: nuslerp\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: "
                                 "{weight: 0.7}\n  - model: ft2\n    parameters: {weight: 0.3}\n"
                                 "parameters: {nuslerp_flatten: false}\n")
    text = import_and_build(root, "nu.yml", "--models", "models")
    assert 'inputs = ["base", "ft1", "ft2"]' in text and "weights = [0.7, 0.3]" in text
    assert "nuslerp_flatten = false" in text and (root / "out" / "nu").is_dir()
