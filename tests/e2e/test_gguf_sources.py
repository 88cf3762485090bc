"""GGUF sources through the real CLI: a merge of a GGUF and a safetensors model builds, the GGUF
is imported once (a second build does not open it), and bad .gguf files stop the build with one
line and exit 2."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mergebuild.portable import file_stamp
from mergebuild.store.cache import Cache
from tests.conftest import build_json, load, mergefile, run_cli, write_model
from tests.faults.conftest import mb
from tests.unit.gguf_files import llama_state, write_llama_gguf

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

gguf = pytest.importorskip("gguf")

MERGE = """
[models.q]
path = "q.gguf"
[models.st]
path = "st.safetensors"
[merges.m]
method = "weighted_sum"
inputs = ["q", "st"]
alpha = 0.25
output = "m.safetensors"
"""


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every GGUF file opened by a GGUFReader (or a subclass), by path."""
    opened, real = [], gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        opened.append(str(path))
        real(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    return opened


def test_gguf_and_safetensors_merge_and_the_import_happens_once(tmp_path, reads):
    a, b = llama_state(1), llama_state(2)
    write_llama_gguf(tmp_path / "q.gguf", a)
    write_model(tmp_path / "st.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", MERGE)

    first = build_json(cwd=tmp_path)["merges"]["m"]
    assert first["computed"] == len(a) and len(reads) == 1
    out = load(tmp_path / "m.safetensors")
    assert set(out) == set(a)
    for name, t in a.items():  # the GGUF's dtypes lead (A's), computed in float32
        want = torch.lerp(t.float(), b[name].float(), 0.25).to(t.dtype)
        assert out[name].dtype == t.dtype and torch.equal(out[name], want), name

    again = build_json(cwd=tmp_path)["merges"]["m"]
    assert again["computed"] == 0 and len(reads) == 1  # the import is remembered: the GGUF is not opened
    path, st = tmp_path / "q.gguf", file_stamp(tmp_path / "q.gguf")
    table, _, sha256 = Cache(tmp_path / "cache").index.fingerprint(str(path), st)
    assert set(table) == set(a) and sha256 is not None  # its blobs, and the sha256 the first build hashed


def test_a_changed_gguf_is_imported_again(tmp_path, reads):
    write_llama_gguf(tmp_path / "q.gguf", llama_state(1))
    write_model(tmp_path / "st.safetensors", llama_state(2))
    mergefile(tmp_path / "mergefile.toml", MERGE)
    build_json(cwd=tmp_path)
    write_llama_gguf(tmp_path / "q.gguf", llama_state(3))
    doc = build_json(cwd=tmp_path)["merges"]["m"]
    assert len(reads) == 2 and doc["computed"] > 0


def _bad(tmp_path, content: bytes):
    (tmp_path / "q.gguf").write_bytes(content)
    write_model(tmp_path / "st.safetensors", llama_state(2))
    mergefile(tmp_path / "mergefile.toml", MERGE)
    return mb(tmp_path)


def test_a_truncated_gguf_is_one_line_exit_2(tmp_path):
    data = write_llama_gguf(tmp_path / "good.gguf", llama_state(1)).read_bytes()
    result = _bad(tmp_path, data[: len(data) // 2])
    result.one_line_error(2, "q.gguf", "damaged or incomplete GGUF")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_file_that_is_not_gguf_is_one_line_exit_2(tmp_path):
    write_model(tmp_path / "x.safetensors", {"w": torch.ones(2)})
    _bad(tmp_path, (tmp_path / "x.safetensors").read_bytes()).one_line_error(2, "q.gguf", "not a GGUF file")


def test_an_unsupported_tensor_type_is_one_line_exit_2(tmp_path):
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, size), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _bad(tmp_path, path.read_bytes()).one_line_error(2, "q.gguf", "tensor 'blk.0.ffn_up.weight' is stored as Q8_K")


def test_without_gguf_a_gguf_source_is_one_line_saying_pip_install(tmp_path, monkeypatch):
    data = write_llama_gguf(tmp_path / "good.gguf", llama_state(1)).read_bytes()
    monkeypatch.setitem(sys.modules, "gguf", None)
    _bad(tmp_path, data).one_line_error(2, "q.gguf", "pip install gguf")


def test_a_gguf_output_name_is_refused(tmp_path):
    write_model(tmp_path / "st.safetensors", llama_state(2))
    mergefile(tmp_path / "mergefile.toml", MERGE.replace('output = "m.safetensors"', 'output = "m.gguf"')
              .replace('"q.gguf"', '"st.safetensors"'))
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "mergebuild writes safetensors" in proc.stderr


def test_what_the_import_left_as_it_was_is_said_before_the_build(tmp_path):
    from tests.unit.test_gguf import _write

    _write(tmp_path / "q.gguf", "mamba", {"blk.0.ssm_a": np.ones((2, 4), np.float32)})
    write_model(tmp_path / "st.safetensors", {"blk.0.ssm_a": torch.zeros(2, 4)})
    mergefile(tmp_path / "mergefile.toml", MERGE)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "q: " in proc.stderr and "'mamba' has no name table" in proc.stderr
    assert load(tmp_path / "m.safetensors")["blk.0.ssm_a"].eq(0.75).all()
