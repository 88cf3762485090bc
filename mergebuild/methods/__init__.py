"""Merge methods: pure (tensors, params) -> tensor functions, registered in one place."""

from mergebuild.methods.registry import Method, Param, get_method, all_methods

__all__ = ["Method", "Param", "get_method", "all_methods"]
