"""read_header against safetensors' own loader: whatever safetensors rejects, we reject, with one
InputError line naming the file and the problem; whatever we accept, safetensors reads the same."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergebuild.dtypes import TORCH_NAMES
from mergebuild.errors import InputError
from mergebuild.tensors.convert import to_bytes
from mergebuild.tensors.header import read_header
from tests.conftest import mergefile, write_model
from tests.faults.conftest import mb

F32 = '"dtype":"F32","shape":[1],"data_offsets":[0,4]'
ONE = b"\x01\x00\x00\x00"


def _file(header, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _safetensors_reads(path) -> dict | None:
    """What safetensors' loader gives for every tensor, or None if it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {"tensors": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata() or {}}
    except BaseException as e:  # noqa: BLE001 - a pyo3 PanicException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


# (id, file bytes, fragment of our message, does safetensors also reject?)
CASES = [
    ("empty file", b"", "shorter than a header", True),
    ("7 bytes", b"\0" * 7, "shorter than a header", True),
    ("header over 100 MB", struct.pack("<Q", 100_000_001) + b"{}", "does not fit the format's limit", True),
    ("header length 2^64-1", b"\xff" * 8 + b"{}", "does not fit the format's limit", True),
    ("header beyond the file", _file("{}", length=100), "does not fit a file of 10 bytes", True),
    ("zero-length header", _file(""), "not JSON", True),
    ("not UTF-8", _file(b'{"a\xff":{' + F32.encode() + b"}}", ONE), "not UTF-8", True),
    ("UTF-8 BOM", _file('\ufeff{"a":{%s}}' % F32, ONE), "not JSON", True),
    ("raw surrogate", _file('{"\ud800":{%s}}' % F32, ONE), "not UTF-8", True),
    ("escaped lone surrogate", _file('{"\\ud800":{%s}}' % F32, ONE), "lone surrogate", True),
    ("not JSON", _file("nope!"), "not JSON", True),
    ("trailing comma", _file('{"a":{%s},}' % F32, ONE), "not JSON", True),
    ("NUL after the JSON", _file('{"a":{%s}}\0' % F32, ONE), "not JSON", True),
    ("NaN", _file('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', ONE), "NaN is not JSON", True),
    ("nested too deep", _file('{"a":{"dtype":"F32","shape":%s,"data_offsets":[0,4]}}' % ("[" * 5000 + "]" * 5000), ONE),
     "not JSON", True),
    ("a list", _file("[]"), "not a JSON object", True),
    ("null", _file("null"), "not a JSON object", True),
    ("__metadata__ a list", _file('{"__metadata__":[],"a":{%s}}' % F32, ONE), "__metadata__ is not an object", True),
    ("__metadata__ int value", _file('{"__metadata__":{"k":1},"a":{%s}}' % F32, ONE),
     "__metadata__ value of 'k' is not a string", True),
    ("__metadata__ null value", _file('{"__metadata__":{"k":null},"a":{%s}}' % F32, ONE),
     "__metadata__ value of 'k' is not a string", True),
    ("__metadata__ twice", _file('{"__metadata__":{},"__metadata__":{},"a":{%s}}' % F32, ONE),
     "__metadata__ appears twice", True),
    ("entry not an object", _file('{"a":[]}'), "tensor 'a' is not an object", True),
    ("missing shape", _file('{"a":{"dtype":"F32","data_offsets":[0,4]}}', ONE), "tensor 'a' has no shape", True),
    ("field twice", _file('{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}', ONE),
     "tensor 'a' has field 'dtype' twice", True),
    ("unknown dtype", _file('{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', ONE), "'f32', which is unknown", True),
    ("dtype not a string", _file('{"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}', ONE), "which is unknown", True),
    ("shape a number", _file('{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}', ONE), "tensor 'a' has shape 1", True),
    ("shape float", _file('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', ONE), "shape [1.0]", True),
    ("shape exponent", _file('{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', ONE), "shape [1.0]", True),
    ("shape bool", _file('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', ONE), "shape [True]", True),
    ("shape string", _file('{"a":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}', ONE), "shape ['1']", True),
    ("shape negative", _file('{"a":{"dtype":"F32","shape":[-1,-1],"data_offsets":[0,4]}}', ONE), "shape [-1, -1]", True),
    ("shape -0", _file('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'), "-0 is not an unsigned integer", True),
    ("shape over u64", _file('{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}'),
     "not a list of integers in 0..2**63-1", True),
    ("shape over torch's int64", _file('{"a":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}'),
     "not a list of integers in 0..2**63-1", True),
    ("offsets three", _file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}', ONE), "data_offsets [0, 4, 4]", True),
    ("offsets float", _file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', ONE), "data_offsets [0, 4.0]", True),
    ("offsets reversed", _file('{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}'), "data_offsets [4, 0]", True),
    ("size mismatch", _file('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
     "tensor 'a': 8 bytes do not match F32[3]", True),
    ("bit count overflows", _file('{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}'),
     "overflows a 64-bit byte count", True),
    ("count overflows before a 0", _file('{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}'),
     "overflows a 64-bit byte count", True),
    ("hole at the start", _file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
     "bytes 0..4 of the data, before tensor 'a', belong to no tensor", True),
    ("hole between", _file('{"a":{%s},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}' % F32, b"\0" * 12),
     "bytes 4..8 of the data, before tensor 'b'", True),
    ("overlap", _file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                      '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
     "tensor 'b' overlaps tensor 'a'", True),
    ("same bytes twice", _file('{"a":{%s},"b":{%s}}' % (F32, F32), ONE), "tensor 'b' overlaps tensor 'a'", True),
    ("empty tensor past the end", _file('{"a":{%s},"z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}' % F32, ONE),
     "before tensor 'z'", True),
    ("trailing byte", _file('{"a":{%s}}' % F32, ONE + b"\0"), "1 trailing byte after the last tensor", True),
    ("trailing byte, no tensors", _file('{"__metadata__":{"k":"v"}}', b"\0"), "1 trailing byte", True),
    ("truncated data", _file('{"a":{%s}}' % F32, ONE[:3]),
     "the data lies outside the file (truncated?): tensor 'a' ends at byte 66, the file has 65", True),
    # stricter than safetensors, which keeps the last duplicate, ignores unknown fields, and
    # knows dtypes mergebuild cannot compute in
    ("tensor twice", _file('{"a":{%s},"a":{%s}}' % (F32, F32), ONE), "tensor 'a' appears twice in the header", False),
    ("metadata key twice", _file('{"__metadata__":{"k":"1","k":"2"},"a":{%s}}' % F32, ONE),
     "__metadata__ has key 'k' twice", False),
    ("unknown field", _file('{"a":{%s,"extra":1}}' % F32, ONE), "tensor 'a' has unexpected field 'extra'", False),
    ("dtype as an enum object", _file('{"a":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', ONE),
     "which is unknown", False),
    ("complex dtype", _file('{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8),
     "'C64', which mergebuild does not support", False),
]


@pytest.mark.parametrize("content, fragment, safetensors_rejects", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_one_input_error_naming_file_and_problem(tmp_path, content, fragment, safetensors_rejects):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid safetensors file: "), message
    assert fragment in message and "\n" not in message, message
    assert (_safetensors_reads(path) is None) == safetensors_rejects


# accepted by both: check we agree on what is in them
GOOD = [
    ("scalar", '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', ONE),
    ("no tensors", '{"__metadata__":{"k":"v"}}', b""),
    ("nothing", "{}", b""),
    ("null metadata", '{"__metadata__":null,"a":{%s}}' % F32, ONE),
    ("whitespace padding", ' \n{"a":{%s}}   \t' % F32, ONE),
    ("empty tensors share offsets", '{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
     '"y":{"dtype":"I64","shape":[0,3],"data_offsets":[0,0]},"a":{%s},'
     '"x":{"dtype":"F32","shape":[2,0],"data_offsets":[4,4]}}' % F32, ONE),
    ("0 before an overflowing count", '{"a":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}', b""),
    ("largest torch dim", '{"a":{"dtype":"F32","shape":[9223372036854775807,0],"data_offsets":[0,0]}}', b""),
    ("escapes in names", '{"\\u0061\\ud83d\\ude00":{%s},"__metadata__":{"k":"\\\\u"}}' % F32, ONE),
    ("out of order", '{"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]},"a":{%s}}' % F32, ONE + b"\x07"),
]


@pytest.mark.parametrize("header, data", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_files_safetensors_accepts_read_the_same(tmp_path, header, data):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_file(header, data))
    _assert_same(path, _safetensors_reads(path), read_header(path))


def _assert_same(path, theirs, ours) -> None:
    assert theirs is not None, "we accepted a file safetensors refuses"
    raw = path.read_bytes()
    assert ours.metadata == theirs["metadata"]
    assert set(ours.tensors) == set(theirs["tensors"])
    for name, t in theirs["tensors"].items():
        entry = ours.tensors[name]
        assert TORCH_NAMES[entry.dtype] == str(t.dtype).removeprefix("torch."), name
        assert entry.shape == tuple(t.shape), name
        assert raw[entry.begin:entry.end] == bytes(to_bytes(t)), name


def test_many_tensors_parse_quickly_enough(tmp_path):
    """A build reads every source's header: 3000 tensors must stay cheap (generous bound)."""
    import time

    tensors = {f"model.layer.{i}.weight": torch.zeros(2, 3, dtype=torch.float16) for i in range(3000)}
    save_file(tensors, str(tmp_path / "big.safetensors"), metadata={"k": "v"})
    start = time.perf_counter()
    header = read_header(tmp_path / "big.safetensors")
    assert time.perf_counter() - start < 0.5
    assert len(header.tensors) == 3000


# --- property: random mutations of a real file -------------------------------------------------


class Obj(list):
    """A JSON object as ordered (key, value) pairs, so that mutations can repeat keys."""


def _dump(value) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_dump, value)) + "]"
    if isinstance(value, RawJSON):
        return value.text
    return json.dumps(value)


class RawJSON:
    """JSON text json.dumps will not write (-0, a lone surrogate escape, 1e400)."""

    def __init__(self, text: str):
        self.text = text


def _as_obj(value):
    if isinstance(value, dict):
        return Obj((k, _as_obj(v)) for k, v in value.items())
    return value


def _valid_file(tmp_path) -> tuple[Obj, bytes]:
    tensors = {
        "w": torch.randn(2, 3),
        "h": torch.arange(4, dtype=torch.float16),
        "i": torch.tensor([1, -2, 3], dtype=torch.int64),
        "b": torch.ones(2, 2, dtype=torch.bfloat16),
        "u": torch.arange(5, dtype=torch.uint8),
        "e": torch.zeros(0, 3),
        "s": torch.tensor(True),
    }
    save_file(tensors, str(tmp_path / "base.safetensors"), metadata={"format": "pt", "note": "x"})
    raw = (tmp_path / "base.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return _as_obj(json.loads(raw[8:8 + n])), raw[8 + n:]


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2", "C64", "F8_E8M0", "F4", "f16", "", "F16 "]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([2**64 - 1, 2**64, 2**63]),
              st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(DTYPES),
              st.sampled_from([RawJSON("-0"), RawJSON('"\\ud800"'), RawJSON("1e400"), RawJSON("1.0")])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["dtype", "shape", "x"]), inner,
                                                                           max_size=3).map(_as_obj)),
    max_leaves=6,
)


