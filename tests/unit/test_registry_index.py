"""The registry loads lazily (methods/registry.py): a built-in name imports its own module only,
so its index of names by module must be what the modules declare; plugins (entry points) load
for a name no built-in has, or when every method is asked for, and may not reuse a built-in's
name."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from mergebuild.methods import registry


def test_the_index_lists_exactly_the_methods_each_module_declares():
    for module_name, names in registry.BUILTIN.items():
        declared = tuple(m.name for m in importlib.import_module(module_name).METHODS)
        assert declared == names, module_name
    assert {m.name for m in registry.all_methods()} >= set(registry._MODULE_OF)


class _EntryPoint:
    def __init__(self, methods):
        self.methods = methods

    def load(self):
        return self.methods


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry and a fake plugin list; the calls to entry_points counted."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_loaded_modules", set())
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    plugins, calls = [], []

    def entry_points(group):
        calls.append(group)
        return [_EntryPoint(plugins)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return plugins, calls


def _plugin(name: str) -> registry.Method:
    return registry.Method(name, 1, lambda a: a, ("A",))


def test_a_builtin_name_loads_its_module_only_and_no_plugins(fresh_registry):
    plugins, calls = fresh_registry
    plugins.append(_plugin("weighted_sum"))  # would be refused, if it were loaded
    assert registry.get_method("weighted_sum").name == "weighted_sum"
    assert registry._loaded_modules == {"mergebuild.methods.basic"} and calls == []


def test_a_plugins_method_is_found_by_its_name(fresh_registry):
    plugins, calls = fresh_registry
    plugins.append(_plugin("my_plugin_sum"))
    assert registry.get_method("my_plugin_sum") is plugins[0]
    assert calls == [registry.ENTRY_POINT_GROUP]
    assert registry.get_method("no_such_method") is None and calls == [registry.ENTRY_POINT_GROUP]  # once


def test_a_plugin_may_not_take_a_builtin_name(fresh_registry):
    plugins, _ = fresh_registry
    plugins.append(_plugin("slerp"))
    with pytest.raises(ValueError, match="'slerp' is registered twice"):
        registry.all_methods()
