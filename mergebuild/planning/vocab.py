"""Vocabularies of different sizes: a merge's `vocab` and `tokenizer_source` (docs/methods.md).

The output has one vocabulary: the first input's (vocab = "base"), the union of the inputs'
(vocab = "union": the first input's tokens at their ids, then each later input's new tokens
in id order, regular ones before added ones, as mergekit's union orders them), a named input's
(tokenizer_source = NAME alone: mergekit's rule), or the first rows by index of every input
(vocab = "truncate"). The embedding and lm_head rows of every input are put in that order
before the method runs (methods/vocab_rows.py), with mergekit's rule for a token an input
lacks: the first input's row when it has the token, else the mean of the rows of the inputs
that have it (one input: that input's row). A row no token uses keeps the owner's row.

Token strings come from each input's tokenizer.json (tensors/tokenizer.py); a merge's are those
of its output. The row mapping is digested into each aligned tensor's parameters, so a changed
tokenizer recomputes exactly the rows that depend on it; the tokenizer files' digests join the
merge's recipe node, so an output whose tokenizer files change is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from mergebuild.dtypes import is_float
from mergebuild.errors import InputError, MergefileError
from mergebuild.methods.vocab_rows import PARAM, Rows, aligned
from mergebuild.tensors.tokenizer import (TOKENIZER_FILES, Vocabulary, files_digest, read_vocabulary, union_files,
                                          with_vocab_size)

VOCAB_COMPONENTS = ("embeddings", "lm_head")  # the architecture files' names of the vocabulary matrices
# names of vocabulary matrices in the families people merge (Llama's, GPT-2's, BERT's, GPT-NeoX's, Meta's)
VOCAB_NAMES = {"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "tok_embeddings"}


@dataclass
class VocabPlan:
    mode: str  # "base", "union", "truncate", or "input" (tokenizer_source = NAME without vocab)
    owner: int | None  # the input whose vocabulary the output has (union: 0, whose rows it starts from)
    rows: int  # rows of the output's vocabulary matrices
    keys: dict[str, tuple] = field(default_factory=dict)  # key -> (inputs, Rows, its digest): the rows that move
    out: Vocabulary | None = None  # the output's tokenizer (what a later merge reads as this one's)
    files_from: Vocabulary | None = None  # the tokenizer files an output folder gets
    tokenizers: dict[str, str] = field(default_factory=dict)  # source model -> digest of its tokenizer files


def plan_vocab(ctx, method, names: list[str]) -> VocabPlan | None:
    """The vocabulary of a merge that sets vocab or tokenizer_source; None for the others."""
    spec, plan = ctx.spec, ctx.plan
    if spec.vocab is None and spec.tokenizer_source is None:
        return None
    if method.plan_tasks is not None or not method.merges_tensors:
        raise MergefileError(plan.mergefile.path, f"merges.{spec.name}", "vocab" if spec.vocab else "tokenizer_source",
                             f"{spec.method} does not merge tensors key by key: it has no vocabulary rows to align")
    mode, owner = _mode(spec)
    keys = vocab_keys(ctx, names)
    in_rows = _input_rows(ctx, keys)
    found = [_vocabulary(plan, node) for node in spec.inputs]
    own = [v for v, _ in found]  # each input's own tokenizer (None: it has none)
    vp = VocabPlan(mode, owner, 0)
    vp.tokenizers = {source: files_digest(v.files())[:16] for v, source in found if source is not None and v is not None}
    if not keys:
        ctx.warn(f"vocab / tokenizer_source: {spec.inputs[0]} has no embedding or lm_head matrix; no rows to align")
    if mode == "truncate" or not keys:
        vp.rows = min((r for r in in_rows if r), default=0)
        maps = None
    else:
        vocabs = _borrow(ctx, owner, own, in_rows)
        maps = [{t: i for t, i in v.tokens.items() if i < r} for v, r in zip(vocabs, in_rows)]
        if mode == "union":
            vp.out, vp.rows, new = _union(vocabs, maps, in_rows)
            ctx.note(f"vocab = \"union\": {vp.rows} rows, {new} token{'' if new == 1 else 's'} added to "
                     f"{spec.inputs[0]}'s")
        else:
            vp.out, vp.rows = vocabs[owner], in_rows[owner]
    vp.files_from = _files_from(ctx, vp, own)
    if vp.out is None:
        vp.out = vp.files_from if vp.files_from is not None else own[0]
    if mode == "truncate":  # rows by index: only the tokenizer the output gets counts
        vp.tokenizers = {s: vp.tokenizers[s] for v, s in found if s in vp.tokenizers and v is vp.files_from}
    made: dict[tuple, tuple | None] = {}  # by the inputs that have the key: embed_tokens and lm_head share one
    for name in keys:
        positions = tuple(i for i, node in enumerate(spec.inputs) if name in plan.tensor_names(node))
        if positions not in made:
            rows_in = [in_rows[i] for i in positions]
            rows = _truncated(vp.rows, positions) if maps is None else \
                _aligned(ctx, name, vp, positions, [maps[i] for i in positions], rows_in)
            made[positions] = None if _identity(rows, rows_in) else (positions, rows, digest(rows))
        if made[positions] is not None:
            vp.keys[name] = made[positions]
    _check_files(ctx, vp)
    if vp.rows:
        config = with_vocab_size(ctx.input_config(0), vp.rows)
        if config is not None:
            ctx.config = config  # an output folder's config.json (MergePlan.config)
    return vp


def _mode(spec) -> tuple[str, int | None]:
    if spec.vocab == "base":
        return "base", 0
    if spec.vocab in ("union", "truncate"):
        return spec.vocab, 0 if spec.vocab == "union" else None
    source = spec.tokenizer_source
    if source == "union":
        return "union", 0
    if source == "base" or source == spec.inputs[0]:
        return "base", 0
    return "input", spec.inputs.index(source)


def vocab_keys(ctx, names: list[str]) -> list[str]:
    """The first input's vocabulary matrices: the 2-D float keys of the architecture's
    embeddings and lm_head components (or named as VOCAB_NAMES: embed_tokens, lm_head, ...)
    with the most rows among them, so position and token-type embeddings are left alone."""
    plan, node = ctx.plan, ctx.spec.inputs[0]
    arch = ctx.arch
    by_component = any(c in arch.components for c in VOCAB_COMPONENTS)

    def is_vocab(name: str) -> bool:
        if by_component and arch.component_of(name) in VOCAB_COMPONENTS:
            return True
        return bool(set(name.split(".")) & VOCAB_NAMES)

    candidates = []
    for name in names:
        ref = plan.ref(node, name)
        if len(ref.shape) == 2 and is_float(ref.dtype) and is_vocab(name):
            candidates.append((name, ref.shape[0]))
    most = max((r for _, r in candidates), default=0)
    return sorted(n for n, r in candidates if r == most)


def _input_rows(ctx, keys: list[str]) -> list[int]:
    """Each input's vocabulary rows (the same in all its vocabulary matrices, which must agree
    with the first input's beyond the rows)."""
    plan, spec = ctx.plan, ctx.spec
    out = []
    for node in spec.inputs:
        rows = set()
        for name in keys:
            if name not in plan.tensor_names(node):
                continue
            a, ref = plan.ref(spec.inputs[0], name).shape, plan.ref(node, name).shape
            if len(ref) != len(a) or ref[1:] != a[1:]:
                raise InputError(f"[merges.{spec.name}] key {name!r}: shapes differ beyond the vocabulary rows: "
                                 f"{spec.inputs[0]} {list(a)} vs {node} {list(ref)}")
            rows.add(ref[0])
        if len(rows) > 1:
            raise InputError(f"[merges.{spec.name}] {node}: its vocabulary matrices have different row counts "
                             f"({', '.join(map(str, sorted(rows)))}) ({', '.join(keys)})")
        out.append(rows.pop() if rows else 0)
    return out


