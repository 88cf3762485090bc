"""Layer specs: how a model computes, for the methods that run it on data (zipit).

An architecture file's `layer_spec` object is data (docs/architecture.md):
  "derive": "sequential": the model is a chain of linear layers read from its keys: every
      module with a 2-D `weight` (in natural key order: layers.2 before layers.10), each taking
      the previous one's outputs (its weight's columns are the previous weight's rows), with an
      optional 1-D `bias` of its outputs;
  "activation": what follows every layer but the last (one of ACTIVATIONS); a merge may name
      another (zipit's `activation`).

A spec that does not fit a model (a key that is neither a weight nor a bias of the chain,
widths that do not chain) is a ValueError naming the key. Planning reads specs: no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")
DERIVATIONS = ("sequential",)


@dataclass(frozen=True)
class Linear:
    """One layer of a sequential chain: y = x @ weight.T + bias."""

    weight: str
    bias: str | None
    outputs: int
    inputs: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def layer_spec(arch) -> dict | None:
    """The architecture's layer spec, checked; None when it declares none."""
    spec = arch.extra.get("layer_spec") if arch is not None else None
    if not spec:
        return None
    if spec.get("derive") not in DERIVATIONS:
        raise ValueError(f"architecture {arch.name}: layer_spec derive {spec.get('derive')!r} is not one of "
                         f"{', '.join(DERIVATIONS)}")
    if spec.get("activation", "relu") not in ACTIVATIONS:
        raise ValueError(f"architecture {arch.name}: layer_spec activation {spec.get('activation')!r} is not "
                         f"one of {', '.join(ACTIVATIONS)}")
    return spec


def sequential_chain(shapes: dict[str, tuple[int, ...]]) -> list[Linear]:
    """The linear layers of a sequential model with these keys and shapes, in order."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in sorted(shapes.items(), key=lambda kv: _natural(kv[0])):
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = tuple(shape)
    chain: list[Linear] = []
    for module, leaves in modules.items():
        weight = leaves.get("weight")
        if weight is None or len(weight) != 2:
            key = f"{module}.{next(iter(leaves))}" if module else next(iter(leaves))
            raise ValueError(f"{key!r} {list(next(iter(leaves.values())))} is not the 2-D weight of a linear "
                             "layer: the model is not a sequential chain of linear layers")
        extra = sorted(set(leaves) - {"weight", "bias"})
        if extra:
            raise ValueError(f"{module}.{extra[0]!r} is neither a weight nor a bias: the model is not a "
                             "sequential chain of linear layers")
        bias = leaves.get("bias")
        if bias is not None and bias != (weight[0],):
            raise ValueError(f"{module}.bias {list(bias)} does not fit {module}.weight {list(weight)}")
        if chain and weight[1] != chain[-1].outputs:
            raise ValueError(f"{module}.weight {list(weight)} does not take the {chain[-1].outputs} outputs of "
                             f"{chain[-1].weight}: the layers do not chain")
        chain.append(Linear(f"{module}.weight", f"{module}.bias" if bias is not None else None, weight[0], weight[1]))
    if len(chain) < 2:
        raise ValueError("the model has fewer than two linear layers: nothing to zip")
    return chain


def _natural(key: str) -> list:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key)]
