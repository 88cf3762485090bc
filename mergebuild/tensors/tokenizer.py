"""Tokenizers of Hugging Face model folders, read as data: which row of the embedding each token
string has, and the files an output folder gets (vocab = / tokenizer_source =, docs/methods.md).

tokenizer.json is read as JSON (no tokenizers package at run time): the model's vocab (BPE,
WordPiece, WordLevel: an object of token -> id; Unigram: a list of [piece, score], the id its
place) and the added tokens. A union tokenizer is the first one with the new tokens appended
as added tokens, numbered as the tokenizers package numbers them, as mergekit's union does
(`add_tokens` on a copy of the base tokenizer).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import xxhash

from mergebuild.errors import InputError

TOKENIZER_JSON = "tokenizer.json"
# the files that make a tokenizer (mergekit's _copy_tokenizer list, with the slow tokenizers' vocab files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
MAX_ID = 2**31 - 1
ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Vocabulary:
    """A tokenizer as far as merging cares: token string -> id, which tokens are added ones, and
    its files (name -> bytes; made on first use for a union)."""

    def __init__(self, tokens: dict[str, int], added: dict[str, dict], model_size: int, where: str,
                 files: dict[str, bytes] | None = None, make_files: Callable[[], dict[str, bytes]] | None = None):
        self.tokens, self.added, self.model_size, self.where = tokens, added, model_size, where
        self._files, self._make_files = files, make_files

    def files(self) -> dict[str, bytes]:
        if self._files is None:
            self._files = self._make_files()
        return self._files

    def by_id(self) -> list[tuple[int, str]]:
        """(id, token) in id order (ties by token: one order on every machine)."""
        return sorted((i, t) for t, i in self.tokens.items())

    def next_id(self) -> int:
        """The id the tokenizers package gives the next added token."""
        return max(self.model_size, max(self.tokens.values(), default=-1) + 1)


def files_digest(files: dict[str, bytes]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()


def read_vocabulary(folder: Path) -> Vocabulary | None:
    """The tokenizer of a model folder; None when it has no tokenizer.json."""
    folder = Path(folder)
    stamps = []
    for name in TOKENIZER_FILES:
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        stamps.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    if not any(s[0] == TOKENIZER_JSON for s in stamps):
        return None
    return _read(str(folder), tuple(stamps))


@lru_cache(maxsize=16)
def _read(folder: str, stamps: tuple) -> Vocabulary:
    files = {}
    for name, *_ in stamps:
        try:
            files[name] = (Path(folder) / name).read_bytes()
        except OSError as e:
            raise InputError(f"{Path(folder) / name}: cannot read: {e.strerror or e}") from None
    where = str(Path(folder) / TOKENIZER_JSON)
    tokens, added, model_size = parse_tokenizer(files[TOKENIZER_JSON], where)
    return Vocabulary(tokens, added, model_size, where, files=files)


def parse_tokenizer(data: bytes, where: str) -> tuple[dict[str, int], dict[str, dict], int]:
    """(token -> id, added token -> its entry, size of the model's own vocab) of a tokenizer.json."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where}: not a tokenizer.json: not JSON ({_short(e)})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    tokens: dict[str, int] = {}
    if isinstance(vocab, dict):
        ids = vocab.values()
        if not all(type(i) is int for i in ids) or (vocab and (min(ids) < 0 or max(ids) > MAX_ID)):
            token, i = next((t, i) for t, i in vocab.items() if not _is_id(i))
            raise InputError(f"{where}: not a tokenizer.json: model.vocab[{token[:40]!r}] is {str(i)[:40]}, "
                             "not a token id")
        tokens = dict(vocab)
    elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                raise InputError(f"{where}: not a tokenizer.json: model.vocab[{i}] is not a [piece, score] pair")
            tokens.setdefault(entry[0], i)
    else:
        raise InputError(f"{where}: not a tokenizer.json: it has no model.vocab (a tokenizer the tokenizers "
                         "package wrote has one)")
    model_size = len(vocab)
    added: dict[str, dict] = {}
    entries = doc.get("added_tokens") or []
    if not isinstance(entries, list):
        raise InputError(f"{where}: not a tokenizer.json: added_tokens is not a list")
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and _is_id(entry.get("id"))):
            raise InputError(f"{where}: not a tokenizer.json: added_tokens[{n}] has no content and id")
        tokens.setdefault(entry["content"], entry["id"])
        added.setdefault(entry["content"], entry)
    return tokens, added, model_size


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def union_files(base: Vocabulary, new: list[tuple[str, int, dict | None]]) -> dict[str, bytes]:
    """The base tokenizer's files with `new` (token, id, the added-token entry it had, if any)
    appended as added tokens: in tokenizer.json, and in tokenizer_config.json's
    added_tokens_decoder and added_tokens.json where the base has them (slow tokenizers read those)."""
    files = dict(base.files())
    entries = []
    for token, i, info in new:
        entry = {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": True, "special": False}
        if info:
            entry.update({k: info[k] for k in ADDED_FLAGS if isinstance(info.get(k), bool)})
        entries.append(entry)
    doc = json.loads(files[TOKENIZER_JSON])
    doc["added_tokens"] = list(doc.get("added_tokens") or []) + entries
    files[TOKENIZER_JSON] = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    config = _json_object(files.get("tokenizer_config.json"))
    if config is not None:
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for e in entries:
                decoder[str(e["id"])] = {k: e[k] for k in ("content", *ADDED_FLAGS)}
            files["tokenizer_config.json"] = (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode()
    added = _json_object(files.get("added_tokens.json"))
    if added is not None:
        added.update({e["content"]: e["id"] for e in entries})
        files["added_tokens.json"] = (json.dumps(added, ensure_ascii=False, indent=2) + "\n").encode()
    return files


def with_vocab_size(config: dict | None, rows: int) -> dict | None:
    """A copy of config.json with vocab_size (top level, and text_config's where it has one) set to
    `rows`; None when it says so already, or there is no config."""
    if config is None:
        return None
    doc = json.loads(json.dumps(config))
    holders = [h for h in (doc, doc.get("text_config")) if isinstance(h, dict) and "vocab_size" in h] or [doc]
    if all(h.get("vocab_size") == rows for h in holders):
        return None
    for h in holders:
        h["vocab_size"] = rows
    return doc


def _json_object(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
