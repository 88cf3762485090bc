"""Tokenizers read as data (tensors/tokenizer.py): every model type's vocab, added tokens, bad
files, and the union tokenizer as the tokenizers package reads it back."""

from __future__ import annotations

import json

import pytest

from mergebuild.errors import InputError
from mergebuild.tensors.tokenizer import parse_tokenizer, read_vocabulary, union_files, with_vocab_size

tokenizers = pytest.importorskip("tokenizers")


def test_bpe_wordlevel_and_unigram_vocabularies():
    bpe = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
           "added_tokens": [{"id": 3, "content": "<eos>", "special": True}]}
    tokens, added, size = parse_tokenizer(json.dumps(bpe).encode(), "t")
    assert tokens == {"a": 0, "b": 1, "ab": 2, "<eos>": 3} and list(added) == ["<eos>"] and size == 3
    unigram = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁x", -1.5]]}, "added_tokens": []}
    assert parse_tokenizer(json.dumps(unigram).encode(), "t")[0] == {"<unk>": 0, "▁x": 1}


@pytest.mark.parametrize("data, fragment", [
    (b"{ nope", "not JSON"),
    (b"[]", "no model.vocab"),
    (b'{"model": {"vocab": {"a": "zero"}}}', "not a token id"),
    (b'{"model": {"vocab": {"a": true}}}', "not a token id"),
    (b'{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": -1, "content": "x"}]}', "added_tokens[0]"),
    (b'{"model": {"vocab": [[1, 2]]}}', "[piece, score]"),
])
def test_bad_tokenizer_files_are_one_line_input_errors(data, fragment):
    with pytest.raises(InputError) as e:
        parse_tokenizer(data, "m/tokenizer.json")
    assert str(e.value).startswith("m/tokenizer.json: not a tokenizer.json") and fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_union_files_load_in_the_tokenizers_package(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    base = read_vocabulary(tmp_path)
    assert base.next_id() == 2
    files = union_files(base, [("there", 2, None), ("<sep>", 3, {"special": True, "normalized": False})])
    (tmp_path / "out").mkdir()
    (tmp_path / "out/tokenizer.json").write_bytes(files["tokenizer.json"])
    back = tokenizers.Tokenizer.from_file(str(tmp_path / "out/tokenizer.json"))
    assert back.get_vocab() == {"<unk>": 0, "hi": 1, "there": 2, "<sep>": 3}
    assert back.encode("hi there <sep>").ids == [1, 2, 3]
    decoder = json.loads(files["tokenizer_config.json"])["added_tokens_decoder"]
    assert decoder["3"]["special"] is True and decoder["2"]["content"] == "there"


def test_vocab_size_is_set_where_the_config_has_it():
    assert with_vocab_size({"vocab_size": 10}, 10) is None
    assert with_vocab_size({"vocab_size": 10, "x": 1}, 12) == {"vocab_size": 12, "x": 1}
    nested = with_vocab_size({"text_config": {"vocab_size": 5}, "vision_config": {}}, 7)
    assert nested == {"text_config": {"vocab_size": 7}, "vision_config": {}}
    assert with_vocab_size({}, 3) == {"vocab_size": 3}
    assert with_vocab_size(None, 3) is None
