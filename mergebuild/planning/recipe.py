"""The one canonical description of a build: a node per model and merge, inputs by name.

Everything that says what a merge is derives from these nodes: the tensors' cache keys take
their method, version and settings from them, an output's identity is the Merkle hash of its
node and everything upstream, the lineage written into outputs is these nodes (plus hashes
known only after reading the files), the lock records them, and `status`, `explain` and `-v`
explain a rebuild by diffing them. So a field that can change the bytes of an output cannot
miss reaching status.

A node lists only what is set (defaults are left out), so adding a field with a default later
keeps every existing identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mergebuild.layouts.blocks import PRESETS
from mergebuild.store.hashing import text_digest

# fields of a node that record hashes learnt while building (lineage only, not identity)
LINEAGE_ONLY = ("sha256", "autov2", "addnet_hash", "made_by", "tail")  # tail: what k = "auto" chose


@dataclass
class Recipe:
    nodes: dict[str, dict] = field(default_factory=dict)  # name -> node, in topological order
    identities: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, node: dict) -> str:
        self.nodes[name] = node
        self.identities[name] = node_identity(name, node, [self.identities[i] for i in node.get("inputs", [])])
        return self.identities[name]

    def closure(self, name: str) -> list[str]:
        """`name` and everything it is made from, inputs first (iterative: chains can be long)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self.nodes[n].get("inputs", []))
        return [n for n in self.nodes if n in seen]

    def closure_identities(self, name: str) -> dict[str, str]:
        return {n: self.identities[n] for n in self.closure(name)}


def node_identity(name: str, node: dict, input_identities: list[str]) -> str:
    own = {k: v for k, v in node.items() if k not in LINEAGE_ONLY and k != "inputs"}
    return text_digest(json.dumps([name, own, input_identities], sort_keys=True, separators=(",", ":")))


def model_node(file_name: str, content: str) -> dict:
    return {"kind": "model", "file": file_name, "content": content}


def merge_node(spec, version: int, settings: dict, output: dict | None) -> dict:
    """The node of a merge: what the Mergefile says of it, and the settings that reach it."""
    node = {"kind": "merge", "tool": "mergebuild", "method": spec.method, "version": version,
            "params": spec.params, "inputs": list(spec.inputs)}
    optional = {
        "dtype": spec.dtype,
        "discard": spec.discard,
        "rules": [{"blocks": r.blocks, "match": list(r.match), "regex": r.regex, "not": r.negate, **r.params}
                  for r in spec.rules],
        "include": list(spec.include),
        "exclude": list(spec.exclude),
        "clip_to_inputs": spec.clip_to_inputs,
        "fix_clip_position_ids": spec.fix_clip_position_ids,
        "vocab": getattr(spec, "vocab", None),
        "tokenizer_source": getattr(spec, "tokenizer_source", None),
        "settings": settings,
        "output": output,
        "tail": getattr(spec, "tail", None),
    }
    node.update({k: v for k, v in optional.items() if v})
    return node


RECIPE_KEY = "mergebuild.recipe"  # the metadata key of the recipe in an output
IDENTITY_KEY = "mergebuild.identity"  # the metadata key of the output's identity
FORMAT = 2  # 1: a nested tree (mergebuild 0.1 before recipes were flat)


def recorded_nodes(metadata: dict[str, str]) -> dict[str, dict] | None:
    """The recipe nodes an output was built from, by name (own nodes only), or None."""
    try:
        doc = json.loads(metadata.get(RECIPE_KEY, ""))
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("nodes"), dict):
        return None
    return {n: v for n, v in doc["nodes"].items() if isinstance(v, dict) and "/" not in n}


