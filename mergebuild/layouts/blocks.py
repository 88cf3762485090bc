"""Architectures: detect one from key names, map a key to its block (MBW) or layer index.

Each architecture is one data file, archs/<name>.json (docs/architecture.md, "Adding an
architecture", lists its fields); this module only interprets them. No architecture is named
in code: what differs between them is in their files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
ARCHS = HERE / "archs"


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    detect: tuple[tuple[str, ...], ...]  # alternatives: every prefix of one must start some key
    blocks: tuple[str, ...]  # in supermerger order (a block list's order); empty: no blocks
    rules: tuple[tuple[re.Pattern, str, str | None], ...]
    default_block: str | None
    components: dict[str, tuple[str, ...]]
    layer_pattern: re.Pattern | None = None
    component_match: str = "prefix"  # or "substring" (a component's names anywhere in the key)
    aliases: dict[str, str] = field(default_factory=dict)  # another tool's name -> one of blocks
    groups: dict[str, re.Pattern] = field(default_factory=dict)  # a name for part of a block's keys
    list_conversions: dict[int, dict] = field(default_factory=dict)  # n values -> {kept, note}
    modelspec: dict[str, str] = field(default_factory=dict)  # architecture, implementation ids
    merge_keys: dict = field(default_factory=dict)  # which keys merge (A1111's "model" rule)
    passthrough: tuple[re.Pattern, ...] = ()  # keys copied from the first input, never merged
    inpainting: dict = field(default_factory=dict)  # latent_channels, wider_channels
    lora: dict = field(default_factory=dict)  # the LoRA name scheme (layouts/lora_names.py)
    detect_not: tuple[str, ...] = ()  # key prefixes that rule this architecture out
    optional_prefixes: tuple[str, ...] = ()  # a key may carry it or not (Flux's model.diffusion_model.)
    # config.json values that name it ({"model_type": [...], "architectures": [...]}): a model
    # folder is detected by them first (docs/architecture.md, "Extending")
    detect_config: dict = field(default_factory=dict)
    # every stack of numbered layers, by component ({"language": ..., "vision": ...}), the main
    # one (layer_pattern, what a gradient spans unless it names another) first; {}: one stack
    layer_patterns: dict[str, re.Pattern] = field(default_factory=dict)
    llm: dict = field(default_factory=dict)  # LLM names: embeddings, lm_head, post_layers, config keys
    extra: dict = field(default_factory=dict)  # room for later fields (layers, permutations)

    def block_of(self, key: str, time_embed_in_base: bool = False) -> str | None:
        """The MBW block of a key (models with blocks); None for the others."""
        if not self.blocks:
            return None
        for pattern, template, tag in self.rules:
            m = pattern.search(key)
            if m:
                if tag == "time_embed" and time_embed_in_base:
                    return "BASE"
                return template.format(*(int(g) for g in m.groups()))
        return self.default_block

    def group_name(self, name: str) -> str | None:
        """`name` as one of this architecture's groups (ComfyUI's trailing dot allowed), or None."""
        name = name[:-1] if name.endswith(".") else name
        return name if name in self.groups else None

    def group_of(self, key: str) -> str | None:
        """The narrower group (another tool's name for part of a block) a key is in, if any."""
        return next((name for name, pattern in self.groups.items() if pattern.search(key)), None)

    def canonical_block(self, name: str) -> str:
        """A block or group name as this architecture calls it (aliases resolved; ComfyUI's
        trailing dot, as in "double_blocks.3.", allowed)."""
        name = name[:-1] if name.endswith(".") and name not in self.blocks else name
        return self.aliases.get(name, name)

    def knows_block(self, name: str) -> bool:
        return self.canonical_block(name) in self.blocks or self.group_name(name) is not None

    def layer_of(self, key: str, component: str | None = None) -> int | None:
        """A key's layer index in the main stack of layers (the language model's), or in the
        stack of `component` (one of layer_patterns: a VLM's "vision"); None outside it."""
        pattern = self.layer_pattern if component is None else self.layer_patterns[component]
        if pattern is None:
            return None
        m = pattern.search(key)
        return int(m.group(1)) if m else None

    @property
    def is_fallback(self) -> bool:
        """Detected by nothing: the architecture of models no other file describes (generic)."""
        return not self.detect and not self.detect_config

    def config_names(self, config) -> str | None:
        """How a config.json names this architecture ("config.json model_type '...'"), if it does."""
        if not isinstance(config, dict):
            return None
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type in self.detect_config.get("model_type", ()):
            return f"config.json model_type {model_type!r}"
        names = config.get("architectures")
        for name in names if isinstance(names, list) else ():
            if isinstance(name, str) and name in self.detect_config.get("architectures", ()):
                return f"config.json architectures {name!r}"
        return None

    def keys_match(self, keys: list[str]) -> str | None:
        """How the key names show this architecture ("keys start with ..."), if they do; never
        when a key starts with one of `detect_not` (a relative with the same blocks' names)."""
        if any(k.startswith(p) for p in self.detect_not for k in keys):
            return None
        for alternative in self.detect:
            if all(any(k.startswith(p) for k in keys) for p in alternative):
                return f"keys start with {' and '.join(repr(p) for p in alternative)}"
        return None

    def component_of(self, key: str) -> str | None:
        anywhere = self.component_match == "substring"
        for name, prefixes in self.components.items():
            if any(key.startswith(p) or (anywhere and p in key) for p in prefixes):
                return name
        return None

    def merges_key(self, key: str, keys_sample_prefixes: bool) -> bool:
        """Whether a key of this architecture is merged (else copied from the first input).
        keys_sample_prefixes: whether the model has a key starting with merge_keys'
        `when_any_key_starts_with` (A1111's rule holds for SD checkpoints only)."""
        if any(p.search(key) for p in self.passthrough):
            return False
        substring = self.merge_keys.get("substring")
        return substring in key if substring and keys_sample_prefixes else True

    def rule_applies(self, keys) -> bool:
        """Whether merge_keys' substring rule applies to a model with these keys."""
        prefix = self.merge_keys.get("when_any_key_starts_with")
        if not self.merge_keys.get("substring"):
            return False
        return prefix is None or any(k.startswith(prefix) for k in keys)


def _load(path: Path, files: dict[str, dict]) -> dict:
    """An architecture file, with the fields of the one it `extends` (one level or more)."""
    doc = files[path.stem]
    parent = doc.get("extends")
    if parent is None:
        return doc
    if parent not in files:
        raise ValueError(f"{path.name}: extends unknown architecture {parent!r}")
    return {**_load(ARCHS / f"{parent}.json", files), **{k: v for k, v in doc.items() if k != "extends"}}


KNOWN_FIELDS = {"name", "description", "detect_order", "detect", "blocks", "aliases", "groups", "rules",
                "default_block", "components", "component_match", "layer_pattern", "list_conversions",
                "modelspec", "merge_keys", "passthrough_keys", "passthrough_patterns", "inpainting", "lora", "extends",
                "detect_config", "layer_patterns", "llm", "detect_not", "optional_prefixes", "_comment"}


def _architecture(name: str, a: dict) -> Architecture:
    stacks = {k: re.compile(v) for k, v in a.get("layer_patterns", {}).items()}
    main = a.get("layer_pattern") or next(iter(a.get("layer_patterns", {}).values()), None)
    return Architecture(
        name=name,
        description=a["description"],
        detect=tuple(tuple(alt) for alt in a.get("detect", [])),
        blocks=tuple(a.get("blocks", [])),
        rules=tuple((re.compile(p), t, tag) for p, t, tag in a.get("rules", [])),
        default_block=a.get("default_block"),
        components={k: tuple(v) for k, v in a.get("components", {}).items()},
        layer_pattern=re.compile(main) if main else None,
        component_match=a.get("component_match", "prefix"),
        aliases=dict(a.get("aliases", {})),
        groups={k: re.compile(v) for k, v in a.get("groups", {}).items()},
        list_conversions={int(n): dict(c) for n, c in a.get("list_conversions", {}).items()},
        modelspec=dict(a.get("modelspec", {})),
        merge_keys=dict(a.get("merge_keys", {})),
        passthrough=tuple([re.compile("^" + re.escape(k) + "$") for k in a.get("passthrough_keys", [])]
                          + [re.compile(p) for p in a.get("passthrough_patterns", [])]),
        inpainting=dict(a.get("inpainting", {})),
        lora=dict(a.get("lora", {})),
        detect_config={k: tuple(v) for k, v in a.get("detect_config", {}).items()},
        detect_not=tuple(a.get("detect_not", [])),
        optional_prefixes=tuple(a.get("optional_prefixes", [])),
        layer_patterns=stacks,
        llm=dict(a.get("llm", {})),
        extra={k: v for k, v in a.items() if k not in KNOWN_FIELDS},
    )


@lru_cache(maxsize=None)
def _documents() -> dict[str, dict]:
    """Every architecture file as data, its `extends` resolved, in detection order: what a
    Mergefile's checks (block names, presets) read, with no pattern compiled."""
    files = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(ARCHS.glob("*.json"))}
    docs = {name: _load(ARCHS / f"{name}.json", files) for name in files}
    order = sorted(docs, key=lambda n: (docs[n].get("detect_order", 10**9), n))
    return {name: docs[name] for name in order}


