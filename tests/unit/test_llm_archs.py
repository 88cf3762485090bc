"""The LLM and vision-language architecture files: each family detected from its Hugging Face key
names (and, for a model folder, from config.json), every key's layer index and component against
rules written here from transformers' module names, and a VLM's stacks of layers kept apart."""

from __future__ import annotations

import pytest

from mergebuild.layouts.blocks import architectures, detect, group_of
from mergebuild.testing.llms import FAMILIES, family_config, family_keys

VLMS = ("gemma3-vl", "llava", "qwen2-vl")
CASES = [(f, s) for f in FAMILIES for s in (("old", "new") if f in VLMS else ("old",))]
KEYS_ONLY = {"mistral": "llama"}  # Mistral's keys are Llama's: only config.json tells them apart


def hf_layer(key: str) -> tuple[str | None, int | None]:
    """(stack, index) of a key as transformers numbers its modules: the integer after `layers` or
    `blocks` (a ModuleList), in the vision tower when a vision module is above it."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "blocks") and parts[i + 1].isdigit():
            vision = any(p in ("vision_tower", "visual") for p in parts[:i])
            return ("vision" if vision else "language"), int(parts[i + 1])
    return None, None


def hf_component(key: str) -> str:
    parts = key.split(".")
    if "multi_modal_projector" in parts or "merger" in parts:
        return "projector"
    if "vision_tower" in parts or "visual" in parts:
        return "vision"
    if "embed_tokens" in parts:
        return "embeddings"
    if "lm_head" in parts:
        return "lm_head"
    if hf_layer(key)[0] == "language":
        return "layers"
    assert parts[-2] == "norm", key
    return "norm"


@pytest.mark.parametrize("family,style", CASES)
def test_each_family_is_detected_by_its_keys(family, style):
    arch, how = detect(family_keys(family, style=style))
    assert arch.name == KEYS_ONLY.get(family, family), how
    assert how.startswith("keys start with") and how.endswith("; 4 layers")


@pytest.mark.parametrize("family,style", CASES)
def test_a_folder_is_detected_by_its_config(family, style):
    arch, how = detect(family_keys(family, style=style), family_config(family))
    model_type = family_config(family)["model_type"]
    assert arch.name == family and how == f"config.json model_type {model_type!r}; 4 layers"
    by_class = {"architectures": family_config(family)["architectures"]}
    assert detect(family_keys(family, style=style), by_class)[0].name == family


def test_a_config_the_keys_contradict_is_not_believed():
    # a Gemma 3 folder whose config says the vision model but holds the text model's weights only
    arch, how = detect(family_keys("gemma3"), family_config("gemma3-vl"))
    assert arch.name == "gemma3" and how.startswith("keys start with")
    assert detect(family_keys("qwen3"), {"model_type": "no-such-model"})[0].name == "qwen3"
    assert detect(family_keys("llama"), {"model_type": 7, "architectures": "LlamaForCausalLM"})[0].name == "llama"


def test_the_fallback_still_takes_unknown_llms():
    keys = {k.replace("model.layers.", "transformer.h."): v for k, v in family_keys("llama").items()}
    arch, how = detect(keys)
    assert arch.name == "generic" and arch.is_fallback and "4 layers found" in how


@pytest.mark.parametrize("family,style", CASES)
def test_every_key_has_its_layer_and_component(family, style):
    keys = family_keys(family, style=style)
    arch = architectures()[family]
    for key in keys:
        stack, index = hf_layer(key)
        assert arch.layer_of(key) == (index if stack == "language" else None), key
        if family in VLMS:
            assert arch.layer_of(key, "vision") == (index if stack == "vision" else None), key
            assert arch.layer_of(key, "language") == arch.layer_of(key), key
        assert arch.component_of(key) == hf_component(key), key
        expected = f"layer {index}" if stack == "language" else f"vision layer {index}" if stack else "other"
        assert group_of(arch, key) == expected, key


@pytest.mark.parametrize("family,style", CASES)
def test_embedding_head_and_post_layer_names(family, style):
    arch = architectures()[family]
    untied = family_keys(family, style=style, tied=False)
    tied = family_keys(family, style=style, tied=True)
    embeddings = [k for k in arch.llm["embeddings"] if k in untied]
    heads = [k for k in arch.llm["lm_head"] if k in untied]
    assert len(embeddings) == 1 and "embed_tokens" in embeddings[0]
    assert len(heads) == 1 and heads[0].endswith("lm_head.weight") and heads[0] not in tied
    assert arch.llm["tied"] == "tie_word_embeddings"
    post = [k for k in untied if k.startswith(tuple(arch.llm["post_layers"]))]
    assert sorted(post) == sorted(heads + [k for k in untied if hf_component(k) == "norm"])


def test_a_vlm_numbers_its_stacks_apart():
    keys = family_keys("gemma3-vl", layers=6, vision_layers=3)
    arch = architectures()["gemma3-vl"]
    assert {arch.layer_of(k) for k in keys} - {None} == set(range(6))
    assert {arch.layer_of(k, "vision") for k in keys} - {None} == set(range(3))
    assert not any(arch.layer_of(k) is not None and arch.layer_of(k, "vision") is not None for k in keys)


def test_archs_extending_llama_keep_the_peft_lora_names():
    generic = architectures()["generic"]
    for family in FAMILIES:
        assert architectures()[family].lora == generic.lora, family