def _field(doc: Obj, data, names: list) -> tuple[Obj, int]:
    """A tensor entry of the header (its index among the entry's fields)."""
    name = data.draw(st.sampled_from(names))
    entry = next(v for k, v in doc if k == name)
    return entry, data.draw(st.integers(0, max(0, len(entry) - 1)))


def _mutate_header(doc: Obj, data) -> None:
    names = [k for k, v in doc if k != "__metadata__" and isinstance(v, Obj) and v]
    kind = data.draw(st.sampled_from(["set", "drop", "repeat field", "extra field", "shift offset", "shape entry",
                                      "shape length", "dtype", "repeat tensor", "drop tensor", "metadata", "reorder",
                                      "negative zero", "huge empty shape",
                                      *["reshape", "same-size dtype", "rename", "empty tensor", "valid metadata"] * 2]))
    if not names and kind not in ("metadata", "reorder", "valid metadata"):
        return
    if kind in ("reshape", "same-size dtype", "rename", "empty tensor", "valid metadata"):
        _mutate_harmlessly(doc, data, names, kind)
        return
    if kind in ("set", "drop", "repeat field"):
        entry, i = _field(doc, data, names)
        if kind == "set":
            entry[i] = (entry[i][0], data.draw(JSON_VALUES))
        elif kind == "drop":
            del entry[i]
        else:
            entry.append(entry[i])
    elif kind == "extra field":
        entry, _ = _field(doc, data, names)
        entry.append((data.draw(st.sampled_from(["extra", "Dtype", "shape "])), data.draw(JSON_VALUES)))
    elif kind in ("shift offset", "shape entry", "shape length", "dtype"):
        entry, _ = _field(doc, data, names)
        fields = dict(entry)
        if kind == "shift offset" and isinstance(fields.get("data_offsets"), list) and fields["data_offsets"]:
            offsets = fields["data_offsets"]
            j = data.draw(st.integers(0, len(offsets) - 1))
            if isinstance(offsets[j], int):
                offsets[j] += data.draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]))
        elif kind == "shape entry" and isinstance(fields.get("shape"), list) and fields["shape"]:
            shape = fields["shape"]
            shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(
                st.one_of(st.integers(0, 6), st.sampled_from([-1, True, 2.0, "2", RawJSON("-0"), 2**64])))
        elif kind == "shape length" and isinstance(fields.get("shape"), list):
            shape = fields["shape"]
            if shape and data.draw(st.booleans()):
                shape.pop()
            else:
                shape.insert(data.draw(st.integers(0, len(shape))), data.draw(st.sampled_from([0, 1, 2])))
        elif kind == "dtype":
            for j, (k, _) in enumerate(entry):
                if k == "dtype":
                    entry[j] = (k, data.draw(st.sampled_from(DTYPES)))
    elif kind in ("negative zero", "huge empty shape"):
        _mutate_an_empty_shape(doc, data, kind)
    elif kind == "repeat tensor":
        name = data.draw(st.sampled_from(names))
        doc.append((name, _as_obj(json.loads(_dump(next(v for k, v in doc if k == name))))))
    elif kind == "drop tensor":
        name = data.draw(st.sampled_from(names))
        doc[:] = [(k, v) for k, v in doc if k != name]
    elif kind == "metadata":
        value = data.draw(st.one_of(JSON_VALUES, st.just(_as_obj({"format": "pt", "format ": "pt"})),
                                    st.just(Obj([("format", "pt"), ("format", "np")]))))
        doc[:] = [(k, v) for k, v in doc if k != "__metadata__"] + [("__metadata__", value)]
    else:  # a harmless change: safetensors sorts by offset, so order does not matter
        doc.reverse()


