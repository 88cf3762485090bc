"""The fields of an imported mergekit merge that are not its method's parameters: the output's
dtype, and its vocabulary (mergekit's `tokenizer_source`, or the `tokenizer:` block's `source`).

mergekit builds one output tokenizer (mergekit/tokenizer/build.py) and puts every model's
embedding and lm_head rows in its order before merging (tokenizer/embed.py): "base" is the
base_model's vocabulary, "union" every model's tokens, a model reference that model's. A
Mergefile says the same with a merge's `vocab` and `tokenizer_source` (docs/methods.md,
"Vocabularies"); what has no form there (added `tokens`, `pad_to_multiple_of`, a chat template)
is listed.
"""

from __future__ import annotations

from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, Unexpressible, Value
from mergebuild.record.foreign.mergekit_read import parse_ref

DTYPES = ("float16", "bfloat16", "float32")
TOKENIZER_FIELDS = ("source", "tokens", "pad_to_multiple_of")
COPIES = ("copy", "passthrough")  # mergebuild methods that copy rows: no vocabulary to align
KEPT = " (the rows are merged as they are: the same when the models share a vocabulary)"


def dtype(doc: dict, label: str, fields: dict, draft: Draft) -> None:
    """`dtype` (the output's) from out_dtype, else dtype; mergekit also computes in dtype."""
    compute = doc.get("dtype")
    out = doc.get("out_dtype") or compute
    if out is None:
        return
    name = str(out).removeprefix("torch.")
    if name not in DTYPES:
        _once(draft.unexpressed, f"{label}: dtype {out!r}: not one of {', '.join(DTYPES)}; left out")
        return
    fields["dtype"] = Value(name, "out_dtype" if doc.get("out_dtype") else "dtype")
    if compute is not None and str(compute).removeprefix("torch.") != "float32":
        _once(draft.differences, f"{label}: mergekit computes in {compute} (dtype); mergebuild computes in "
                                 "[settings] compute_dtype (float32) and rounds once, at the end: the last bits differ")


def tokenizer_source(doc: dict, label: str, draft: Draft):
    """The vocabulary the config asks for: None, "base", "union" or a model reference; what the
    `tokenizer:` block and `chat_template` hold besides is listed as not expressible."""
    if doc.get("chat_template") is not None:
        _once(draft.unexpressed, f"{label}: chat_template: no Mergefile form (a folder output gets the tokenizer "
                                 "files of its vocabulary's owner, chat template included, as they are)")
    source, block = doc.get("tokenizer_source"), doc.get("tokenizer")
    if block is None:
        return source
    if source is not None:
        raise Unexpressible("tokenizer_source and tokenizer: both set (mergekit refuses it)")
    if not isinstance(block, dict):
        raise Unexpressible("tokenizer: not a mapping")
    for key in block:
        if key not in TOKENIZER_FIELDS:
            _once(draft.unexpressed, f"{label}: tokenizer.{key}: not a field of mergekit's tokenizer; ignored")
    if block.get("tokens"):
        names = ", ".join(repr(t) for t in list(block["tokens"])[:5]) if isinstance(block["tokens"], dict) else ""
        _once(draft.unexpressed, f"{label}: tokenizer.tokens ({names}): added tokens and the rows they take (source, "
                                 "force) have no Mergefile form; left out")
    if block.get("pad_to_multiple_of"):
        _once(draft.unexpressed, f"{label}: tokenizer.pad_to_multiple_of: no Mergefile form (mergebuild keeps the "
                                 "owner's padding rows, mergekit pads with the mean embedding); left out")
    return block.get("source", "union")  # mergekit's default for a tokenizer: block


def vocabulary(source, label: str, draft: Draft, method: str, base, inputs: list, names: list[str],
               fields: dict) -> None:
    """`vocab` / `tokenizer_source` on a merge of `inputs` (mergekit references, in the merge's
    order, named `names`) made with mergebuild's `method`."""
    if source is None:
        return
    shown = source if isinstance(source, str) else str(source)
    if method in COPIES:
        _once(draft.unexpressed, f"{label}: tokenizer_source {shown}: mergebuild's {method} copies each tensor as it "
                                 "is, so its rows keep their own model's order (the same as mergekit's only when the "
                                 "models share a vocabulary); left out")
        return
    if source == "union":
        fields["vocab"] = Value("union", "tokenizer_source: union (every model's tokens)")
        _once(draft.differences, f"{label}: tokenizer_source union: mergekit numbers the new tokens as its "
                                 "tokenizers' get_vocab() iterates, mergebuild each model's in id order")
        _row_rule(label, draft, base, inputs)
        return
    if source == "base":
        if base is None:
            fields["vocab"] = Value("base", "tokenizer_source: base, and no base_model: the first input's")
            _once(draft.differences, f"{label}: tokenizer_source base without a base_model: mergekit takes the "
                                     "vocabulary of the first model of an unordered set, mergebuild the first input's")
        elif base in inputs and inputs.index(base) == 0:
            fields["vocab"] = Value("base", "tokenizer_source: base (the base_model's vocabulary)")
        elif base in inputs:
            fields["tokenizer_source"] = Value(names[inputs.index(base)], "tokenizer_source: base (the base_model's)")
        else:
            _once(draft.unexpressed, f"{label}: tokenizer_source base: the base_model {base} is not merged here; "
                                     f"left out{KEPT}")
            return
        _row_rule(label, draft, base, inputs)
        return
    try:
        ref = parse_ref(source, f"{label} tokenizer_source")
    except InputError as e:
        raise Unexpressible(str(e).split(": ", 1)[-1]) from None
    if ref not in inputs:
        _once(draft.unexpressed, f"{label}: tokenizer_source {ref}: not one of the models merged here (mergebuild's "
                                 f"tokenizer_source names an input); left out{KEPT}")
        return
    fields["tokenizer_source"] = Value(names[inputs.index(ref)], f"tokenizer_source: {ref} (its vocabulary)")
    _row_rule(label, draft, base, inputs)


def _row_rule(label: str, draft: Draft, base, inputs: list) -> None:
    if base is None or not inputs or inputs[0] != base:
        _once(draft.differences, f"{label}: a token some models lack gets the first input's row in mergebuild, "
                                 "the base_model's in mergekit (without one, the mean of the models that have it)")


def _once(items: list, text: str) -> None:
    if text not in items:
        items.append(text)
