"""Per-tensor parameter resolution.

Every tensor's cache key holds only the parameter values that reach that tensor. Today a
parameter is one plain value for the whole merge; block tables and elemental rules (the methods
issue) resolve here, by key name, without changing the planner.
"""

from __future__ import annotations

from mergebuild.methods.registry import Method
from mergebuild.spec.model import MergeSpec


def resolve_params(merge: MergeSpec, method: Method, key: str) -> dict:
    """The parameter values for tensor `key` of `merge`, defaults filled in."""
    params = method.defaults()
    params.update(merge.params)
    return params