def _mutate_an_empty_shape(doc: Obj, data, kind: str) -> None:
    """Python and serde_json disagree on -0 and on when a product overflows: aim at tensors
    (or offsets) with a 0 in them, where those are the only thing wrong."""
    for _, entry in doc:
        if not isinstance(entry, Obj):
            continue
        for j, (k, v) in enumerate(entry):
            if kind == "negative zero" and k in ("shape", "data_offsets") and isinstance(v, list) and 0 in v:
                entry[j] = (k, [RawJSON("-0") if d == 0 and type(d) is int else d for d in v])
                return
            if kind == "huge empty shape" and k == "shape" and isinstance(v, list) and 0 in v:
                entry[j] = (k, data.draw(st.sampled_from([[2**32, 2**32, 0], [0, 2**32, 2**32], [2**63 - 1, 0], [2**63, 0]])))
                return


SAME_SIZE = [["F16", "BF16", "I16", "U16"], ["F32", "I32", "U32"], ["F64", "I64", "U64"], ["U8", "I8", "BOOL", "F8_E4M3"]]


def _mutate_harmlessly(doc: Obj, data, names: list, kind: str) -> None:
    """Changes that keep the file valid (unless an earlier mutation broke it), so that the
    property also sees files both sides accept, and compares what each reads in them."""
    if kind == "valid metadata":
        value = data.draw(st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3).map(_as_obj))
        doc[:] = [(k, v) for k, v in doc if k != "__metadata__"] + [("__metadata__", value)]
        return
    name = data.draw(st.sampled_from(names))
    i = next(j for j, (k, _) in enumerate(doc) if k == name)
    entry = doc[i][1]
    if kind == "rename":
        new = data.draw(st.sampled_from(["", "\u00e9t\u00e9", "a\\u", "a\x7f", "-0", "\ud83d\ude00",
                                          "\ud800", "x\udc00"]))  # json.dumps escapes these as \uXXXX
        if new not in [k for k, _ in doc]:
            doc[i] = (new, entry)
        return
    for j, (k, v) in enumerate(entry):
        if kind == "reshape" and k == "shape" and isinstance(v, list) and all(type(d) is int and d > 0 for d in v):
            count = 1
            for d in v:
                count *= d
            entry[j] = (k, data.draw(st.sampled_from([[count], [1, count], [count, 1], v[::-1], []]))
                        if count == 1 else data.draw(st.sampled_from([[count], [1, count], v[::-1]])))
        elif kind == "same-size dtype" and k == "dtype":
            group = next((g for g in SAME_SIZE if v in g), None)
            if group:
                entry[j] = (k, data.draw(st.sampled_from(group)))
        elif kind == "empty tensor" and k == "data_offsets" and isinstance(v, list) and v and type(v[0]) is int:
            at = data.draw(st.sampled_from(v))
            doc.insert(data.draw(st.integers(0, len(doc))),
                       (f"empty{len(doc)}", Obj([("dtype", "F32"), ("shape", [0, 2]), ("data_offsets", [at, at])])))
            return


