"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them (names, q/k rows
permuted by LlamaModel.permute, 1-D tensors in F32, shapes reversed by GGUFWriter, head counts in
the metadata), for the GGUF reader's tests. Needs the gguf package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_HEAD, N_KV, HEAD_DIM, LAYERS = 4, 2, 8, 2

# the Hugging Face name of each llama.cpp name (convert_hf_to_gguf.py / gguf-py tensor_mapping.py)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
for _i in range(LAYERS):
    GGUF_NAMES.update({f"model.layers.{_i}.{hf}.weight": f"blk.{_i}.{g}.weight" for hf, g in BLOCK.items()})


def llama_state(seed: int, hidden: int = N_HEAD * HEAD_DIM, ffn: int = 64, vocab: int = 40,
                dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A llama-shaped state dict: q (n_head heads), k and v (n_kv heads), norms in float32."""
    g = torch.Generator().manual_seed(seed)
    kv = hidden // N_HEAD * N_KV
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    return {n: torch.randn(s, generator=g).to(torch.float32 if len(s) == 1 else dtype) for n, s in shapes.items()}


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp has it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converted_rows(name: str, rows: np.ndarray) -> np.ndarray:
    """What the converter does to a tensor's rows: q and k permuted for llama's RoPE."""
    if name.endswith("q_proj.weight"):
        return permute(rows, N_HEAD, N_HEAD)
    if name.endswith("k_proj.weight"):
        return permute(rows, N_HEAD, N_KV)
    return rows


def write_llama_gguf(path: Path, state: dict, qtype=None, raw: dict | None = None, arch: str = "llama",
                     head_counts: bool = True) -> Path:
    """`state` (HF names) as convert_hf_to_gguf.py writes it: 1-D tensors in F32, the rest in their
    own float type, or quantised to `qtype`; `raw` adds tensors already quantised (HF name ->
    (ggml type, block bytes in HF row order))."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    if head_counts:
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_KV)
    w.add_token_list([f"tok{i}" for i in range(8)])  # an array the reader must not copy into metadata
    for name, t in state.items():
        data = converted_rows(name, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
        if t.dtype == torch.bfloat16:
            w.add_tensor(GGUF_NAMES[name], gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif qtype is not None and t.dim() > 1:
            w.add_tensor(GGUF_NAMES[name], gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(GGUF_NAMES[name], data)
    for name, (rtype, blocks) in (raw or {}).items():
        w.add_tensor(GGUF_NAMES[name], converted_rows(name, blocks), raw_dtype=rtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q4_k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random but well-formed Q4_K rows (uint8, rows x cols/256*144): per 256-value block a float16
    d and dmin (small, so no inf), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    d = rng.uniform(0.001, 0.01, (n, 2)).astype(np.float16).view(np.uint8)
    rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return np.concatenate([d, rest], axis=1).reshape(rows, cols // 256 * 144)
