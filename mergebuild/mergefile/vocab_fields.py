"""A merge's `vocab` and `tokenizer_source` fields, checked as the Mergefile is read
(what they do: planning/vocab.py, docs/methods.md "Vocabularies")."""

from __future__ import annotations

from mergebuild.errors import MergefileError

VOCAB_MODES = ("base", "union", "truncate")
SOURCE_WORDS = ("base", "union")


def vocab_fields(path, where: str, table: dict, inputs: list[str], method) -> tuple[str | None, str | None]:
    """(vocab, tokenizer_source) of a merge table, each None when not set."""
    vocab, source = table.get("vocab"), table.get("tokenizer_source")
    if (vocab is not None or source is not None) and (method.plan_tasks is not None or not method.merges_tensors):
        raise MergefileError(path, where, "vocab" if vocab is not None else "tokenizer_source",
                             f"{method.name} does not merge tensors key by key: it has no vocabulary rows to align")
    if vocab is not None and vocab not in VOCAB_MODES:
        raise MergefileError(path, where, "vocab", f"expected {' | '.join(map(repr, VOCAB_MODES))}, got {vocab!r}")
    if source is not None and (not isinstance(source, str) or (source not in SOURCE_WORDS and source not in inputs)):
        names = ", ".join(repr(i) for i in inputs)
        raise MergefileError(path, where, "tokenizer_source", f"expected 'base', 'union' or one of the inputs "
                             f"({names}), got {source!r}")
    if source == "union" and vocab not in (None, "union"):
        raise MergefileError(path, where, "tokenizer_source", f"'union' is the tokenizer of vocab = \"union\"; "
                             f"with vocab = {vocab!r} set tokenizer_source to 'base' or an input")
    if vocab == "union" and source not in (None, "union"):
        raise MergefileError(path, where, "tokenizer_source", "vocab = \"union\" writes the union's tokenizer: leave "
                             "tokenizer_source out, or set it to 'union'")
    return vocab, source