# --- why: the difference between two recipes, in one format ---------------------------------
def changes(name: str, old: dict | None, new: dict, blocks: tuple[str, ...] = ()) -> list[str]:
    """What differs in one node, as `mix.alpha IN05: 0.6 -> 0.65` lines. `blocks` names the
    merge's blocks, so block lists read by block."""
    if old is None:
        return [f"{_label(name, new)}: new"]
    if new.get("kind") == "model":
        return _model_changes(name, old, new)
    if new.get("kind") == "fisher":
        return _fisher_changes(name, old, new)
    out = []
    if old.get("method") != new.get("method"):
        return [f"{name}.method: {old.get('method')} -> {new.get('method')}"]
    if old.get("version") != new.get("version"):
        out.append(f"{name}: method {new['method']} version {old.get('version')} -> {new.get('version')}")
    before, after = old.get("params", {}), new.get("params", {})
    for key in sorted(before.keys() | after.keys()):
        out += _value_changes(f"{name}.{key}", before.get(key), after.get(key), blocks)
    out += setting_changes(old.get("settings"), new.get("settings"))
    for key in ("inputs", "dtype", "discard", "rules", "include", "exclude", "clip_to_inputs",
                "fix_clip_position_ids", "output", "vocab", "tokenizer_source"):
        if old.get(key) != new.get(key):
            out += _field_changes(name, key, old.get(key), new.get(key))
    out += _value_changes(f"{name}.tokenizers", old.get("tokenizers"), new.get("tokenizers"), ())  # planning/vocab.py
    out += _statistic_changes(name, old.get("statistic"), new.get("statistic"))
    return out


def _statistic_changes(name: str, old: dict | None, new: dict | None) -> list[str]:
    """A whole-model statistic's version or data (a dataset, a script) that differs."""
    old, new = old or {}, new or {}
    if old == new:
        return []
    label = new.get("name") or old.get("name")
    if old.get("name") != new.get("name") or old.get("version") != new.get("version"):
        return [f"{name}: statistic {old.get('name')} v{old.get('version')} -> {new.get('name')} v{new.get('version')}"]
    before, after = old.get("data") or {}, new.get("data") or {}
    return [f"{name}: {label} {key} changed ({str(before.get(key))[:4]}.. -> {str(after.get(key))[:4]}..)"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


# settings a node lists only when they are not their default (so older identities hold)
SETTING_DEFAULTS = {"copy_metadata": True}


def setting_changes(old: dict | None, new: dict | None) -> list[str]:
    """Settings that reach both versions of a merge and differ (a setting that starts or stops
    reaching it does so because of a change that is reported itself)."""
    old = {**SETTING_DEFAULTS, **(old or {})}
    new = {**SETTING_DEFAULTS, **(new or {})}
    return [f"[settings] {k}: {_text(old[k])} -> {_text(new[k])}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k]]


def _label(name: str, node: dict) -> str:
    return f"models.{name}" if node.get("kind") in ("model", "fisher") else name


def _model_changes(name: str, old: dict, new: dict) -> list[str]:
    out = []
    if old.get("file") != new.get("file"):
        out.append(f"models.{name}.file: {old.get('file')} -> {new.get('file')}")
    if old.get("content") != new.get("content"):
        if old.get("sha256") and new.get("sha256"):
            what = f"sha256 {old['sha256'][:4]}.. -> {new['sha256'][:4]}.."
        else:
            what = f"content {str(old.get('content'))[:4]}.. -> {str(new.get('content'))[:4]}.."
        out.append(f"models.{name}: content changed ({what})")
    return out


def _fisher_changes(name: str, old: dict, new: dict) -> list[str]:
    """A computed Fisher (planning/computed.py): its fields, and each script file by name."""
    label = f"models.{name}"
    out = []
    for key in ("inputs", "loss", "batches", "samples", "version", "statistic"):
        if old.get(key) != new.get(key):
            out.append(f"{label}.{key}: {_text(old.get(key), 'unset')} -> {_text(new.get(key), 'unset')}")
    before, after = old.get("scripts") or {}, new.get("scripts") or {}
    for script in sorted(before.keys() | after.keys()):
        if before.get(script) != after.get(script):
            what = "new" if script not in before else "no longer imported" if script not in after else "changed"
            out.append(f"{label}: script {script} {what}")
    return out


def _value_changes(label: str, before, after, blocks: tuple[str, ...]) -> list[str]:
    if before == after:
        return []
    b, a = _by_block(before, blocks), _by_block(after, blocks)
    if isinstance(b, dict) != isinstance(a, dict):
        b, a = _as_table(b), _as_table(a)
    if isinstance(b, dict) and isinstance(a, dict):
        out = []
        for block in _ordered(b.keys() | a.keys(), blocks):
            if b.get(block) != a.get(block):
                out.append(f"{label} {block}: {_text(b.get(block, 'unset'))} -> {_text(a.get(block, 'unset'))}")
        return out or [f"{label}: {_text(before)} -> {_text(after)}"]
    return [f"{label}: {_text(before, 'unset')} -> {_text(after, 'unset')}"]


def _by_block(value, blocks: tuple[str, ...]):
    """A per-block value as {block: value} where it can be read so (tables, lists, presets)."""
    if isinstance(value, str) and value in PRESETS:
        value = PRESETS[value]
    if isinstance(value, list) and blocks and len(value) in (len(blocks), 26):
        if len(value) == 26 and len(blocks) == 20:  # an SD list on SDXL, as block_values converts
            value = value[:10] + value[13:23]
        return dict(zip(blocks, value))
    if isinstance(value, dict) and "gradient" not in value:
        return value
    return value


def _as_table(value):
    """A plain number read as a block table (when the other side of a change is one)."""
    return {"default": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _ordered(keys, blocks: tuple[str, ...]) -> list[str]:
    rank = {b: i for i, b in enumerate(("default",) + tuple(blocks))}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), k))


