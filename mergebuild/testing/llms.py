"""Tiny LLM and vision-language key lists with Hugging Face's names, and their config.json.

    family_keys("qwen3", layers=4)            {key: (shape, torch dtype)}, like fabricate.llama_keys
    family_keys("gemma3-vl", style="new")     transformers >= 4.52 names (model.language_model. ...)
    family_config("gemma3-vl", layers=4)      the config.json of such a folder

Written from each model's transformers modeling file (the parameter names of its modules), not
from mergebuild's architecture files, so tests that detect and slice them check those files.
"""

from __future__ import annotations

import torch

from mergebuild.testing.fabricate import llama_keys

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-vl", "llava", "qwen2-vl")
VISION_LAYERS = 3  # a VLM's vision tower: fewer layers than its language model, so the two spans differ
F32 = torch.float32


def _decoder(prefix: str, layers: int, hidden: int, intermediate: int, *, bias: bool = False,
             qk_norm: bool = False, ff_norms: bool = False, head_dim: int = 4) -> dict[str, tuple]:
    """The layers of a Llama-style decoder under `prefix` ("model."): Llama's, plus Qwen2's q/k/v
    biases, Qwen3's and Gemma 3's q/k norms, Gemma 2's and 3's feed-forward norms."""
    keys = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[p + f"self_attn.{proj}.weight"] = ((hidden, hidden), F32)
            if bias and proj != "o_proj":
                keys[p + f"self_attn.{proj}.bias"] = ((hidden,), F32)
        if qk_norm:
            keys[p + "self_attn.q_norm.weight"] = ((head_dim,), F32)
            keys[p + "self_attn.k_norm.weight"] = ((head_dim,), F32)
        keys[p + "mlp.gate_proj.weight"] = ((intermediate, hidden), F32)
        keys[p + "mlp.up_proj.weight"] = ((intermediate, hidden), F32)
        keys[p + "mlp.down_proj.weight"] = ((hidden, intermediate), F32)
        keys[p + "input_layernorm.weight"] = ((hidden,), F32)
        keys[p + "post_attention_layernorm.weight"] = ((hidden,), F32)
        if ff_norms:
            keys[p + "pre_feedforward_layernorm.weight"] = ((hidden,), F32)
            keys[p + "post_feedforward_layernorm.weight"] = ((hidden,), F32)
    return keys


def _language(prefix: str, head: str | None, layers: int, hidden: int, intermediate: int, vocab: int,
              **kind) -> dict[str, tuple]:
    keys = {f"{prefix}embed_tokens.weight": ((vocab, hidden), F32)}
    keys.update(_decoder(prefix, layers, hidden, intermediate, **kind))
    keys[f"{prefix}norm.weight"] = ((hidden,), F32)
    if head is not None:
        keys[head] = ((vocab, hidden), F32)
    return keys


def _vit(prefix: str, layers: int, width: int, mlp: int, names: dict) -> dict[str, tuple]:
    """A vision transformer's layers: `names` maps norm1, norm2, q, k, v, out, fc1, fc2 to its
    module names (CLIP / SigLIP: layer_norm1, self_attn.q_proj, ...)."""
    keys = {}
    for i in range(layers):
        p = prefix.format(i=i)
        for part in ("norm1", "norm2"):
            keys[p + names[part] + ".weight"] = ((width,), F32)
            keys[p + names[part] + ".bias"] = ((width,), F32)
        for part in ("q", "k", "v", "out"):
            if part in names:
                keys[p + names[part] + ".weight"] = ((width, width), F32)
                keys[p + names[part] + ".bias"] = ((width,), F32)
        if "qkv" in names:
            keys[p + names["qkv"] + ".weight"] = ((3 * width, width), F32)
            keys[p + names["qkv"] + ".bias"] = ((3 * width,), F32)
        keys[p + names["fc1"] + ".weight"] = ((mlp, width), F32)
        keys[p + names["fc1"] + ".bias"] = ((mlp,), F32)
        keys[p + names["fc2"] + ".weight"] = ((width, mlp), F32)
        keys[p + names["fc2"] + ".bias"] = ((width,), F32)
    return keys