def _vocabulary(plan, node: str) -> tuple[Vocabulary | None, str | None]:
    """The tokenizer of a node's output and the source model it was read from (None: a merge's
    own, already part of that merge's identity)."""
    while node in plan.merges:
        merge = plan.merges[node]
        vp = getattr(merge, "vocab", None)
        if vp is not None:
            return vp.out, None
        node = merge.spec.inputs[0]
    path = plan.sources[node].path
    return (read_vocabulary(path) if path.is_dir() else None), node


def _what(plan, node: str) -> str:
    while node in plan.merges:
        node = plan.merges[node].spec.inputs[0]
    path = plan.sources[node].path
    return f"{path} is one file, with no tokenizer.json beside it" if not path.is_dir() else \
        f"{path} has no tokenizer.json"


def _borrow(ctx, owner: int, vocabs: list, in_rows: list[int]) -> list[Vocabulary]:
    """An input without a tokenizer is taken to have the first input's vocabulary when their
    rows agree (mergekit assumes the base's for a tokenizer it cannot load); else it cannot be
    matched by token."""
    spec, plan = ctx.spec, ctx.plan
    label = f"vocab = {spec.vocab!r}" if spec.vocab else f"tokenizer_source = {spec.tokenizer_source!r}"
    out = list(vocabs)
    if out[0] is None and out[owner] is not None and in_rows[0] == in_rows[owner]:
        out[0] = out[owner]
    for i, v in enumerate(out):
        if v is not None:
            continue
        if i > 0 and out[0] is not None and in_rows[i] == in_rows[0]:
            out[i] = out[0]
            continue
        node = spec.inputs[i]
        rows = f"its {in_rows[i]} rows" + (f" (against {spec.inputs[0]}'s {in_rows[0]})" if i else "")
        raise InputError(f"[merges.{spec.name}] {label}: {node}: {_what(plan, node)}, so {rows} cannot be matched "
                         f"by token (give it a tokenizer.json, or set vocab = \"truncate\" to keep the first "
                         f"{min(r for r in in_rows if r)} rows of every input by index)")
    return out


