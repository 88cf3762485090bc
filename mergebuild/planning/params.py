"""Per-tensor parameter resolution: block weights, layer gradients, presets, elemental rules.

Every tensor's cache key holds only the parameter values that reach that tensor, so changing
IN05's weight changes the keys of IN05's tensors and nothing else. A numeric parameter is written
as one of:
    alpha = 0.5                                         everywhere
    alpha = { default = 0.5, BASE = 0.0, IN05 = 0.2 }   by MBW block (SD models)
    alpha = [0.0, 0.1, ...]                             26 (SD1/SD2) or 20 (SDXL) values, BASE first
    alpha = "GRAD_V"                                    a named preset (26 values)
    alpha = { gradient = [0.0, 0.5, 1.0] }              over the layer index (LLMs: the language model's)
    alpha = { gradient = [0.0, 1.0], component = "vision" }   over another stack's layers (a VLM's)
then [[merges.NAME.rules]] override it for the keys they select, later rules winning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergebuild.errors import MergefileError
from mergebuild.layouts.blocks import PRESETS, Architecture, block_values, expand_blocks
from mergebuild.methods.registry import Method
from mergebuild.mergefile.model import Mergefile, MergeSpec, Rule


@dataclass
class _CompiledRule:
    rule: Rule
    blocks: set[str] | None
    regex: re.Pattern | None
    hits: int = 0  # keys it selected: a rule that selects none is a mistake worth a warning

    def selects(self, key: str, block: str | None, group: str | None = None) -> bool:
        if self.blocks is not None and block not in self.blocks and group not in self.blocks:
            return False
        if not self.rule.match and self.regex is None:
            self.hits += 1
            return True
        hit = any(m in key for m in self.rule.match) or bool(self.regex and self.regex.search(key))
        if hit != self.rule.negate:
            self.hits += 1
            return True
        return False


class ParamResolver:
    """Compiled once per merge; resolves the parameters of each tensor key."""

    def __init__(self, mf: Mergefile, merge: MergeSpec, method: Method, arch: Architecture, keys: list[str]):
        self.mf, self.merge, self.method, self.arch = mf, merge, method, arch
        self.warnings: list[str] = []
        self.time_embed_in_base = mf.settings.time_embed == "BASE"
        self.keys = keys
        self.num_layers = self.layer_count(None)
        self.table_hits: dict[str, dict[str, int]] = {}  # per block table, the keys each entry reached
        self.values = {name: self._compile(name, v) for name, v in merge.params.items()}
        self.rules = [self._compile_rule(i, r) for i, r in enumerate(merge.rules)]
        self.include = [re.compile(p) for p in merge.include]
        self.exclude = [re.compile(p) for p in merge.exclude]
        self.pattern_hits: dict[str, int] = {p.pattern: 0 for p in self.include + self.exclude}
        self.defaults = method.defaults()
        self.outside_blocks: dict[str, int] = {}  # keys in no block, left unmerged: by their group
        # whether any value depends on the block of a key: then the block map (and its
        # [settings] time_embed) reaches the tensors
        self.block_sensitive = bool(
            any(param_varies_by_block(method, n, v) for n, v in merge.params.items())
            or any(r.blocks for r in merge.rules)
            or merge.params.get("blocks") or merge.params.get("block_weights"))

    def layer_count(self, component: str | None) -> int:
        """How many layers the main stack (or `component`'s) has: the highest index, plus one."""
        layers = (self.arch.layer_of(k, component) for k in self.keys)
        return max((n for n in layers if n is not None), default=-1) + 1

    def block_of(self, key: str) -> str | None:
        return self.arch.block_of(key, self.time_embed_in_base)

    def selected(self, key: str) -> bool:
        """Whether the merge applies to this key at all (include / exclude)."""
        hits = [p.pattern for p in self.include + self.exclude if p.search(key)]
        for pattern in hits:
            self.pattern_hits[pattern] += 1
        if self.include and not any(p.search(key) for p in self.include):
            return False
        return not any(p.search(key) for p in self.exclude)

    def params(self, key: str) -> dict | None:
        """The parameters of one key; None for a key outside every block (a Flux VAE key, say)
        that a block list gives no value: it stays the first input's, as supermerger keeps it."""
        block = self.block_of(key)
        out = dict(self.defaults)
        for name, value in self.values.items():
            out[name] = value(key, block) if callable(value) else value
        group = self.arch.group_of(key) if self.arch.groups else None
        for rule in self.rules:
            if rule.selects(key, block, group):
                out.update(rule.rule.params)
        for name, value in out.items():
            if value is None and self.arch.blocks and block not in self.arch.blocks:
                self.outside_blocks[block] = self.outside_blocks.get(block, 0) + 1
                return None
            if value is None:
                self._fail(name, f"no value for block {block or 'of ' + key} (add default = ...)")
        return out

    def merge_params(self, key: str) -> dict | None:
        """The parameters the merge's method merges `key` with; None where it leaves the key to
        the first input (in no block under a block list, or the method's select says no)."""
        params = self.params(key)
        if params is None or self.method.select is None:
            return params
        try:
            return params if self.method.select(key, params, self.arch, self.block_of(key)) else None
        except ValueError as e:
            raise MergefileError(self.mf.path, f"merges.{self.merge.name}", None, str(e)) from None

    # compiling ----------------------------------------------------------------------------
    def _compile(self, name: str, value):
        param = self.method.param(name)
        if not param.numeric or isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            preset, value = value, PRESETS[value]
            fits = len(value) == len(self.arch.blocks) or len(value) in self.arch.list_conversions
            if self.arch.blocks and not fits:
                self._fail(name, f"preset {preset} is a list of {len(value)} block values (supermerger's SD order); "
                           f"{self.arch.name} has {len(self.arch.blocks)} blocks: write a list or a table")
        if isinstance(value, list):
            return self._table(name, self._block_list(name, value))
        if "gradient" in value:
            return self._gradient(name, value)
        return self._table(name, value, written=True)

    def _block_list(self, name: str, values: list) -> dict:
        if not self.arch.blocks:
            self._fail(name, f"{self.arch.name} models have no blocks; use {{ gradient = [...] }} or rules")
        conversion = self.arch.list_conversions.get(len(values))
        if len(values) != len(self.arch.blocks) and conversion:
            self.warnings.append(f"{name}: {len(values)} values read as {self.arch.name}'s {len(self.arch.blocks)} "
                                 f"blocks, as supermerger converts them ({conversion['note']})")
        try:
            return block_values(values, self.arch)
        except ValueError as e:
            self._fail(name, str(e))

    def _table(self, name: str, table: dict, written: bool = False):
        """A block table: a key takes its group's value (a narrower name, such as ComfyUI's
        img_in inside Flux's IN), else its block's, else the default."""
        blocks, groups = {}, {}
        for written, value in table.items():
            if written == "default":
                continue
            group = self.arch.group_name(written)
            if group is not None:
                groups[group] = value
                continue
            block = self.arch.canonical_block(written)
            if block not in self.arch.blocks:
                have = f"{self.arch.blocks[0]}..{self.arch.blocks[-1]}" if self.arch.blocks else "no blocks"
                self._fail(f"{name}.{written}", f"block {written} does not exist in {self.arch.name} ({have})")
            if block in blocks:
                self._fail(f"{name}.{written}", f"block {block} is given twice (once by another name)")
            blocks[block] = value
        default = table.get("default")
        reached = self.table_hits.setdefault(name, {}) if written else None  # a list names every block

        def value(key, block):
            group = self.arch.group_of(key) if groups else None
            hit = group if group in groups else block if block in blocks else None
            if reached is not None and hit is not None:
                reached[hit] = reached.get(hit, 0) + 1
            return groups[group] if group in groups else blocks.get(block, default)

        for named in (*blocks, *groups) if written else ():
            reached.setdefault(named, 0)
        return value

    def _gradient(self, name: str, table: dict):
        points = table["gradient"]
        default = table.get("default", points[0])
        component = table.get("component")  # a stack of layers other than the main one (a VLM's vision)
        if component is not None and component not in self.arch.layer_patterns:
            stacks = ", ".join(self.arch.layer_patterns) or "one stack of layers, named by no component"
            self._fail(f"{name}.component", f"{self.arch.name} has no component {component!r} with layers "
                       f"(it has {stacks})")
        count = self.layer_count(component)
        if count <= 0:
            self.warnings.append(f"{name}: a gradient needs layer indices, and {self.arch.name} keys have none: "
                                 f"every tensor takes {default} (use block values or rules)")
        span = max(count - 1, 1)

        def at(key: str, block):
            layer = self.arch.layer_of(key, component)
            if layer is None:
                return default
            x = layer / span * (len(points) - 1)
            i = min(int(x), len(points) - 2)
            return points[i] + (x - i) * (points[i + 1] - points[i])

        return at

    def _compile_rule(self, index: int, rule: Rule) -> _CompiledRule:
        blocks = None
        if rule.blocks is not None:
            try:
                blocks = expand_blocks(rule.blocks, self.arch)
            except ValueError as e:
                raise MergefileError(self.mf.path, f"merges.{self.merge.name}.rules[{index}]", "blocks", str(e)) from None
        return _CompiledRule(rule, blocks, re.compile(rule.regex) if rule.regex else None)

    def unused(self, keys: list[str]) -> list[str]:
        """Warnings for edits that reached no tensor (after every key was resolved)."""
        out = list(self.warnings)
        for i, rule in enumerate(self.rules):
            if rule.hits == 0:
                what = ", ".join(f"{k} {v!r}" for k, v in (("blocks", rule.rule.blocks), ("match", list(rule.rule.match)
                                 or None), ("regex", rule.rule.regex)) if v)
                out.append(f"rules[{i}] ({what}) selects no key{_closest(rule.rule.match, keys)}: it changes nothing")
        for name, reached in self.table_hits.items():
            missed = [block for block, hits in reached.items() if hits == 0]
            if missed:
                out.append(f"{name}: {', '.join(missed)} reach{'es' if len(missed) == 1 else ''} no key of this "
                           f"{self.arch.name} model: {'it changes' if len(missed) == 1 else 'they change'} nothing")
        for field, patterns in (("include", self.merge.include), ("exclude", self.merge.exclude)):
            for pattern in patterns:
                if self.pattern_hits.get(pattern) == 0:
                    out.append(f"{field} {pattern!r} finds no key{_closest((pattern,), keys)}: it changes nothing")
        return out

    def _fail(self, field: str, message: str):
        raise MergefileError(self.mf.path, f"merges.{self.merge.name}", field, message)


def param_varies_by_block(method: Method, name: str, value) -> bool:
    param = method.param(name)
    if param is None or not param.numeric:
        return False
    return isinstance(value, (str, list)) or (isinstance(value, dict) and "gradient" not in value)


def _closest(words, keys: list[str]) -> str:
    """'(did you mean 'attn2'?)' for a substring that is close to a part of some key."""
    import difflib

    parts = {p for k in keys for p in k.split(".")}
    for word in words:
        close = difflib.get_close_matches(word, parts, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""