def _mutate_bytes(header: bytes, blob: bytes, length: int, data) -> tuple[bytes, bytes, int]:
    kind = data.draw(st.sampled_from(["none", "none", "none", "append data", "cut data", "length", "insert byte", "pad"]))
    if kind == "append data":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "cut data" and blob:
        blob = blob[:-data.draw(st.integers(1, len(blob)))]
    elif kind == "length":
        length = data.draw(st.one_of(st.integers(max(0, length - 16), length + 16), st.integers(0, 2**64 - 1)))
    elif kind == "insert byte":
        at = data.draw(st.integers(0, len(header)))
        header = header[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\0", b" ", b"}"])) + header[at:]
        length = len(header)
    elif kind == "pad":
        header += b" " * data.draw(st.integers(1, 8))
        length = len(header)
    return header, blob, length


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _valid_file(tmp_path_factory.mktemp("valid"))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_never_pass_where_safetensors_fails(valid, tmp_path, data):
    doc, blob = valid
    doc = _as_obj(json.loads(_dump(doc)))  # a fresh copy
    for _ in range(data.draw(st.integers(0, 2))):
        _mutate_header(doc, data)
    header = _dump(doc).encode("utf-8", "surrogatepass")
    header, blob, length = _mutate_bytes(header, blob, len(header), data)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header + blob)
    theirs = _safetensors_reads(path)
    try:
        ours = read_header(path)  # any exception but InputError fails the test
    except InputError as e:
        assert str(e).startswith(f"{path}: not a valid safetensors file: ") and "\n" not in str(e)
        return
    _assert_same(path, theirs, ours)


# --- the real CLI ------------------------------------------------------------------------------


def test_cli_overlapping_offsets_exit_2_one_line(tmp_path):
    write_model(tmp_path / "a.safetensors", {"w": torch.ones(2), "v": torch.ones(2)})
    bad = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
    (tmp_path / "b.safetensors").write_bytes(_file(bad, b"\0" * 12))
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "m.safetensors"
    """)
    mb(tmp_path).one_line_error(2, "b.safetensors", "tensor 'v' overlaps tensor 'w'")
    assert not (tmp_path / "m.safetensors").exists()
