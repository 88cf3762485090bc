"""Layer specs (layouts/layer_specs.py): the linear chain read from a model's keys, in natural
key order, and the ways a model fails to be one."""

from __future__ import annotations

import pytest

from mergebuild.layouts.blocks import architectures
from mergebuild.layouts.layer_specs import Linear, layer_spec, sequential_chain


def test_the_chain_follows_natural_key_order_and_optional_biases():
    shapes = {f"layers.{i}.weight": (4, 4) for i in range(12)}
    shapes["layers.0.weight"] = (4, 3)
    shapes["layers.11.bias"] = (4,)
    chain = sequential_chain(shapes)
    assert [layer.weight for layer in chain] == [f"layers.{i}.weight" for i in range(12)]
    assert chain[0] == Linear("layers.0.weight", None, 4, 3)
    assert chain[-1].keys == ("layers.11.weight", "layers.11.bias")


@pytest.mark.parametrize("shapes,fragment", [
    ({"fc1.weight": (4, 3), "fc2.weight": (2, 5)}, "does not take the 4 outputs of fc1.weight"),
    ({"fc1.weight": (4, 3), "fc1.bias": (3,), "fc2.weight": (2, 4)}, "fc1.bias [3] does not fit"),
    ({"fc1.weight": (4, 3), "norm.weight": (4,), "fc2.weight": (2, 4)}, "'norm.weight' [4] is not the 2-D weight"),
    ({"conv.weight": (4, 3, 3, 3), "fc.weight": (2, 4)}, "is not the 2-D weight"),
    ({"fc1.weight": (4, 3), "fc1.scale": (4,), "fc2.weight": (2, 4)}, "neither a weight nor a bias"),
    ({"fc1.weight": (4, 3)}, "fewer than two linear layers"),
])
def test_a_model_that_is_not_a_chain_is_named(shapes, fragment):
    with pytest.raises(ValueError, match=None) as e:
        sequential_chain(shapes)
    assert fragment in str(e.value)


def test_the_generic_architecture_declares_a_sequential_spec():
    assert layer_spec(architectures()["generic"]) == {
        "_comment": layer_spec(architectures()["generic"])["_comment"], "derive": "sequential", "activation": "relu"}
    assert all(layer_spec(a) is None for n, a in architectures().items() if n != "generic")  # LLMs do not inherit it
