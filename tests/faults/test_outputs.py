"""1. Outputs never destroy anything: a path that names a user's file or folder is refused at
plan time (exit 2, naming the field), and nothing is deleted, moved or written."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import write_model
from tests.faults.conftest import leftovers, mb, model, recovers, snapshot, write_mergefile

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

REFUSED = {
    "the folder of the sources": ("models", "contains [models.a]"),
    "the project itself": (".", "contains the Mergefile"),
    "the Mergefile": ("mergefile.toml", "is the Mergefile"),
    "the lock": ("mergefile.lock", "is the Mergefile's lock"),
    "the cache": ("cache", "is the cache"),
    "inside the cache": ("cache/objects/x.safetensors", "lies inside the cache"),
    "a source": ("models/a.safetensors", "[models.a]"),
    "a source, by another spelling": ("models/../models/a.safetensors", "[models.a]"),
    "a .ckpt": ("x.ckpt", "mergebuild writes safetensors"),
    "a .pt": ("out/x.pt", "mergebuild writes safetensors"),
    "a .pth": ("x.pth", "mergebuild writes safetensors"),
    "a .bin": ("pytorch_model.bin", "mergebuild writes safetensors"),
    "a .gguf": ("x.gguf", "mergebuild writes safetensors"),
    "a .sft": ("flux.sft", "mergebuild writes safetensors"),
    "a user's text file, as a folder": ("models/notes.txt", "is an existing file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_output_naming_what_the_build_knows_is_refused(two, case):
    output, words = REFUSED[case]
    write_mergefile(two, output)
    mb(two, "-q")  # a first attempt, then a second on the same cache: neither deletes anything
    before = snapshot(two)
    r = mb(two, "-q")
    r.one_line_error(2, "[merges.m] output", words)
    assert snapshot(two) == before and not leftovers(two)
    assert (two / "models/a.safetensors").exists() and (two / "models/notes.txt").read_text() == "mine"
    recovers(two)


def test_an_output_inside_a_model_folder_source_is_refused(two):
    folder = two / "llm"
    write_model(folder / "model.safetensors", model(3))
    (two / "mergefile.toml").write_text(
        '[models.a]\npath = "llm"\n[models.b]\npath = "models/b.safetensors"\n'
        '[merges.m]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.3\noutput = "llm/merged.safetensors"\n')
    mb(two, "-q").one_line_error(2, "[merges.m] output", "lies inside [models.a]")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]


def test_outputs_nested_in_each_other_are_refused(two):
    write_mergefile(two, "out/folder", extra='\n[merges.n]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\n'
                    'alpha = 0.5\noutput = "out/folder/inner.safetensors"\n')
    r = mb(two, "-q")
    r.one_line_error(2, "output", "the output of [merges.")
    assert not (two / "out").exists()


def test_a_file_output_may_sit_beside_its_sources(two):
    write_mergefile(two, "models/merged.safetensors")
    assert mb(two, "-q").code == 0
    assert (two / "models/merged.safetensors").exists() and (two / "models/notes.txt").read_text() == "mine"
    recovers(two, "models/merged.safetensors")


def test_an_existing_file_mergebuild_did_not_write_is_never_replaced(two):
    downloaded = two / "models/favourite.safetensors"
    write_model(downloaded, model(9))
    before = downloaded.read_bytes()
    write_mergefile(two, "models/favourite.safetensors")
    mb(two, "-q").one_line_error(2, "favourite.safetensors exists and was not written by mergebuild")
    assert downloaded.read_bytes() == before


def test_a_symlink_to_a_source_is_the_source(two):
    os.symlink(two / "models/a.safetensors", two / "alias.safetensors")
    write_mergefile(two, "alias.safetensors")
    mb(two, "-q").one_line_error(2, "[merges.m] output", "[models.a]")


def test_a_file_standing_where_a_folder_is_needed(two):
    write_mergefile(two, "models/a.safetensors/out.safetensors")
    mb(two, "-q").one_line_error(2, "[merges.m] output", "a.safetensors is a file, not a folder")
    write_mergefile(two, "out.safetensors")
    (two / "out.safetensors").mkdir()
    mb(two, "-q").one_line_error(2, "is an existing folder")


def test_a_folder_output_is_replaced_only_when_mergebuild_wrote_every_file_in_it(two):
    write_mergefile(two, "merged")
    assert mb(two, "-q").code == 0
    manifest = json.loads((two / "merged/.mergebuild-manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors"}
    write_mergefile(two, "merged", alpha="0.6")
    assert mb(two, "-q").code == 0  # its own files: replaced
    (two / "merged/notes.md").write_text("my notes")
    write_mergefile(two, "merged", alpha="0.7")
    mb(two, "-q").one_line_error(2, "merged is a folder holding files mergebuild did not write (notes.md)")
    assert (two / "merged/notes.md").read_text() == "my notes"
    # clean removes what mergebuild wrote and keeps the rest
    r = mb(two, "clean", "--json")
    assert r.code == 0 and json.loads(r.out)["kept"] == [f"{two / 'merged'}: notes.md"]
    assert sorted(p.name for p in (two / "merged").iterdir()) == ["notes.md"]


def test_a_folder_edited_since_its_build_is_not_replaced(two):
    write_mergefile(two, "merged")
    assert mb(two, "-q").code == 0
    shard = two / "merged/model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))  # the user edited it: mergebuild no longer knows it as its own
    write_mergefile(two, "merged", alpha="0.6")
    mb(two, "-q").one_line_error(2, "model.safetensors")
    assert shard.read_bytes() == bytes(data)


def test_an_empty_existing_folder_is_used(two):
    (two / "merged").mkdir()
    write_mergefile(two, "Qwen2.5-7B-merged")
    (two / "Qwen2.5-7B-merged").mkdir()
    assert mb(two, "-q").code == 0
    assert (two / "Qwen2.5-7B-merged/model.safetensors").exists()


def test_clean_never_removes_what_mergebuild_did_not_write(two):
    assert mb(two, "-q").code == 0
    out = two / "out/m.safetensors"
    write_model(out, model(7))  # the user put their own file there
    r = mb(two, "clean")
    assert r.code == 0 and "not written by mergebuild" in r.out and out.exists()
    mb(two, "clean", "nosuch").one_line_error(2, "'nosuch' is not a merge")


def test_clean_removes_its_own_output(two):
    assert mb(two, "-q").code == 0
    r = mb(two, "clean")
    assert r.code == 0 and not (two / "out/m.safetensors").exists()
    assert (two / "models/notes.txt").exists()
