"""A1111-true metadata: outputs read back the way A1111 reads them, real file hashes for merges
with files, the inputs' metadata copied by A1111's rule, and `multiplier` as a number."""

from __future__ import annotations

import hashlib
import json

import pytest

from mergebuild.record.lineage import multiplier
from tests.conftest import build_json, chain, mergefile, run_cli, small_model, write_model


def read_like_a1111(path) -> dict:
    """modules/sd_models.py read_metadata_from_safetensors: every string value that starts with
    `{` is parsed as JSON (and kept as it is if it does not parse)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    out = {}
    for k, v in header.get("__metadata__", {}).items():
        out[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                out[k] = json.loads(v)
            except Exception:
                pass
    return out


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def legacy(path) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def header_size(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def generation(folder, parent: str, other: str, alpha: float, out: str, settings: str = ""):
    folder.mkdir()
    mergefile(folder / "mergefile.toml", f"""
        {settings}
        [models.parent]
        path = "{parent}"
        [models.other]
        path = "{other}"
        [merges.step]
        method = "weighted_sum"
        inputs = ["parent", "other"]
        alpha = {alpha}
        output = "{out}"
    """)
    run_cli(cwd=folder, check=True)
    return folder / out


def test_three_generations_walked_the_way_a1111_readers_walk_them(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    final = project / "out/final.safetensors"
    g2 = generation(project / "g2", "../out/final.safetensors", "../models/base.safetensors", 0.1, "g2.safetensors")
    g3 = generation(project / "g3", "../g2/g2.safetensors", "../models/anime.safetensors", 0.2, "g3.safetensors")
    meta = read_like_a1111(g3)
    recipe, models = meta["sd_merge_recipe"], meta["sd_merge_models"]
    assert isinstance(recipe, dict) and isinstance(models, dict)
    files = {n: sha256(project / "models" / f"{n}.safetensors") for n in ("base", "real", "anime")}
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"]) == (sha256(g2), files["anime"])
    assert recipe["multiplier"] == 0.2 and recipe["interp_method"] == "Weighted sum"
    # g3 <- g2: g2's recipe nested as an object, walkable by key
    entry = models[recipe["primary_model_hash"]]
    assert (entry["name"], entry["legacy_hash"]) == ("g2.safetensors", legacy(g2))
    step2 = entry["sd_merge_recipe"]
    assert (step2["primary_model_hash"], step2["secondary_model_hash"]) == (sha256(final), files["base"])
    assert step2["multiplier"] == 0.1
    # g2 <- final <- mix2 (an intermediate of the first Mergefile) <- mix1 <- real, anime
    step1 = models[step2["primary_model_hash"]]["sd_merge_recipe"]
    assert step1["custom_name"] == "final" and step1["secondary_model_hash"] == files["real"]
    mix2 = models[step1["primary_model_hash"]]
    assert mix2["name"] == "mix2 (intermediate)" and mix2["sd_merge_recipe"]["interp_method"] == "Add difference"
    assert mix2["sd_merge_recipe"]["multiplier"] == 0.5
    assert mix2["sd_merge_recipe"]["tertiary_model_hash"] == files["base"]
    mix1 = models[mix2["sd_merge_recipe"]["primary_model_hash"]]["sd_merge_recipe"]
    assert (mix1["primary_model_hash"], mix1["secondary_model_hash"], mix1["multiplier"]) == (
        files["real"], files["anime"], 0.4)
    for source in files.values():
        assert models[source]["sd_merge_recipe"] is None
    # every value A1111 parsed is what was written: nothing left a string that starts with {
    assert not any(isinstance(m.get("sd_merge_recipe"), str) for m in models.values())


def mix1_with_a_file() -> str:
    return chain().replace('alpha = 0.4\n', 'alpha = 0.4\noutput = "out/mix1.safetensors"\n')


def test_a_merge_with_its_own_file_is_recorded_by_that_file_s_sha256(project):
    mergefile(project / "mergefile.toml", mix1_with_a_file())
    run_cli(cwd=project, check=True)
    mix1, final = project / "out/mix1.safetensors", project / "out/final.safetensors"
    meta = read_like_a1111(final)
    models = meta["sd_merge_models"]
    mix2 = models[meta["sd_merge_recipe"]["primary_model_hash"]]["sd_merge_recipe"]
    h = mix2["primary_model_hash"]
    assert h == sha256(mix1)  # what A1111 and Civitai compute for the file
    assert models[h]["name"] == "mix1.safetensors" and models[h]["legacy_hash"] == legacy(mix1)
    assert models[h]["sd_merge_recipe"] == read_like_a1111(mix1)["sd_merge_recipe"]
    node = meta["mergebuild.recipe"]["nodes"]["mix1"]
    assert (node["sha256"], node["autov2"]) == (h, h[:10])
    # lineage shows it too; mix2, which has no file, stays an intermediate
    assert "mix2 (intermediate)" in {m["name"] for m in models.values()}
    tree = json.loads(run_cli("lineage", final, "--json", cwd=project, check=True).stdout)["made_by"]
    assert tree["inputs"][0]["inputs"][0]["sha256"] == h


def test_file_hashes_reach_the_metadata_only_and_rebuilds_write_the_same_bytes(project, monkeypatch):
    from mergebuild.execute import commit

    mergefile(project / "mergefile.toml", mix1_with_a_file())
    run_cli(cwd=project, check=True)
    mix1, final = project / "out/mix1.safetensors", project / "out/final.safetensors"
    first = final.read_bytes()
    # a no-op build touches nothing
    stat = final.stat()
    assert build_json(cwd=project)["merges"]["final"]["written"] is False
    assert (final.stat().st_mtime_ns, final.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    # the downstream output alone rewritten: mix1's hash comes from the index, not a rehash
    hashed = []
    real = commit.file_sha256
    monkeypatch.setattr(commit, "file_sha256", lambda p: hashed.append(p) or real(p))
    final.unlink()
    doc = build_json(cwd=project)["merges"]
    assert doc["final"]["computed"] > 0 and doc["mix1"]["written"] is False
    assert mix1 not in hashed and final.read_bytes() == first
    # everything rewritten: the same bytes again
    build_json("--force", cwd=project)
    assert final.read_bytes() == first
    # the same tensors without mix1's file: every tensor of final comes from the cache, so no
    # cache key depended on the file's hash; only the metadata names mix1 otherwise
    mergefile(project / "mergefile.toml", chain())
    doc = build_json(cwd=project)["merges"]
    assert doc["final"]["written"] is True and doc["final"]["computed"] == 0
    models = read_like_a1111(final)["sd_merge_models"]
    assert "mix1 (intermediate)" in {m["name"] for m in models.values()} and sha256(mix1) not in models


def sources_with_metadata(project):
    base, real = small_model(0), small_model(1)
    write_model(project / "models/base.safetensors", base, metadata={
        "format": "pt", "author": "alice", "modelspec.author": "alice", "modelspec.title": "Base",
        "modelspec.resolution": "512x512", "ss_tag_frequency": json.dumps({"set": {"cat": 3}}),
        "mecha_recipe": "version 0.1.0\nmodel \"x\"", "sshs_model_hash": "f" * 64, "workflow": "{}",
        "mergebuild.recipe": "{}", "mergebuild.identity": "x"})
    write_model(project / "models/real.safetensors", real, metadata={"author": "bob", "license": "MIT"})


COPY = """
{settings}
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"
[models.anime]
path = "models/anime.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["base", "real"]
alpha = 0.3
[merges.final]
method = "weighted_sum"
inputs = ["mix", "anime"]
alpha = 0.2
output = "out/final.safetensors"
"""


def test_inputs_metadata_copied_by_a1111_s_rule(project):
    sources_with_metadata(project)
    mergefile(project / "mergefile.toml", COPY.format(settings=""))
    run_cli(cwd=project, check=True)
    meta = read_like_a1111(project / "out/final.safetensors")
    # later inputs win (bob over alice), through the intermediate mix; keys only one input has stay
    assert (meta["author"], meta["license"], meta["modelspec.author"]) == ("bob", "MIT", "alice")
    assert meta["modelspec.resolution"] == "512x512" and meta["ss_tag_frequency"] == {"set": {"cat": 3}}
    # mergebuild's own keys are its own; the inputs' lineage is never copied
    assert meta["modelspec.title"] == "final" and meta["format"] == "pt"
    assert meta["mergebuild.recipe"]["target"] == "final" and meta["mergebuild.identity"] != "x"
    for stale in ("mecha_recipe", "sshs_model_hash", "workflow"):
        assert stale not in meta


def test_copy_metadata_false_and_a_list_of_keys(project):
    sources_with_metadata(project)
    mergefile(project / "mergefile.toml", COPY.format(settings="[settings]\ncopy_metadata = false"))
    run_cli(cwd=project, check=True)
    meta = read_like_a1111(project / "out/final.safetensors")
    assert not {"author", "license", "modelspec.author", "ss_tag_frequency"} & meta.keys()
    mergefile(project / "mergefile.toml", COPY.format(settings='[settings]\ncopy_metadata = ["author", "nothing"]'))
    doc = build_json(cwd=project)["merges"]
    assert doc["final"]["written"] is True and doc["final"]["computed"] == 0  # metadata only: tensors cached
    meta = read_like_a1111(project / "out/final.safetensors")
    assert meta["author"] == "bob" and not {"license", "modelspec.author", "nothing"} & meta.keys()
    # the setting is part of the output's identity, and explain says why it is rewritten
    mergefile(project / "mergefile.toml", COPY.format(settings=""))
    text = run_cli("explain", "final", cwd=project, check=True).stdout
    assert "copy_metadata" in text, text
    assert build_json(cwd=project)["merges"]["final"]["written"] is True
    assert read_like_a1111(project / "out/final.safetensors")["license"] == "MIT"


@pytest.mark.parametrize("key", ["mergebuild.recipe", "sd_merge_models", "modelspec.title", "mecha_recipe"])
def test_copy_metadata_refuses_keys_it_never_copies(project, key):
    mergefile(project / "mergefile.toml", COPY.format(settings=f'[settings]\ncopy_metadata = ["author", "{key}"]'))
    proc = run_cli(cwd=project)
    assert proc.returncode == 2 and "copy_metadata" in proc.stderr and key in proc.stderr


def test_copy_metadata_of_the_wrong_type_is_an_error(project):
    mergefile(project / "mergefile.toml", COPY.format(settings='[settings]\ncopy_metadata = "yes"'))
    proc = run_cli(cwd=project)
    assert proc.returncode == 2 and "expected true, false or a list" in proc.stderr


def test_an_input_s_metadata_changed_rewrites_the_output_from_cached_tensors(project):
    sources_with_metadata(project)
    mergefile(project / "mergefile.toml", COPY.format(settings=""))
    run_cli(cwd=project, check=True)
    write_model(project / "models/real.safetensors", small_model(1), metadata={"author": "carol"})
    doc = build_json(cwd=project)["merges"]
    assert doc["final"]["written"] is True and doc["mix"]["computed"] == doc["final"]["computed"] == 0
    meta = read_like_a1111(project / "out/final.safetensors")
    assert meta["author"] == "carol" and "license" not in meta


def test_copied_metadata_reaches_later_generations_once(project):
    sources_with_metadata(project)
    mergefile(project / "mergefile.toml", COPY.format(settings=""))
    run_cli(cwd=project, check=True)
    g2 = generation(project / "g2", "../out/final.safetensors", "../models/anime.safetensors", 0.1, "g2.safetensors")
    meta = read_like_a1111(g2)
    assert (meta["author"], meta["license"], meta["modelspec.title"]) == ("bob", "MIT", "g2")
    g3 = generation(project / "g3", "../g2/g2.safetensors", "../models/anime.safetensors", 0.1, "g3.safetensors",
                    settings="[settings]\ncopy_metadata = false")
    assert "author" not in read_like_a1111(g3)


def test_headers_stay_bounded_over_generations_of_large_metadata(project):
    """A 3 MB metadata value on a source, merged in again at every generation: each output holds
    it once (keys are copied, not nested, and lineage keys are never copied), so the header
    grows only by the lineage of one more merge per generation."""
    big = json.dumps({"tags": {f"tag{i}": i for i in range(150_000)}})
    stored = len(json.dumps(big))  # as the header holds it, escaped
    assert stored > 3_000_000
    write_model(project / "models/big.safetensors", small_model(3), metadata={"ss_tag_frequency": big,
                                                                              "author": "alice"})
    first = generation(project / "g1", "../models/big.safetensors", "../models/real.safetensors", 0.3, "g1.safetensors")
    sizes, parent = [header_size(first)], "../g1/g1.safetensors"
    for n in range(2, 6):
        out = generation(project / f"g{n}", parent, "../models/big.safetensors", 0.3, f"g{n}.safetensors")
        sizes.append(header_size(out))
        parent = f"../g{n}/g{n}.safetensors"
        assert read_like_a1111(out)["ss_tag_frequency"] == json.loads(big)
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert all(stored < s < stored + 20_000 for s in sizes), sizes
    assert all(0 < g < 10_000 for g in growth), (sizes, growth)


@pytest.mark.parametrize("params, expected", [
    ({"alpha": 0.35}, 0.35),
    ({"alpha": [0.3] + [0.9] * 25}, 0.3),  # 26 MBW values: BASE, as supermerger's base_alpha
    ({"alpha": {"default": 0.5, "IN05": 0.2}}, 0.5),
    ({"alpha": {"default": 0.5, "BASE": 0.1}}, 0.1),
    ({"alpha": "FLAT_25"}, 0.0),
    ({"alpha": {"gradient": [0.2, 0.8]}}, 0.2),
])
def test_multiplier_is_a_number(params, expected):
    assert multiplier("weighted_sum", params) == expected


def test_multiplier_of_methods_without_alpha():
    assert multiplier("copy", {}) == 1.0
    assert multiplier("ties", {"lambda": 0.7}) == 0.7
    assert multiplier("ties", {}) == 1.0  # lambda's default


def test_block_weights_write_a_number_and_keep_the_list_in_mergebuild_s_recipe(project):
    values = [0.3] + [round(0.04 * i, 2) for i in range(25)]
    mergefile(project / "mergefile.toml", f"""
        [models.base]
        path = "models/base.safetensors"
        [models.anime]
        path = "models/anime.safetensors"
        [merges.mbw]
        method = "weighted_sum"
        inputs = ["base", "anime"]
        alpha = {values}
        output = "out/mbw.safetensors"
    """)
    run_cli(cwd=project, check=True)
    meta = read_like_a1111(project / "out/mbw.safetensors")
    assert meta["sd_merge_recipe"]["multiplier"] == 0.3
    assert meta["sd_merge_recipe"]["mergebuild_params"]["alpha"] == values
    assert meta["mergebuild.recipe"]["nodes"]["mbw"]["params"]["alpha"] == values


def test_a_lora_baked_in_passes_on_no_metadata(tmp_path):
    import torch

    from mergebuild.testing.fabricate import layout_keys, make_base
    from mergebuild.testing.lora import make_lora, save_lora

    base = make_base(layout_keys("sd1-ldm", 32, components={"clip_l", "diffuser"}), seed=0, dtype=torch.float32)
    write_model(tmp_path / "base.safetensors", base, metadata={"author": "alice"})
    save_lora(tmp_path / "l.safetensors", make_lora(base, "sd1", 4, "lora", seed=1),
              metadata={"ss_network_module": "networks.lora", "ss_output_name": "l", "author": "lora-maker"})
    mergefile(tmp_path / "mergefile.toml", """
        [models.base]
        path = "base.safetensors"
        [models.l]
        path = "l.safetensors"
        [merges.m]
        method = "lora"
        inputs = ["base", "l"]
        output = "m.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    meta = read_like_a1111(tmp_path / "m.safetensors")
    assert meta["author"] == "alice" and not {"ss_network_module", "ss_output_name"} & meta.keys()
