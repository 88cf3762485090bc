"""Header parsing and the streaming writer, checked against the safetensors library itself."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.errors import BuildError, InputError
from mergebuild.tensors.convert import from_bytes, to_bytes
from mergebuild.tensors.header import read_header
from mergebuild.tensors.writer import SafetensorsWriter, remove_stale_temps


def test_header_matches_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"k": "v"}
    raw = (tmp_path / "m.safetensors").read_bytes()
    for name, t in tensors.items():
        entry = header.tensors[name]
        assert entry.shape == tuple(t.shape)
        assert raw[entry.begin:entry.end] == bytes(to_bytes(t))


@pytest.mark.parametrize("content, why", [
    (b"\x01\x00", "shorter than a header"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (struct.pack("<Q", 5) + b"nope!", "not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_corrupt_headers_are_input_errors(tmp_path, content, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=why):
        read_header(path)


def test_header_rejects_offsets_that_disagree_with_shape(tmp_path):
    doc = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(doc)) + doc + b"\0" * 8)
    with pytest.raises(InputError, match="do not match"):
        read_header(path)


def test_writer_output_loads_with_safetensors_in_any_write_order(tmp_path):
    tensors = {
        "w": torch.randn(5, 7),
        "h": torch.randn(3).to(torch.bfloat16),
        "i": torch.arange(4, dtype=torch.int32),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
    }
    layout = [(n, {"float32": "F32", "bfloat16": "BF16", "int32": "I32"}[str(t.dtype)[6:]], tuple(t.shape))
              for n, t in tensors.items()]
    # the draft holds placeholders as long as the final values: the header's size is exact
    w = SafetensorsWriter(tmp_path / "o.safetensors", layout, {"hash": "0" * 64, "more": "z"}, "tok")
    for name in reversed(list(tensors)):
        w.write(name, to_bytes(tensors[name]))
    w.commit({"hash": "ab" * 32, "more": "z"})
    loaded = load_file(str(tmp_path / "o.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    assert read_header(tmp_path / "o.safetensors").metadata == {"hash": "ab" * 32, "more": "z"}
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]


def test_metadata_that_outgrows_its_draft_is_an_error_not_a_torn_file(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,))], {"x": "1"}, "tok")
    w.write("a", bytes(8))
    with pytest.raises(BuildError, match="outgrew the space reserved"):
        w.commit({"x": "1" * 1000})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_leaves_nothing_and_stale_temps_are_removed(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,))], {}, "tok")
    busy = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,))], {}, "busy")
    w.abort()
    stale = tmp_path / f".o.safetensors.mergebuild-tmp-{os.getpid()}"  # a live PID, but nobody writes it
    stale.write_bytes(b"half")
    remove_stale_temps(tmp_path / "o.safetensors")
    assert not stale.exists()
    assert busy.temp.exists()  # locked by the writer that is still writing it
    busy.abort()
    assert list(tmp_path.iterdir()) == []


def test_bytes_round_trip_every_float_dtype():
    for dtype, code in ((torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float32, "F32"), (torch.float64, "F64")):
        t = torch.randn(3, 4).to(dtype)
        assert torch.equal(from_bytes(bytearray(to_bytes(t)), code, (3, 4)), t)
