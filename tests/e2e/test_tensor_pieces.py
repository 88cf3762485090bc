"""Big tensors of elementwise methods move in pieces (execute/pieces.py): the same bytes, digests
and report statistics as whole tensors, and the same answers when a source changes under the
build, holds NaN, or the build is interrupted. The piece and chunk sizes are shrunk so that tiny
models have tensors of many pieces."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergebuild.execute import executor, pieces
from tests.conftest import build_json, load, mergefile, run_cli, small_model, write_model

BIG = "model.diffusion_model.input_blocks.1.1.proj_out.weight"
ODD = "model.diffusion_model.output_blocks.2.1.proj_in.weight"

MERGEFILE = """
[settings]
cache = "cache"
[models.a]
path = "models/a.safetensors"
[models.b]
path = "models/b.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.3
output = "out/mix.safetensors"
[merges.final]
method = "add_difference"
inputs = ["mix", "b", "a"]
alpha = 0.7
output = "out/final.safetensors"
dtype = "bfloat16"
"""


def _models(root: Path, nan_at: int | None = None) -> None:
    g = torch.Generator().manual_seed(7)
    big_a, odd_a = torch.randn(400, 500, generator=g), torch.randn(70001, generator=g)
    a = small_model(1, extra={BIG: big_a.half(), ODD: odd_a.half()})
    b = small_model(2, extra={BIG: (big_a + 0.1 * torch.randn(400, 500, generator=g)).half(),
                              ODD: (odd_a + 0.1 * torch.randn(70001, generator=g)).half()})
    if nan_at is not None:
        b[BIG].view(-1)[nan_at] = float("nan")
    write_model(root / "models" / "a.safetensors", a)
    write_model(root / "models" / "b.safetensors", b)
    mergefile(root / "mergefile.toml", MERGEFILE)


@pytest.fixture
def small_pieces(monkeypatch):
    """Chunks of 4096 elements, pieces of 16384: BIG is 13 pieces, ODD 5 (the last one short)."""
    monkeypatch.setattr(executor, "CHUNK", 4096)
    monkeypatch.setattr(pieces, "PIECE", 4 * 4096)
    seen = []
    handle = pieces.handle

    def counting(ex, piece, *args):
        seen.append((piece.task.name, piece.begin))
        return handle(ex, piece, *args)

    monkeypatch.setattr(pieces, "handle", counting)
    return seen


def _stats(root: Path) -> dict:
    with sqlite3.connect(root / "cache" / "index.sqlite") as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, stats FROM stats")}


def _hash(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["modelspec.hash_sha256"]


def test_tensors_in_pieces_give_the_bytes_digests_and_statistics_of_whole_ones(tmp_path, monkeypatch, small_pieces):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        _models(root)
    with monkeypatch.context() as m:
        m.setattr(pieces, "PIECE", 1 << 40)  # nothing is in pieces
        build_json(cwd=whole)
    assert not small_pieces
    build_json(cwd=split)
    assert {name for name, _ in small_pieces} == {BIG, ODD}
    assert len(small_pieces) == 2 * (13 + 5)  # both merges in pieces: `final` reads mix's committed file
    for out in ("mix", "final"):
        a, b = load(whole / "out" / f"{out}.safetensors"), load(split / "out" / f"{out}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _hash(whole / "out" / f"{out}.safetensors") == _hash(split / "out" / f"{out}.safetensors")
    reference = torch.lerp(load(split / "models" / "a.safetensors")[BIG].float(),
                           load(split / "models" / "b.safetensors")[BIG].float(), 0.3).half()
    assert torch.equal(load(split / "out" / "mix.safetensors")[BIG], reference)
    stats_whole, stats_pieces = _stats(whole), _stats(split)
    assert stats_whole and stats_whole == stats_pieces
    # the digests the index keeps are the whole-tensor ones: a no-op, and a rebuild elsewhere agree
    assert build_json(cwd=split)["merges"]["final"]["computed"] == 0


def test_a_source_truncated_under_a_piece_read_fails_cleanly_and_records_nothing(tmp_path, monkeypatch, small_pieces):
    _models(tmp_path)
    b = tmp_path / "models" / "b.safetensors"
    kept = b.read_bytes()
    fetch = pieces.fetch

    def truncating(ex, piece):
        if piece.begin > 0:
            with open(b, "r+b") as f:
                f.truncate(len(kept) // 2)
        return fetch(ex, piece)

    monkeypatch.setattr(pieces, "fetch", truncating)
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode == 1
    assert "changed during the build" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "mix.safetensors").exists()
    monkeypatch.setattr(pieces, "fetch", fetch)
    b.write_bytes(kept)
    build_json(cwd=tmp_path)
    reference = tmp_path / "again"
    _models(reference)
    with monkeypatch.context() as m:
        m.setattr(pieces, "PIECE", 1 << 40)
        build_json(cwd=reference)
    assert load(tmp_path / "out" / "final.safetensors")[BIG].equal(load(reference / "out" / "final.safetensors")[BIG])


def test_nan_in_a_later_piece_names_the_input_it_came_from(tmp_path, small_pieces):
    _models(tmp_path, nan_at=150_000)
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode == 2
    assert "[models.b]" in proc.stderr and BIG in proc.stderr and "NaN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_interrupt_between_pieces_keeps_only_whole_tensors(tmp_path, monkeypatch, small_pieces):
    _models(tmp_path)
    handle = pieces.handle  # the counting one
    calls = []

    def interrupted(ex, piece, *args):
        calls.append(piece)
        if piece.task.name == BIG and piece.begin >= 6 * pieces.PIECE:
            raise KeyboardInterrupt
        return handle(ex, piece, *args)

    monkeypatch.setattr(pieces, "handle", interrupted)
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "out" / "mix.safetensors").exists()
    monkeypatch.setattr(pieces, "handle", handle)
    again = build_json(cwd=tmp_path)
    assert again["merges"]["mix"]["computed"] >= 1  # the half-written tensor is computed again
    reference = tmp_path / "reference"
    shutil.copytree(tmp_path / "models", reference / "models")
    mergefile(reference / "mergefile.toml", MERGEFILE)
    build_json(cwd=reference)
    for out in ("mix", "final"):
        a, b = load(tmp_path / "out" / f"{out}.safetensors"), load(reference / "out" / f"{out}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_input_gone_bad_is_healed_not_used(tmp_path, small_pieces):
    """final reads mix's tensors from blobs (mix has no output); a blob flipped in place, same
    size, is caught by its digest once its pieces are read, and the tensor is recomputed."""
    _models(tmp_path)
    text = MERGEFILE.replace('output = "out/mix.safetensors"\n', "")
    mergefile(tmp_path / "mergefile.toml", text)
    build_json(cwd=tmp_path)
    size = 400 * 500 * 2  # BIG in float16
    blobs = [p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file() and p.stat().st_size == size]
    assert blobs
    for blob in blobs:
        data = bytearray(blob.read_bytes())
        data[size // 2] ^= 0xFF
        blob.write_bytes(data)
    mergefile(tmp_path / "mergefile.toml", text.replace("alpha = 0.7", "alpha = 0.6"))
    small_pieces.clear()
    build_json(cwd=tmp_path)
    assert (BIG, 0) in small_pieces  # read in pieces, found bad at the end, computed again
    clean = tmp_path / "clean"
    _models(clean)
    mergefile(clean / "mergefile.toml", text.replace("alpha = 0.7", "alpha = 0.6"))
    build_json(cwd=clean)
    healed, expected = load(tmp_path / "out" / "final.safetensors"), load(clean / "out" / "final.safetensors")
    assert all(torch.equal(healed[k], expected[k]) for k in expected)


def test_the_progress_counts_a_healed_tensor_once(tmp_path, small_pieces):
    """A tensor whose pieces were counted before its cached input turned out bad is counted once
    in all: what the pieces showed, and the rest when it is computed whole."""
    from mergebuild import api

    _models(tmp_path)
    text = MERGEFILE.replace('output = "out/mix.safetensors"\n', "")
    mergefile(tmp_path / "mergefile.toml", text)
    build_json(cwd=tmp_path)
    size = 400 * 500 * 2
    for blob in (p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file() and p.stat().st_size == size):
        data = bytearray(blob.read_bytes())
        data[size // 2] ^= 0xFF
        blob.write_bytes(data)
    mergefile(tmp_path / "mergefile.toml", text.replace("alpha = 0.7", "alpha = 0.6"))
    events = []
    small_pieces.clear()
    api.build(tmp_path / "mergefile.toml", progress=events.append)
    assert (BIG, 0) in small_pieces
    start = next(e for e in events if e["event"] == "start" and e["merge"] == "final")
    advances = [e for e in events if e["event"] == "advance" and e["merge"] == "final"]
    assert sum(e["written"] for e in advances) == start["bytes"]
    assert sum(e["tensors"] for e in advances) == start["tensors"]


def test_a_folder_output_in_shards_takes_pieces_too(tmp_path, monkeypatch, small_pieces):
    """Sharded: the big tensors land in different shards, the data hash runs over the shards in turn."""
    text = MERGEFILE.replace('output = "out/final.safetensors"', 'output = "out/final"\nshard_size = 500000')
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        _models(root)
        mergefile(root / "mergefile.toml", text)
    with monkeypatch.context() as m:
        m.setattr(pieces, "PIECE", 1 << 40)
        build_json(cwd=whole)
    build_json(cwd=split)
    assert {name for name, _ in small_pieces} == {BIG, ODD}
    shards = sorted(p.name for p in (split / "out" / "final").glob("*.safetensors"))
    assert len(shards) >= 2 and shards == sorted(p.name for p in (whole / "out" / "final").glob("*.safetensors"))
    for name in shards:
        a, b = load(whole / "out" / "final" / name), load(split / "out" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _hash(whole / "out" / "final" / name) == _hash(split / "out" / "final" / name)
