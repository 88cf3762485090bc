"""3 and 4. Resources stay bounded: descriptors do not grow with tensors or sources, the recipe
is linear in the DAG (shared nodes once, long chains without recursion), a header that would
pass safetensors' limit is refused before any compute, and the header space reserved up
front fits every hash that arrives later."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mergebuild.testing.fabricate import layout_keys, make_base
from mergebuild.testing.lora import make_lora, save_lora
from tests.conftest import load, write_model
from tests.faults.conftest import leftovers, mb, mb_process, model


def _chain_text(n: int, shared: bool) -> str:
    """n merges, each reading the previous one (twice when shared: a DAG whose tree doubles)."""
    text = '[models.a]\npath = "a.safetensors"\n[models.b]\npath = "b.safetensors"\n'
    text += '[merges.m0]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.5\n'
    for i in range(1, n):
        inputs = f'["m{i - 1}", "m{i - 1}"]' if shared else f'["m{i - 1}", "b"]'
        text += f'[merges.m{i}]\nmethod = "weighted_sum"\ninputs = {inputs}\nalpha = 0.5\n'
    return text + f'output = "out.safetensors"\n'


def _sources(folder, side=4):
    write_model(folder / "a.safetensors", model(1, side))
    write_model(folder / "b.safetensors", model(2, side))


def test_a_shared_sub_dag_read_twice_per_level_keeps_the_header_small(tmp_path):
    _sources(tmp_path)
    (tmp_path / "mergefile.toml").write_text(_chain_text(38, shared=True))  # 2^38 paths through it
    r = mb(tmp_path, "-q")
    assert r.code == 0, r.err
    header = int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")
    assert header < 200_000, header  # linear: about 38 nodes, once each
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["mergebuild.recipe"])
    assert len(recipe["nodes"]) == 40
    lineage = mb(tmp_path, "lineage", "out.safetensors")
    assert lineage.code == 0 and "(shown above)" in lineage.out
    assert mb(tmp_path, "graph").code == 0


@pytest.mark.slow
def test_a_500_merge_chain_plans_builds_and_shows_its_lineage(tmp_path):
    _sources(tmp_path)
    (tmp_path / "mergefile.toml").write_text(_chain_text(500, shared=False))
    assert mb(tmp_path, "-n").code == 0
    r = mb(tmp_path, "-q")
    assert r.code == 0, r.err
    for args in (("lineage", "out.safetensors"), ("lineage", "out.safetensors", "--format", "dot"),
                 ("status",), ("explain", "m499"), ("graph",)):
        got = mb(tmp_path, *args)
        assert got.code == 0 and "Traceback" not in got.err, (args, got.err)
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    key = next(iter(a))
    assert torch.allclose(load(tmp_path / "out.safetensors")[key], b[key], atol=1e-5)  # halfway, 500 times


def test_a_header_over_the_limit_is_refused_before_any_compute(tmp_path):
    """A source carrying a huge lineage: two of them would give an output header past 100 MB."""
    big = json.dumps({"format": 2, "target": "x", "nodes": {
        "x": {"kind": "merge", "method": "weighted_sum", "params": {"note": "z" * 60_000_000}, "inputs": []}}})
    write_model(tmp_path / "a.safetensors", model(1, 4), metadata={"mergebuild.recipe": big})
    write_model(tmp_path / "b.safetensors", model(2, 4), metadata={"mergebuild.recipe": big})
    (tmp_path / "mergefile.toml").write_text(
        '[models.a]\npath = "a.safetensors"\n[models.b]\npath = "b.safetensors"\n'
        '[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.5\noutput = "out.safetensors"\n')
    r = mb(tmp_path, "-q")
    line = r.one_line_error(2, "[merges.m] output", "over safetensors' limit of 100 MB", "mergebuild.recipe")
    assert "node" in line
    assert not (tmp_path / "out.safetensors").exists() and not leftovers(tmp_path)
    assert not (tmp_path / "cache/objects").exists()  # nothing was computed


def test_an_absurdly_long_pattern_is_refused_at_parse_time(tmp_path):
    _sources(tmp_path)
    (tmp_path / "mergefile.toml").write_text(
        '[models.a]\npath = "a.safetensors"\n[models.b]\npath = "b.safetensors"\n'
        f'[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.5\ndiscard = "{"x" * 200_000}"\n'
        'output = "out.safetensors"\n')
    mb(tmp_path, "-q").one_line_error(2, "[merges.m] discard", "200,000 characters long")


def test_a_long_discard_pattern_is_kept_in_the_header_it_fits(tmp_path):
    _sources(tmp_path)
    pattern = "|".join(f"never{i}" for i in range(9_000))  # ~90 KB of regular expression
    (tmp_path / "mergefile.toml").write_text(
        '[models.a]\npath = "a.safetensors"\n[models.b]\npath = "b.safetensors"\n'
        f'[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.5\ndiscard = "{pattern}"\n'
        'output = "out.safetensors"\n')
    assert mb(tmp_path, "-q").code == 0
    assert len(load(tmp_path / "out.safetensors")) == len(model(1))


def test_eighty_loras_baked_at_once_fit_the_reserved_header(tmp_path):
    keys = layout_keys("sd1-ldm", shrink=64)
    base = make_base(keys, seed=0)
    write_model(tmp_path / "base.safetensors", base)
    text = '[models.base]\npath = "base.safetensors"\n'
    names = []
    for i in range(80):
        lora = make_lora(base, "sd1", rank=2, seed=i, targets=[k for k in base if "attn2.to_k" in k][:1])
        save_lora(tmp_path / f"l{i}.safetensors", lora)
        text += f'[models.l{i}]\npath = "l{i}.safetensors"\n'
        names.append(f"l{i}")
    text += (f'[merges.baked]\nmethod = "lora"\ninputs = ["base", {", ".join(repr(n) for n in names)}]\n'
             'output = "baked.safetensors"\n').replace("'", '"')
    (tmp_path / "mergefile.toml").write_text(text)
    r = mb(tmp_path, "-q")
    assert r.code == 0, r.err
    with safe_open(str(tmp_path / "baked.safetensors"), "pt") as f:
        nodes = json.loads(f.metadata()["mergebuild.recipe"])["nodes"]
    assert sum(1 for n in nodes.values() if n.get("addnet_hash")) == 80


@pytest.mark.slow
def test_descriptors_do_not_grow_with_tensors_or_sources(tmp_path):
    """Under a limit of 64 open files: a model of 600 tensors, and a soup of 40 sources."""
    tensors = {f"model.diffusion_model.t{i}.weight": torch.randn(4, 4) for i in range(600)}
    text = ""
    for i in range(40):
        write_model(tmp_path / f"s{i}.safetensors", {k: v + i for k, v in tensors.items()})
        text += f'[models.s{i}]\npath = "s{i}.safetensors"\n'
    inputs = ", ".join(f'"s{i}"' for i in range(40))
    text += f'[merges.soup]\nmethod = "soup"\ninputs = [{inputs}]\noutput = "soup.safetensors"\n'
    text += '[merges.pair]\nmethod = "weighted_sum"\ninputs = ["s0", "s1"]\nalpha = 0.5\noutput = "pair.safetensors"\n'
    (tmp_path / "mergefile.toml").write_text(text)
    proc = mb_process(tmp_path, "-q", shell_prefix="ulimit -n 64", timeout=300)
    assert proc.returncode == 0, proc.stderr
    soup = load(tmp_path / "soup.safetensors")
    torch.testing.assert_close(soup["model.diffusion_model.t7.weight"], tensors["model.diffusion_model.t7.weight"] + 19.5)
