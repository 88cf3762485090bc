"""PEFT LoRA adapters: adapter_config.json as per-module scales, and the config a written adapter
gets. Pure: no I/O (planning/sources.py reads the file, the executor writes it). See
../../docs/lora.md, "PEFT adapter folders".

A PEFT module is named `base_model.model.<module path>`; its rank r and alpha are the config's
`r` and `lora_alpha` unless `rank_pattern` / `alpha_pattern` has a key that matches the module
path, by PEFT's rule (peft.utils.other.get_pattern_key): the first key k, in the file's order,
for which re.match(rf"(.*\\.)?({k})$", path) holds. The scale is alpha / r, or alpha / sqrt(r)
with `use_rslora`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODULE_PREFIX = "base_model.model."  # PeftModel's own attribute path in front of the model's
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's defaults, for keys a config leaves out


def pattern_key(patterns, path: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the module path, or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error as e:
            raise ValueError(f"pattern {key!r} is not a regular expression ({e})") from None
    return None


def module_path(name: str) -> str:
    """A LoRA module's name as PEFT matches it: without the base_model.model. prefix."""
    return name.removeprefix(MODULE_PREFIX)


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    base_model: str | None = None
    task_type: str | None = None

    def rank(self, name: str) -> int:
        key = pattern_key([k for k, _ in self.rank_pattern], module_path(name))
        return dict(self.rank_pattern)[key] if key is not None else self.r

    def alpha(self, name: str) -> float:
        key = pattern_key([k for k, _ in self.alpha_pattern], module_path(name))
        return dict(self.alpha_pattern)[key] if key is not None else self.lora_alpha

    def scale(self, name: str) -> float:
        r = self.rank(name)
        return self.alpha(name) / (math.sqrt(r) if self.use_rslora else r)


def _number(doc: dict, field: str, integer: bool):
    value = doc.get(field, PEFT_DEFAULTS.get(field))
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ValueError(f"{field} is {value!r}, not {'an integer' if integer else 'a number'}")
    return value


def _pattern(doc: dict, field: str, integer: bool) -> tuple:
    table = doc.get(field) or {}
    if not isinstance(table, dict):
        raise ValueError(f"{field} is not an object of module patterns")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ValueError(f"{field}[{key!r}] is {value!r}, not {'an integer' if integer else 'a number'}")
        if integer and value <= 0:
            raise ValueError(f"{field}[{key!r}] is {value}: a rank must be positive")
        pattern_key([key], "")  # a pattern that is no regular expression fails here, not at the first module
    return tuple(table.items())


def parse_config(doc) -> AdapterConfig:
    """An adapter_config.json object; ValueError says what is wrong with it."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    kind = doc.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"peft_type is {kind!r}: mergebuild reads LoRA adapters (peft_type \"LORA\")")
    r = _number(doc, "r", integer=True)
    if r <= 0:
        raise ValueError(f"r is {r}: a rank must be positive")
    base = doc.get("base_model_name_or_path")
    task = doc.get("task_type")
    return AdapterConfig(
        r=r, lora_alpha=_number(doc, "lora_alpha", integer=False),
        rank_pattern=_pattern(doc, "rank_pattern", integer=True),
        alpha_pattern=_pattern(doc, "alpha_pattern", integer=False),
        use_rslora=bool(doc.get("use_rslora")), fan_in_fan_out=bool(doc.get("fan_in_fan_out")),
        use_dora=bool(doc.get("use_dora")),
        base_model=base if isinstance(base, str) and base else None,
        task_type=task if isinstance(task, str) and task else None)


def make_config(modules: dict[str, tuple[int, float]], *, base_model: str | None = None,
                task_type: str | None = None, fan_in_fan_out: bool = False,
                modules_to_save: list[str] | None = None) -> dict:
    """The adapter_config.json of modules {name: (rank, alpha)}: r and lora_alpha are the most
    common rank and alpha (the larger on a tie), rank_pattern and alpha_pattern name the modules
    that differ by their full paths; checked to give every module back its own rank and alpha."""
    if not modules:
        raise ValueError("a PEFT adapter needs at least one LoRA module")
    ranks = Counter(r for r, _ in modules.values())
    alphas = Counter(a for _, a in modules.values())
    r = max(ranks, key=lambda v: (ranks[v], v))
    alpha = max(alphas, key=lambda v: (alphas[v], v))
    rank_pattern = {module_path(n): v for n, (v, _) in sorted(modules.items()) if v != r}
    alpha_pattern = {module_path(n): plain(a) for n, (_, a) in sorted(modules.items()) if a != alpha}
    doc = {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "task_type": task_type,
        "r": r, "lora_alpha": plain(alpha), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted({module_path(n).rsplit(".", 1)[-1] for n in modules}),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
    }
    back = parse_config(doc)
    for name, (rank, a) in modules.items():
        if back.rank(name) != rank or back.alpha(name) != a:
            raise ValueError(f"module {name}: PEFT's pattern rule cannot tell it from another module whose path "
                             "ends like its own; write this LoRA as a kohya file instead")
    return doc


def plain(value: float):
    """An alpha as JSON writes it: 16, not 16.0, when it is a whole number."""
    return int(value) if float(value).is_integer() else float(value)


def config_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")