def _union(vocabs: list[Vocabulary], maps: list[dict], in_rows: list[int]) -> tuple[Vocabulary, int, int]:
    """The first input's tokenizer with every later input's new tokens added (mergekit's
    build_union_tokenizer: regular tokens first, then added ones, inputs in order; mergebuild
    takes each input's tokens in id order). Its rows, and how many tokens were added."""
    base = vocabs[0]
    regular, added, seen = [], [], set(base.tokens)
    for v, m in zip(vocabs[1:], maps[1:]):
        for i, t in sorted((i, t) for t, i in m.items()):
            if t not in seen:
                seen.add(t)
                (added if t in v.added else regular).append((t, v.added.get(t)))
    new, next_id = [], base.next_id()
    for t, info in regular + added:
        new.append((t, next_id, info))
        next_id += 1
    tokens = dict(base.tokens)
    tokens.update({t: i for t, i, _ in new})
    out_added = dict(base.added)
    out_added.update({t: {**(info or {}), "id": i, "content": t} for t, i, info in new if info})
    rows = max(in_rows[0], next_id if new else 0)
    out = Vocabulary(tokens, out_added, base.model_size, f"the union of {base.where} and the other inputs' tokens",
                     make_files=(lambda: union_files(base, new)) if new else base.files)
    return out, rows, len(new)


def _aligned(ctx, name: str, vp: VocabPlan, positions: tuple[int, ...], maps: list[dict],
             in_rows: list[int]) -> Rows:
    """Where each output row of each input (at `positions`; the first is input 0) comes from."""
    import numpy as np  # in the functions, not at the top: a no-op build never imports numpy
    if vp.owner not in positions:
        raise InputError(f"[merges.{ctx.spec.name}] key {name!r} is not in {ctx.spec.inputs[vp.owner]}, whose "
                         "vocabulary the output has: its rows have no source")
    by_row: list[str | None] = [None] * vp.rows
    for i, t in vp.out.by_id():
        if i < vp.rows and by_row[i] is None:
            by_row[i] = t
    owner = positions.index(vp.owner)
    src = np.array([[m.get(t, -1) for t in by_row] for m in maps], dtype=np.int64).reshape(len(maps), vp.rows)
    none = (src < 0).all(axis=0)  # rows no input has a token for: the owner's row (zero past its rows)
    unsourced = int(sum(1 for r in np.flatnonzero(none) if by_row[r] is not None))
    own = none & (np.arange(vp.rows) < in_rows[owner])
    src[owner, own] = np.flatnonzero(own)
    fill_rows = np.flatnonzero((src < 0).any(axis=0))
    contrib = src[:, fill_rows].copy()
    contrib[1:, contrib[0] >= 0] = -1  # the first input's row where it has the token, else the mean
    if unsourced:
        ctx.warn(f"{name}: {unsourced} token{'s have' if unsourced > 1 else ' has'} a row in no input that has "
                 "this key: kept as the first input's row where it has one, else zero (mergekit's zero embedding)")
    return Rows(vp.rows, src, fill_rows, contrib)


def _truncated(rows: int, positions: tuple[int, ...]) -> Rows:
    import numpy as np
    keep = np.arange(rows, dtype=np.int64)
    return Rows(rows, np.stack([keep] * len(positions)), keep[:0], np.zeros((len(positions), 0), dtype=np.int64))


def _identity(rows: Rows, in_rows: list[int]) -> bool:
    import numpy as np
    src, fill, _ = rows.arrays()
    return not len(fill) and all(r == rows.rows for r in in_rows) and bool((src == np.arange(rows.rows)).all())


