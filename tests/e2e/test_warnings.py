"""An edit that does nothing says so: a rule, include or exclude that selects no key (with the
closest name), a gradient where keys have no layer index, a block list converted between
architectures, keys only in later inputs; marker keys are kept; a weights list of the wrong
length is refused before any compute."""

from __future__ import annotations

import json

import pytest
import torch

from mergebuild.testing.fabricate import layout_keys, make_base
from tests.conftest import chain, load, write_model
from tests.faults.conftest import mb


def _with(project, text: str):
    (project / "mergefile.toml").write_text(text)


def _warnings(result) -> list[str]:
    return [line for line in result.err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("extra, words", [
    ('[[merges.mix1.rules]]\nmatch = "proj_ln"\nalpha = 0.1\n',
     "mix1: rules[0] (match ['proj_ln']) selects no key (did you mean 'proj_in'?): it changes nothing"),
    ('[[merges.mix1.rules]]\nblocks = "IN03"\nmatch = "proj_in"\nalpha = 0.1\n',
     "mix1: rules[0] (blocks 'IN03', match ['proj_in']) selects no key"),
    ('include = "nothing_here"\n', "mix1: include 'nothing_here' finds no key"),
    ('exclude = "nowhere"\n', "mix1: exclude 'nowhere' finds no key"),
])
def test_selections_that_select_nothing_are_named(project, extra, words):
    text = chain().replace('alpha = 0.4\n', 'alpha = 0.4\n' + extra, 1) if "rules" in extra else \
        chain().replace('alpha = 0.4\n', 'alpha = 0.4\n' + extra, 1)
    _with(project, text)
    for args in (("-q",), ("-n",)):
        got = _warnings(mb(project, *args))
        assert got == [f"warning: {words}"] or (len(got) == 1 and words in got[0]), got


def test_a_gradient_on_a_model_without_layers(project):
    _with(project, chain().replace("alpha = 0.4", "alpha = { gradient = [0.0, 1.0] }"))
    got = _warnings(mb(project, "-q"))
    assert len(got) == 1 and "a gradient needs layer indices, and sd1 keys have none" in got[0]


def test_an_sd_block_list_on_sdxl_says_it_was_converted(tmp_path):
    keys = layout_keys("sdxl-sgm", shrink=64)
    for seed, name in ((1, "a"), (2, "b")):
        write_model(tmp_path / f"{name}.safetensors", make_base(keys, seed))
    values = ", ".join(["0.5"] * 26)
    _with(tmp_path, '[models.a]\npath = "a.safetensors"\n[models.b]\npath = "b.safetensors"\n'
          f'[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = [{values}]\noutput = "m.safetensors"\n')
    got = _warnings(mb(tmp_path, "-q"))
    assert len(got) == 1 and "26 values read as sdxl's 20 blocks" in got[0]


def test_keys_only_in_later_inputs_are_named_and_markers_kept(project):
    anime = load(project / "models/anime.safetensors")
    anime["v_pred"] = torch.zeros(0)
    anime["ztsnr"] = torch.zeros(0)
    anime["model.diffusion_model.extra.weight"] = torch.ones(2)
    write_model(project / "models/anime.safetensors", anime)
    _with(project, chain())
    r = mb(project, "-q")
    got = _warnings(r)
    assert got == [f"warning: {m}: 1 keys only in anime are left out, as A1111 does (e.g. "
                   "'model.diffusion_model.extra.weight')" for m in ("mix1", "mix2")], got  # both read anime
    out = load(project / "out/final.safetensors")
    assert "v_pred" in out and "ztsnr" in out and "model.diffusion_model.extra.weight" not in out


def test_a_weights_list_of_the_wrong_length_is_refused_before_any_compute(project):
    _with(project, chain().replace('method = "weighted_sum"\ninputs = ["real", "anime"]\nalpha = 0.4',
                                   'method = "soup"\ninputs = ["real", "anime"]\nweights = [1, 2, 3]', 1))
    mb(project, "-q").one_line_error(2, "[merges.mix1] weights", "3 values for 2 models")
    assert not (project / "cache").exists()
    _with(project, chain().replace('method = "add_difference"\ninputs = ["mix1", "anime", "base"]\nalpha = 0.5',
                                   'method = "ties"\ninputs = ["base", "mix1", "anime"]\nweights = [1, 2, 3]'))
    mb(project, "-q").one_line_error(2, "[merges.mix2] weights", "3 values for 2 models")


def test_a_warning_is_printed_once_even_when_quiet(project):
    _with(project, chain().replace("alpha = 0.4", 'alpha = 0.4\ninclude = "nothing_here"'))
    r = mb(project, "-q", "--json")
    assert len(_warnings(r)) == 1 and json.loads(r.out)["merges"]["mix1"]["computed"] == 0