@lru_cache(maxsize=None)
def architectures() -> dict[str, Architecture]:
    """Every architecture, in the order detection tries them (detect_order; generic last)."""
    return {name: _compiled(name) for name in _documents()}


def architecture(name: str) -> Architecture | None:
    """One architecture by name (None: no file has it), its patterns compiled alone: a merge
    restored from its summary (planning/shortcut.py) needs its own, not every file's."""
    return _compiled(name) if name in _documents() else None


@lru_cache(maxsize=None)
def _compiled(name: str) -> Architecture:
    return _architecture(name, _documents()[name])


def fallback() -> Architecture:
    """The architecture of models no file detects (the one without `detect`)."""
    return next(a for a in architectures().values() if a.is_fallback)


def group_of(arch: Architecture, key: str, time_embed_in_base: bool = False) -> str:
    """The block of a key (models with blocks), else its layer ("layer 12"), else "other": how
    explain, the build's statistics and the report group tensors."""
    block = arch.block_of(key, time_embed_in_base)
    if block is not None:
        return block
    layer = arch.layer_of(key)
    if layer is not None:
        return f"layer {layer}"
    for component, pattern in arch.layer_patterns.items():  # a VLM's other stacks: "vision layer 3"
        layer = arch.layer_of(key, component) if pattern.pattern != arch.layer_pattern.pattern else None
        if layer is not None:
            return f"{component} layer {layer}"
    return "other"


