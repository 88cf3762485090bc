"""Vocabularies of different sizes (vocab = "base" | "union" | "truncate", tokenizer_source): tiny
Llama-shaped model folders whose WordLevel tokenizers are trained offline on a few sentences,
merged through the real CLI and checked against a float64 reference of mergekit's rule
(mergekit/tokenizer/build.py and embed.py, with base_model = the first input)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.testing.fabricate import llama_keys, make_base
from tests.conftest import build_json, mergefile, run_cli

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = {
    "a": ["the cat sat on the mat", "a dog ran"],
    "b": ["the dog sat on a log", "birds fly high", "birds sat"],
    "c": ["the cat ran high", "fish swim", "fish sat on a log"],
}
ADDED = {"b": ["<|im_start|>"]}  # an added (special) token only b has
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def train(sentences: list[str], added=()) -> "tokenizers.Tokenizer":
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    if added:
        tok.add_special_tokens(list(added))
    return tok


def model_folder(path, name: str, seed: int, tokenizer: bool = True, extra_rows: int = 0) -> dict:
    """A model folder: model.safetensors, config.json, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json; the embedding has a row per token (and extra_rows padding rows)."""
    tok = train(SENTENCES[name], ADDED.get(name, ()))
    rows = tok.get_vocab_size() + extra_rows
    path.mkdir(parents=True)
    if tokenizer:
        tok.save(str(path / "tokenizer.json"))
        decoder = {str(i): {"content": t, "special": True} for t, i in tok.get_vocab().items() if t.startswith("<")}
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "added_tokens_decoder": decoder, "from": name}))
        (path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "from": name}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": rows, "hidden_size": 16,
                                                  "num_hidden_layers": 2, "from": name}))
    tensors = make_base(llama_keys(layers=2, vocab=rows), seed=seed, dtype=torch.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def swap_ids(path, x: str, y: str) -> None:
    doc = json.loads(path.read_text())
    v = doc["model"]["vocab"]
    v[x], v[y] = v[y], v[x]
    path.write_text(json.dumps(doc))


def vocab_of(path) -> dict[str, int]:
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()


@pytest.fixture
def trio(tmp_path):
    models = {n: model_folder(tmp_path / n, n, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    return tmp_path, models, {n: vocab_of(tmp_path / n) for n in models}


def models_toml(*names: str) -> str:
    return "".join(f"[models.{n}]\npath = \"{n}\"\n" for n in names)


def write(root, names: str, merges: str) -> None:
    """A Mergefile with models a, b, ... (one letter each, their folders by that name) and these merges."""
    mergefile(root / "mergefile.toml", models_toml(*names) + textwrap.dedent(merges))


# --- the reference: mergekit's rules, written out in float64 ---------------------------------
def union_vocab(vocabs: list[dict], added: set[str]) -> dict[str, int]:
    """mergekit's build_union_tokenizer: the base's tokens at their ids, then the others' new
    regular tokens, then their new added tokens (each input's in id order)."""
    out = dict(vocabs[0])
    later = [t for v in vocabs[1:] for t, _ in sorted(v.items(), key=lambda kv: kv[1]) if t not in out]
    for t in [t for t in later if t not in added] + [t for t in later if t in added]:
        out.setdefault(t, len(out))
    return out


def permuted(vocabs: list[dict], xs: list, out_vocab: dict[str, int], rows: int) -> list:
    """mergekit's PermutedEmbeddings with base_model = the first input: a model's own row where
    it has the token; else the donor's row when only one model has it, the base's when the base
    has it, the mean of those that have it otherwise."""
    xs = [x.double() for x in xs]
    out = []
    for i, x in enumerate(xs):
        y = torch.zeros(rows, x.shape[1], dtype=torch.float64)
        for t, r in out_vocab.items():
            present = [j for j, v in enumerate(vocabs) if t in v]
            if t in vocabs[i]:
                y[r] = x[vocabs[i][t]]
            elif len(present) == 1:
                y[r] = xs[present[0]][vocabs[present[0]][t]]
            elif 0 in present:
                y[r] = xs[0][vocabs[0][t]]
            else:
                y[r] = torch.stack([xs[j][vocabs[j][t]] for j in present]).mean(0)
        out.append(y)
    return out


def soup(xs: list, weights: list[float]):
    return sum(w * x for w, x in zip(weights, xs)) / sum(weights)


# --- union ----------------------------------------------------------------------------------
def test_union_rows_tokenizer_and_config(trio):
    root, models, vocabs = trio
    write(root, "abc", """
        [merges.m]
        method = "soup"
        inputs = ["a", "b", "c"]
        weights = [0.5, 0.3, 0.2]
        vocab = "union"
        output = "out/m"
    """)
    doc = build_json(cwd=root)
    assert doc["merges"]["m"]["computed"] == doc["merges"]["m"]["tensors"]
    out = root / "out/m"
    order = [vocabs[n] for n in "abc"]
    expected = union_vocab(order, set(ADDED["b"]))
    got = vocab_of(out)
    assert got == expected  # base ids kept; b's new words, c's new words, then <|im_start|>
    assert got["<|im_start|>"] == len(expected) - 1
    enc = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode("birds fly fish <|im_start|> cat")
    assert enc.ids == [expected[t] for t in ("birds", "fly", "fish", "<|im_start|>", "cat")]
    result = load_file(str(out / "model.safetensors"))
    for key in (EMBED, HEAD):
        ref = soup(permuted(order, [models[n][key] for n in "abc"], expected, len(expected)), [0.5, 0.3, 0.2])
        assert result[key].shape == (len(expected), 16)
        torch.testing.assert_close(result[key].double(), ref, rtol=0, atol=1e-6)
    # a token only b has is b's row; one only c has is c's; one all have is the weighted mean
    emb = result[EMBED].double()
    torch.testing.assert_close(emb[expected["birds"]], models["b"][EMBED][vocabs["b"]["birds"]].double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[expected["swim"]], models["c"][EMBED][vocabs["c"]["swim"]].double(), atol=1e-6, rtol=0)
    shared = soup([models[n][EMBED][vocabs[n]["the"]].double() for n in "abc"], [0.5, 0.3, 0.2])
    torch.testing.assert_close(emb[expected["the"]], shared, atol=1e-6, rtol=0)
    # "log" is in b and c, not a: a's row for it is their mean (mergekit's average)
    log = [models[n][EMBED][vocabs[n]["log"]].double() for n in "bc"]
    torch.testing.assert_close(emb[expected["log"]], soup([(log[0] + log[1]) / 2, *log], [0.5, 0.3, 0.2]),
                               atol=1e-6, rtol=0)
    layer = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(result[layer].double(), soup([models[n][layer].double() for n in "abc"],
                                                            [0.5, 0.3, 0.2]), atol=1e-6, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(expected) and config["from"] == "a"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["from"] == "a"
    assert tok_config["added_tokens_decoder"][str(expected["<|im_start|>"])]["content"] == "<|im_start|>"
    assert tok_config["added_tokens_decoder"][str(expected["birds"])]["special"] is False
    assert json.loads((out / "special_tokens_map.json").read_text())["from"] == "a"
    again = build_json(cwd=root)
    assert again["merges"]["m"]["computed"] == 0


def test_a_changed_tokenizer_recomputes_the_vocabulary_rows_only(trio):
    root, models, vocabs = trio
    write(root, "abc", """
        [merges.m]
        method = "soup"
        inputs = ["a", "b", "c"]
        vocab = "union"
        output = "out/m"
    """)
    build_json(cwd=root)
    # c numbers two words only it has the other way round: the union numbers them so too, and
    # each keeps its row: the tensors are the same, only the tokenizer changes
    swap_ids(root / "c/tokenizer.json", "fish", "swim")
    doc = build_json(cwd=root)
    assert doc["merges"]["m"]["computed"] == 0
    assert vocab_of(root / "out/m") == union_vocab([vocabs["a"], vocabs["b"], vocab_of(root / "c")], set(ADDED["b"]))
    # c numbers two words a has too the other way round: their rows move
    swap_ids(root / "c/tokenizer.json", "cat", "ran")
    doc = build_json(cwd=root)
    assert doc["merges"]["m"]["computed"] == 2  # embed_tokens and lm_head; every other tensor is cached
    order = [vocabs["a"], vocabs["b"], vocab_of(root / "c")]
    expected = union_vocab(order, set(ADDED["b"]))
    result = load_file(str(root / "out/m/model.safetensors"))
    ref = soup(permuted(order, [models[n][EMBED] for n in "abc"], expected, len(expected)), [1, 1, 1])
    torch.testing.assert_close(result[EMBED].double(), ref, rtol=0, atol=1e-6)
    # a change to the first input's tokenizer_config.json alone: the output is rewritten, nothing recomputed
    config = root / "a/tokenizer_config.json"
    config.write_text(config.read_text().replace('"from": "a"', '"from": "a, edited"'))
    doc = build_json(cwd=root)
    assert doc["merges"]["m"]["computed"] == 0
    assert "edited" in (root / "out/m/tokenizer_config.json").read_text()


# --- base -----------------------------------------------------------------------------------
def test_base_keeps_the_first_vocabulary(trio):
    root, models, vocabs = trio
    write(root, "ab", """
        [merges.m]
        method = "task_arithmetic"
        inputs = ["a", "b"]
        weights = [0.7]
        lambda = 1.0
        vocab = "base"
        output = "out/m"
    """)
    build_json(cwd=root)
    out = root / "out/m"
    order = [vocabs["a"], vocabs["b"]]
    base, other = permuted(order, [models[n][EMBED] for n in "ab"], vocabs["a"], len(vocabs["a"]))
    result = load_file(str(out / "model.safetensors"))
    assert result[EMBED].shape == models["a"][EMBED].shape
    torch.testing.assert_close(result[EMBED].double(), base + 0.7 * (other - base), rtol=0, atol=1e-6)
    # "mat" is a's alone: b's row for it is a's, so the delta is zero
    torch.testing.assert_close(result[EMBED][vocabs["a"]["mat"]], models["a"][EMBED][vocabs["a"]["mat"]])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert (out / name).read_bytes() == (root / "a" / name).read_bytes(), name


def test_tokenizer_source_names_the_vocabulary_and_its_files(trio):
    root, models, vocabs = trio
    write(root, "ab", """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.25
        tokenizer_source = "b"
        output = "out/m"
    """)
    build_json(cwd=root)
    out = root / "out/m"
    order = [vocabs["a"], vocabs["b"]]
    xa, xb = permuted(order, [models[n][HEAD] for n in "ab"], vocabs["b"], len(vocabs["b"]))
    result = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(result[HEAD].double(), 0.75 * xa + 0.25 * xb, rtol=0, atol=1e-6)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (root / "b" / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["from"] == "a" and config["vocab_size"] == len(vocabs["b"])


# --- truncate -------------------------------------------------------------------------------
def test_truncate_keeps_the_first_rows_by_index(tmp_path):
    a = model_folder(tmp_path / "a", "a", 1, extra_rows=3)  # padded past its tokens
    b = model_folder(tmp_path / "b", "b", 2, tokenizer=False)
    rows = min(a[EMBED].shape[0], b[EMBED].shape[0])
    assert a[EMBED].shape[0] != b[EMBED].shape[0]
    write(tmp_path, "ab", """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        vocab = "truncate"
        output = "out/m"
    """)
    build_json(cwd=tmp_path)
    out = tmp_path / "out/m"
    result = load_file(str(out / "model.safetensors"))
    for key in (EMBED, HEAD):
        assert result[key].shape == (rows, 16)
        torch.testing.assert_close(result[key], 0.5 * a[key][:rows] + 0.5 * b[key][:rows])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "a/tokenizer.json").read_bytes()


def test_union_through_a_merge_without_an_output(trio):
    root, models, vocabs = trio
    write(root, "abc", """
        [merges.ab]
        method = "soup"
        inputs = ["a", "b"]
        vocab = "union"
        [merges.abc]
        method = "soup"
        inputs = ["ab", "c"]
        vocab = "union"
        output = "out/abc"
    """)
    build_json(cwd=root)
    out = root / "out/abc"
    ab = union_vocab([vocabs["a"], vocabs["b"]], set(ADDED["b"]))
    expected = union_vocab([ab, vocabs["c"]], set())
    assert vocab_of(out) == expected
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(expected)
    ab_rows = soup(permuted([vocabs["a"], vocabs["b"]], [models[n][EMBED] for n in "ab"], ab, len(ab)), [1, 1])
    ref = soup(permuted([ab, vocabs["c"]], [ab_rows, models["c"][EMBED]], expected, len(expected)), [1, 1])
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[EMBED].double(), ref, rtol=0, atol=1e-6)


# --- errors: one line, exit 2 ---------------------------------------------------------------
def one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_sizes_that_differ_without_vocab_are_a_shape_error_naming_the_setting(trio):
    root, _, _ = trio
    write(root, "ab", """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m"
    """)
    one_line_error(run_cli(cwd=root), "shapes differ", "vocab = \"base\", \"union\" or \"truncate\"")
    assert not (root / "out").exists()


def test_a_tokenizer_json_that_is_not_json(trio):
    root, _, _ = trio
    (root / "b/tokenizer.json").write_text("{ this is not json")
    write(root, "ab", """
        [merges.m]
        method = "soup"
        inputs = ["a", "b"]
        vocab = "union"
        output = "out/m"
    """)
    one_line_error(run_cli(cwd=root), "b/tokenizer.json", "not a tokenizer.json")
    assert not (root / "out").exists()


def test_union_with_an_input_without_a_tokenizer(tmp_path):
    model_folder(tmp_path / "a", "a", 1)
    model_folder(tmp_path / "b", "b", 2, tokenizer=False)
    write(tmp_path, "ab", """
        [merges.m]
        method = "soup"
        inputs = ["a", "b"]
        vocab = "union"
        output = "out/m"
    """)
    one_line_error(run_cli(cwd=tmp_path), "[merges.m] vocab = 'union': b:", "has no tokenizer.json",
                   "vocab = \"truncate\"")
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_without_a_tokenizer(tmp_path):
    model_folder(tmp_path / "a", "a", 1)
    model_folder(tmp_path / "b", "b", 2, tokenizer=False)
    write(tmp_path, "ab", """
        [merges.m]
        method = "soup"
        inputs = ["a", "b"]
        vocab = "truncate"
        tokenizer_source = "b"
        output = "out/m"
    """)
    one_line_error(run_cli(cwd=tmp_path), "[merges.m] tokenizer_source = 'b':", "has no tokenizer.json")


@pytest.mark.parametrize("fields, fragments", [
    ('vocab = "everything"', ["[merges.m] vocab", "'base' | 'union' | 'truncate'"]),
    ('tokenizer_source = "nosuch"', ["[merges.m] tokenizer_source", "one of the inputs ('a', 'b')"]),
    ('vocab = "base"\ntokenizer_source = "union"', ["[merges.m] tokenizer_source", "vocab = \"union\""]),
    ('vocab = "union"\ntokenizer_source = "b"', ["[merges.m] tokenizer_source", "leave tokenizer_source out"]),
    ('method = "lora"\nvocab = "union"', ["[merges.m] vocab", "lora does not merge tensors key by key"]),
])
def test_vocab_fields_are_checked_when_the_mergefile_is_read(trio, fields, fragments):
    root, _, _ = trio
    method = "" if "method" in fields else 'method = "soup"\n'
    mergefile(root / "mergefile.toml", models_toml("a", "b") + f"""
[merges.m]
{method}inputs = ["a", "b"]
output = "out/m"
{fields}
""")
    one_line_error(run_cli(cwd=root), *fragments)