def digest(rows: Rows) -> str:
    import numpy as np
    h = xxhash.xxh3_128()
    for a in rows.arrays():
        h.update(f"{a.shape}".encode())
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def _files_from(ctx, vp: VocabPlan, own: list) -> Vocabulary | None:
    """Whose tokenizer files the output gets: tokenizer_source's, else the output vocabulary's
    (truncate: the first input's)."""
    spec, plan = ctx.spec, ctx.plan
    source = spec.tokenizer_source
    if source is None or source == "union":
        return own[0] if vp.mode == "truncate" or vp.out is None else vp.out
    node = spec.inputs[0] if source == "base" else source
    found = own[spec.inputs.index(node)]
    if found is None:
        raise InputError(f"[merges.{spec.name}] tokenizer_source = {source!r}: {_what(plan, node)}")
    if vp.mode == "base" and vp.out is not None and found is not vp.out:
        ours = {t: i for t, i in vp.out.tokens.items() if i < vp.rows}
        theirs = {t: i for t, i in found.tokens.items() if i < vp.rows}
        if ours != theirs:
            raise MergefileError(plan.mergefile.path, f"merges.{spec.name}", "tokenizer_source",
                                 f"{source}'s vocabulary is not {spec.inputs[0]}'s, which vocab = \"base\" keeps: "
                                 f"leave vocab out to put the rows in {source}'s vocabulary (as mergekit's "
                                 "tokenizer_source does), or copy the first input's tokenizer")
    return found


def _check_files(ctx, vp: VocabPlan) -> None:
    spec = ctx.spec
    if spec.output is not None and spec.output.suffix.lower() == ".safetensors":
        if spec.tokenizer_source is not None or vp.mode == "union":
            ctx.warn("the output is one .safetensors file, so no tokenizer is written with it (a folder output "
                     "gets one)")
        return
    f = vp.files_from
    if vp.mode == "truncate" and f is not None:
        beyond = sum(1 for i in f.tokens.values() if i >= vp.rows)
        if beyond:
            ctx.warn(f"vocab = \"truncate\" keeps {vp.rows} rows; the tokenizer the output gets has {beyond} "
                     f"token{'s' if beyond > 1 else ''} past them")


def vocab_tasks(ctx, method, vp: VocabPlan, substring_rule: bool) -> dict:
    """The tasks of the vocabulary keys whose rows move: the merge's method on the aligned rows
    (or the first input's aligned rows, where the method leaves the key alone)."""
    from mergebuild.methods.registry import get_method
    from mergebuild.planning.planner import TensorTask

    plan, spec, resolver = ctx.plan, ctx.spec, ctx.resolver
    tasks = {}
    for name, (positions, rows, rows_digest) in vp.keys.items():
        refs = [plan.ref(spec.inputs[p], name) for p in positions]
        a = refs[0]
        mergeable = (len(positions) == len(spec.inputs) and all(is_float(r.dtype) for r in refs)
                     and resolver.arch.merges_key(name, substring_rule) and resolver.selected(name))
        params = resolver.merge_params(name) if mergeable else None
        mergeable = params is not None
        inner = method if mergeable else get_method("copy")
        params = dict(params) if mergeable else {}
        if mergeable and method.input_dtypes is not None and method.input_dtypes(params):
            params["dtypes"] = [r.dtype for r in refs]
        clip = mergeable and spec.clip_to_inputs
        params[PARAM] = rows_digest + (":clip" if clip else "")
        wrapped = aligned(inner, rows, inner.reads if mergeable else (0,), clip)
        inputs = tuple((spec.inputs[p], name) for p in positions)
        tasks[name] = TensorTask(name, ctx.out_dtype(a.dtype), (vp.rows, *a.shape[1:]), inputs, wrapped, params)
    return tasks


def node_fields(merge) -> dict:
    """What the merge's recipe node adds: the digests of the tokenizers it read."""
    vp = getattr(merge, "vocab", None)
    return {"tokenizers": dict(sorted(vp.tokenizers.items()))} if vp is not None and vp.tokenizers else {}


def shape_hint(name: str, a: tuple, b: tuple) -> str:
    """For a shape error on a vocabulary matrix: the setting that merges it."""
    if set(name.split(".")) & VOCAB_NAMES and len(a) == len(b) == 2 and a[1:] == b[1:]:
        return " (vocabularies of different sizes: set vocab = \"base\", \"union\" or \"truncate\" on the merge)"
    return ""


def output_files(plan, merge) -> dict[str, bytes | None] | None:
    """The tokenizer files a folder output gets in place of its first input's (None: one not to
    copy); None where no merge up its chain of first inputs sets a vocabulary."""
    node = merge.spec.name
    while node in plan.merges:
        vp = getattr(plan.merges[node], "vocab", None)
        if vp is not None:
            if vp.files_from is None:
                return None
            return {**{n: None for n in TOKENIZER_FILES}, **vp.files_from.files()}
        node = plan.merges[node].spec.inputs[0]
    return None