def detect(keys, config: dict | None = None) -> tuple[Architecture, str]:
    """The architecture of a model from its key names, and how it was recognised. `config`, a
    model folder's config.json, is asked first: its model_type or architectures name a file
    (Mistral's keys are Llama's), which is taken when its key detection, if it has one, agrees."""
    keys = list(keys)
    for arch in architectures().values() if config else ():
        said = arch.config_names(config)
        if said and (not arch.detect or arch.keys_match(keys)):
            return arch, said + _layer_count(arch, keys)
    for arch in architectures().values():
        how = arch.keys_match(keys)
        if how:
            return arch, how + _layer_count(arch, keys)
    generic = next(a for a in architectures().values() if a.is_fallback)
    layers = {generic.layer_of(k) for k in keys} - {None}
    how = f"{len(layers)} layers found by {generic.layer_pattern.pattern!r}" if layers else "no layer indices found"
    return generic, how


def _layer_count(arch: Architecture, keys: list[str]) -> str:
    """"; 32 layers" for an architecture with numbered layers (the main stack's), else ""."""
    if arch.layer_pattern is None:
        return ""
    return f"; {len({arch.layer_of(k) for k in keys} - {None})} layers"


def expand_blocks(text: str, arch: Architecture) -> set[str]:
    """'IN04-IN08 M00 OUT*' style block lists (supermerger's elemental syntax) -> block names."""
    out: set[str] = set()
    for word in text.replace(",", " ").split():
        if "-" in word:
            first, last = (_check_block(name, arch, in_range=True) for name in word.split("-", 1))
            i, j = arch.blocks.index(first), arch.blocks.index(last)
            out.update(arch.blocks[min(i, j) : max(i, j) + 1])
        else:
            out.add(_check_block(word, arch))
    return out


