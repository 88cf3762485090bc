"""The GGUF reader: a llama GGUF laid out as llama.cpp's converter writes it reads back as the
Hugging Face tensors, bit for bit for F32/F16/BF16 and as gguf's own dequantize for quantised
types; names map as gguf-py's TensorNameMap says; bad files are one InputError naming the file."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mergebuild.errors import InputError
from mergebuild.tensors.convert import from_bytes
from mergebuild.tensors.gguf import hf_name, name_tables, read_gguf
from tests.unit.gguf_files import GGUF_NAMES, N_HEAD, N_KV, llama_state, q4_k_blocks, write_llama_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _read(path) -> dict[str, tuple[str, tuple, torch.Tensor]]:
    return {n: (dt, sh, from_bytes(bytearray(data), dt, sh)) for n, dt, sh, data in read_gguf(path).tensors()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["F16", "F32", "BF16"])
def test_llama_reads_back_as_the_hf_tensors_bit_for_bit(tmp_path, dtype):
    state = llama_state(1, dtype=dtype)
    got = _read(write_llama_gguf(tmp_path / "m.gguf", state))
    assert list(got) == list(state)  # names mapped back, none left out, none added
    for name, t in state.items():
        code, shape, value = got[name]
        assert shape == tuple(t.shape) and value.dtype == t.dtype, name
        assert _bits(value) == _bits(t), name  # q and k un-permuted, with n_kv < n_head heads for k


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantised_tensors_read_as_ggufs_own_dequantize(tmp_path, qtype):
    state = llama_state(2, dtype=torch.float32)
    got = _read(write_llama_gguf(tmp_path / "m.gguf", state, qtype=Q[qtype]))
    for name, t in state.items():
        code, shape, value = got[name]
        if t.dim() == 1:
            assert code == "F32" and torch.equal(value, t)  # the converter keeps 1-D tensors in F32
            continue
        # quantisation is per row, so it commutes with the converter's row permutation
        want = gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), Q[qtype]), Q[qtype])
        assert code == "F32" and shape == tuple(t.shape), name
        assert np.array_equal(value.numpy(), want), name


def test_q4_k_blocks_read_as_ggufs_own_dequantize(tmp_path):
    """gguf cannot quantise to Q4_K: the blocks are written raw, in HF row order, and permuted the
    way the converter would have permuted the rows they came from."""
    state = llama_state(3, hidden=256, ffn=256, dtype=torch.float16)
    raw = {n: (Q.Q4_K, q4_k_blocks(t.shape[0], t.shape[1], i)) for i, (n, t) in enumerate(state.items())
           if t.dim() == 2}
    got = _read(write_llama_gguf(tmp_path / "m.gguf", {n: t for n, t in state.items() if t.dim() == 1}, raw=raw))
    for name, (_, blocks) in raw.items():
        code, shape, value = got[name]
        want = gguf.quants.dequantize(blocks, Q.Q4_K)
        assert code == "F32" and shape == tuple(state[name].shape) and np.isfinite(want).all()
        assert np.array_equal(value.numpy(), want), name


def test_metadata_is_the_general_strings_only(tmp_path):
    model = read_gguf(write_llama_gguf(tmp_path / "m.gguf", llama_state(4)))
    assert model.metadata == {"general.architecture": "llama", "general.name": "tiny-llama"}
    assert model.notes == []


def test_the_name_table_agrees_with_gguf_pys_tensor_name_map():
    """Every name mergebuild maps back is the one gguf-py (llama.cpp's own table) maps forward."""
    tables = name_tables()
    for arch, spec in tables["architectures"].items():
        forward = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), 3)
        table = tables["tables"][spec["table"]]
        names = [(g, hf) for g, hf in table["global"].items()]
        names += [(f"blk.2.{g}", table["block_prefix"].format(bid=2) + hf) for g, hf in table["block"].items()]
        for gguf_name, hf in names:
            assert forward.get_name(hf) == gguf_name, (arch, hf)
            assert hf_name(arch, gguf_name + ".weight") == hf + ".weight"