def _field_changes(name: str, key: str, before, after) -> list[str]:
    if key == "rules":
        before, after = before or [], after or []
        out = []
        for i in range(max(len(before), len(after))):
            b = before[i] if i < len(before) else None
            a = after[i] if i < len(after) else None
            if b == a:
                continue
            if b is None or a is None:
                out.append(f"{name}.rules[{i}]: {'added' if b is None else 'removed'} ({rule_text(a or b)})")
                continue
            for k in sorted(b.keys() | a.keys()):
                if b.get(k) != a.get(k):
                    out.append(f"{name}.rules[{i}].{k}: {_text(b.get(k), 'unset')} -> {_text(a.get(k), 'unset')}")
        return out
    return [f"{name}.{key}: {_text(before, 'unset')} -> {_text(after, 'unset')}"]


# --- one way to write a value, everywhere (reasons, trees, graphs, status) --------------------
def _text(value, missing: str = "unset") -> str:
    return value_text(value, missing)


def value_text(value, missing: str = "unset") -> str:
    """A parameter's value, whole and the same wherever it is shown: `0.4`,
    `{default = 0.5, IN05 = 0.2}` (blocks in their order), `[0.0, 0.1, ..., 1.0]` (every value:
    this is the recipe; pictures summarise with graph.param_summary instead)."""
    if value is None:
        return missing
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {value_text(v)}" for k, v in sorted(value.items(), key=_key_rank)) + "}"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def params_text(params: dict) -> str:
    """A merge's parameters: `alpha=0.4, strength={default = 0.8, OUT03 = 1.0}`."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in params.items())


def rules_text(rules: list) -> str:
    return f"{len(rules)} rule{'' if len(rules) == 1 else 's'}" if rules else ""


RULE_SELECTORS = ("blocks", "match", "regex", "not")


def rule_text(rule: dict) -> str:
    """One rule as the recipe records it: `blocks IN00-IN05: alpha=0.2`, `regex attn: ...`."""
    what = [f"blocks {rule['blocks']}"] if rule.get("blocks") else []
    what += [f"match {value_text(list(rule['match']))}"] if rule.get("match") else []
    what += [f"regex {rule['regex']}"] if rule.get("regex") else []
    what += ["not"] if rule.get("not") else []
    params = {k: v for k, v in rule.items() if k not in RULE_SELECTORS}
    return (", ".join(what) or "every key") + ": " + params_text(params)


def _key_rank(item) -> tuple:
    """default first, then blocks in their order (BASE, IN00.., M00, OUT00..), then the rest."""
    key = str(item[0])
    if key == "default":
        return (0, 0, key)
    if key == "BASE":
        return (1, 0, key)
    for rank, prefix in ((2, "IN"), (3, "M"), (4, "OUT")):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return (rank, int(key[len(prefix):]), key)
    return (5, 0, key)