def _check_block(name: str, arch: Architecture, in_range: bool = False) -> str:
    """The block (or group) `name` stands for in `arch`; a ValueError if it has none."""
    block = arch.canonical_block(name)
    if block in arch.blocks:
        return block
    if arch.group_name(name) is not None and not in_range:
        return arch.group_name(name)
    have = f"{arch.blocks[0]}..{arch.blocks[-1]}" if arch.blocks else "no blocks (use gradient or match)"
    if arch.group_name(name) is not None:
        raise ValueError(f"block {name!r} is a group, which a range cannot start or end at ({arch.name})")
    raise ValueError(f"block {name!r} does not exist in {arch.name} ({have})")


@lru_cache(maxsize=None)
def _presets() -> dict[str, list[float]]:
    """Named block lists, from the architecture files that define them (supermerger's 26-value
    presets live in sd1's; SDXL reads them through its list conversion). Names are unique."""
    out: dict[str, list[float]] = {}
    for doc in _documents().values():
        for name, values in doc.get("presets", {}).items():
            if name in out:
                raise ValueError(f"preset {name!r} is defined by two architecture files")
            out[name] = [float(v) for v in values]
    return out


class _Presets(Mapping):
    """PRESETS: read from the files on first use, so importing this module reads none of them
    (a no-op build that never detects an architecture compiles none of their patterns)."""

    def __getitem__(self, name: str) -> list[float]:
        return _presets()[name]

    def __iter__(self):
        return iter(_presets())

    def __len__(self) -> int:
        return len(_presets())


PRESETS: Mapping[str, list[float]] = _Presets()


def block_values(values: list[float], arch: Architecture) -> dict[str, float]:
    """A list in supermerger order -> {block: value}. A 26-value SD list on SDXL keeps
    IN00-IN08 and M00-OUT08, as supermerger's conversion does."""
    n = len(arch.blocks)
    if len(values) == n:
        return dict(zip(arch.blocks, values))
    if len(values) in arch.list_conversions:
        kept = [values[i] for i in arch.list_conversions[len(values)]["kept"]]
        return dict(zip(arch.blocks, kept))
    raise ValueError(f"{arch.name} has {n} blocks ({', '.join(arch.blocks[:3])}, ...), got {len(values)} values")


@lru_cache(maxsize=None)
def _all_block_names() -> frozenset[str]:
    names = set()
    for doc in _documents().values():
        names |= {*doc.get("blocks", []), *doc.get("aliases", {}), *doc.get("groups", {})}
    return frozenset(names)


def is_block_name(name: str) -> bool:
    """A block (or alias, or group) name of some architecture: a Mergefile is parsed before
    its models' architectures are known."""
    return name in _all_block_names() or name.removesuffix(".") in _all_block_names()


def block_name_examples() -> str:
    """What an error about a block name suggests."""
    return "BASE, IN00, M00, OUT00 for SD; CLIP, T5, IN, D00, S00, OUT for Flux; docs/blocks.md lists them all"