CLIP_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
QWEN_VIT_NAMES = {"norm1": "norm1", "norm2": "norm2", "qkv": "attn.qkv", "out": "attn.proj", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2"}


def family_keys(family: str, layers: int = 4, hidden: int = 16, intermediate: int = 40, vocab: int = 64,
                tied: bool | None = None, style: str = "old", vision_layers: int = VISION_LAYERS) -> dict[str, tuple]:
    """{key: (shape, dtype)} of a tiny model of `family` (one of FAMILIES). tied: leave lm_head out
    (None: as the family's models do, Gemma's tied); style "old" (transformers before 4.52:
    language_model.model.*, visual.*) or "new" (model.language_model.*, model.visual.*) for VLMs."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    tied = family.startswith("gemma") if tied is None else tied
    size = dict(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab)
    if family in ("llama", "mistral"):
        keys = llama_keys(layers, hidden, intermediate, vocab)
        return {k: v for k, v in keys.items() if not (tied and k == "lm_head.weight")}
    lm = "lm_head.weight"
    if family in ("qwen2", "qwen3", "gemma2", "gemma3"):
        kind = {"qwen2": dict(bias=True), "qwen3": dict(qk_norm=True), "gemma2": dict(ff_norms=True),
                "gemma3": dict(ff_norms=True, qk_norm=True)}[family]
        return _language("model.", None if tied else lm, **size, **kind)
    new = style == "new"
    if family == "qwen2-vl":
        lang, vis = ("model.language_model.", "model.visual.") if new else ("model.", "visual.")
        keys = _language(lang, None if tied else lm, **size, bias=True)
        keys[vis + "patch_embed.proj.weight"] = ((hidden, 3, 2, 2, 2), F32)
        keys.update(_vit(vis + "blocks.{i}.", vision_layers, hidden, 2 * hidden, QWEN_VIT_NAMES))
        for part in ("ln_q.weight", "ln_q.bias"):
            keys[vis + "merger." + part] = ((hidden,), F32)
        keys[vis + "merger.mlp.0.weight"] = ((4 * hidden, 4 * hidden), F32)
        keys[vis + "merger.mlp.2.weight"] = ((hidden, 4 * hidden), F32)
        return keys
    lang = "model.language_model." if new else "language_model.model."
    head = "lm_head.weight" if new else "language_model.lm_head.weight"
    top = "model." if new else ""
    if family == "gemma3-vl":
        keys = _language(lang, None if tied else head, **size, ff_norms=True, qk_norm=True)
        tower = f"{top}vision_tower.vision_model."
        keys[tower + "embeddings.patch_embedding.weight"] = ((hidden, 3, 2, 2), F32)
        keys[tower + "embeddings.patch_embedding.bias"] = ((hidden,), F32)
        keys[tower + "embeddings.position_embedding.weight"] = ((4, hidden), F32)
        keys.update(_vit(tower + "encoder.layers.{i}.", vision_layers, hidden, 2 * hidden, CLIP_NAMES))
        keys[tower + "post_layernorm.weight"] = ((hidden,), F32)
        keys[tower + "post_layernorm.bias"] = ((hidden,), F32)
        keys[f"{top}multi_modal_projector.mm_input_projection_weight"] = ((hidden, hidden), F32)
        keys[f"{top}multi_modal_projector.mm_soft_emb_norm.weight"] = ((hidden,), F32)
        return keys
    keys = _language(lang, None if tied else head, **size)  # llava: a Llama language model, a CLIP tower
    tower = f"{top}vision_tower.vision_model."
    keys[tower + "embeddings.class_embedding"] = ((hidden,), F32)
    keys[tower + "embeddings.patch_embedding.weight"] = ((hidden, 3, 2, 2), F32)
    keys[tower + "embeddings.position_embedding.weight"] = ((5, hidden), F32)
    keys[tower + "pre_layrnorm.weight"] = ((hidden,), F32)
    keys.update(_vit(tower + "encoder.layers.{i}.", vision_layers, hidden, 2 * hidden, CLIP_NAMES))
    keys[tower + "post_layernorm.weight"] = ((hidden,), F32)
    for n in (1, 2):
        keys[f"{top}multi_modal_projector.linear_{n}.weight"] = ((hidden, hidden), F32)
        keys[f"{top}multi_modal_projector.linear_{n}.bias"] = ((hidden,), F32)
    return keys


MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
               "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
               "gemma2": ("gemma2", "Gemma2ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
               "gemma3-vl": ("gemma3", "Gemma3ForConditionalGeneration"),
               "llava": ("llava", "LlavaForConditionalGeneration"),
               "qwen2-vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration")}


def family_config(family: str, layers: int = 4, vision_layers: int = VISION_LAYERS, **extra) -> dict:
    """A config.json for family_keys(family, layers): model_type, architectures, the layer count
    where transformers keeps it (a VLM's text_config), Gemma 3's sliding_window_pattern, and the
    entries of `extra` in the language model's section (layer_types = [...], say)."""
    model_type, arch = MODEL_TYPES[family]
    text = {"num_hidden_layers": layers, "hidden_size": 16, "tie_word_embeddings": family.startswith("gemma")}
    if family in ("gemma3", "gemma3-vl"):
        text["sliding_window_pattern"] = 6
    text.update(extra)
    config = {"architectures": [arch], "model_type": model_type}
    if family == "qwen2-vl":
        return {**config, **text, "vision_config": {"depth": vision_layers}}
    if family in ("gemma3-vl", "llava"):
        return {**config, "text_config": {"model_type": "gemma3_text" if family == "gemma3-vl" else "llama", **text},
                "vision_config": {"num_hidden_layers": vision_layers}}
    return {**config, **text}