def test_qwen2_rows_are_not_permuted(tmp_path):
    """convert_hf_to_gguf.py permutes q and k for llama only; qwen2 uses NeoX RoPE and keeps them."""
    state = llama_state(5, dtype=torch.float32)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    for name, t in state.items():
        w.add_tensor(GGUF_NAMES[name], t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = _read(path)
    assert all(torch.equal(got[n][2], t) for n, t in state.items())


def _write(path, arch, tensors: dict, fields=()):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in fields:
        w.add_array(key, value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_flux_names_map_to_themselves_and_city96s_orig_shape_wins(tmp_path):
    qkv = np.arange(24 * 16, dtype=np.float16).reshape(24, 16)
    conv = np.arange(8 * 4 * 3 * 3, dtype=np.float32)  # flattened by city96's shape_fix (sd1/sdxl only)
    path = _write(tmp_path / "f.gguf", "flux", {"double_blocks.0.img_attn.qkv.weight": qkv, "img_in.conv": conv},
                  fields=[("comfy.gguf.orig_shape.img_in.conv", [8, 4, 3, 3])])
    got = _read(path)
    assert list(got) == ["double_blocks.0.img_attn.qkv.weight", "img_in.conv"]
    assert np.array_equal(got["double_blocks.0.img_attn.qkv.weight"][2].numpy(), qkv)
    assert got["img_in.conv"][1] == (8, 4, 3, 3)
    assert np.array_equal(got["img_in.conv"][2].numpy(), conv.reshape(8, 4, 3, 3))


def test_an_unknown_architecture_keeps_its_names_with_a_note(tmp_path):
    model = read_gguf(_write(tmp_path / "u.gguf", "mamba", {"blk.0.ssm_a": np.ones((2, 4), np.float32)}))
    assert [e.name for e in model.entries] == ["blk.0.ssm_a"]
    assert len(model.notes) == 1 and "'mamba' has no name table" in model.notes[0]


def test_llamas_derived_rope_freqs_are_left_out_with_a_note(tmp_path):
    model = read_gguf(_write(tmp_path / "r.gguf", "llama", {"rope_freqs.weight": np.ones(4, np.float32),
                                                             "blk.0.ffn_gate_inp.weight": np.ones((2, 4), np.float32)}))
    assert [e.name for e in model.entries] == ["blk.0.ffn_gate_inp.weight"]  # unmapped: kept as it is
    assert any("rope_freqs.weight" in n for n in model.notes) and any("kept as the GGUF" in n for n in model.notes)


def _error(path) -> str:
    with pytest.raises(InputError) as info:
        model = read_gguf(path)
        list(model.tensors())
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_bad_files_are_one_input_error_naming_the_file(tmp_path):
    good = write_llama_gguf(tmp_path / "good.gguf", llama_state(6))
    data = good.read_bytes()
    cases = {
        "empty.gguf": (b"", "not a GGUF file"),
        "text.gguf": (b"hello, world\n", "not a GGUF file"),
        "tail.gguf": (data[:-100], "damaged or incomplete GGUF"),  # cut in the tensor data
        "head.gguf": (data[:200], "damaged or incomplete GGUF"),  # cut in the metadata
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert fragment in _error(tmp_path / name), name


def test_a_type_gguf_cannot_dequantize_names_the_tensor_and_type(tmp_path):
    size = gguf.constants.GGML_QUANT_SIZES[Q.Q8_K][1]
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_tensor("a.weight", np.ones((2, 256), np.float32))
    w.add_tensor("b.weight", np.zeros((2, size), np.uint8), raw_dtype=Q.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "tensor 'b.weight' is stored as Q8_K, which gguf" in _error(path)


def test_llama_without_head_counts_cannot_be_unpermuted(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", llama_state(7), head_counts=False)
    assert "no usable attention.head_count" in _error(path)


def test_without_the_gguf_package_one_error_says_to_install_it(tmp_path, monkeypatch):
    path = write_llama_gguf(tmp_path / "m.gguf", llama_state(8))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    assert "needs the gguf package: pip install gguf" in _error(path)


def _patched(path, marker: bytes, skip: int, value: bytes):
    """The file with `value` written `skip` bytes after the end of its first `marker`."""
    data = bytearray(path.read_bytes())
    at = data.index(marker) + len(marker) + skip
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_array_length_fails_at_once_instead_of_looping(tmp_path):
    """gguf's own parser reads past the end of the file as empty arrays: with a count of 2**40 it
    would loop for hours. Every read is bounded by the file's size."""
    path = _write(tmp_path / "a.gguf", "flux", {"w": np.ones(4, np.float32)}, fields=[("x.scores", [1.0] * 8)])
    _patched(path, b"x.scores", 8, (2**40).to_bytes(8, "little"))  # after the value type and item type
    assert "the file ends at byte" in _error(path)


def test_a_tensor_type_gguf_does_not_know_says_so(tmp_path):
    path = _write(tmp_path / "t.gguf", "flux", {"wtensor": np.ones((2, 4), np.float32)})
    _patched(path, b"wtensor", 4 + 2 * 8, (4).to_bytes(4, "little"))  # after ndims and 2 dims: the type (Q4_2, gone)
    assert "a tensor type gguf" in _error(path)


def test_one_part_of_a_split_gguf_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_uint16("split.count", 3)
    w.add_tensor("token_embd.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "one part of a GGUF split into 3 files" in _error(tmp_path / "s.gguf")
