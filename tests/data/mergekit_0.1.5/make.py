"""Make this folder's data: a tiny Llama trio and mergekit 0.1.5's own merges of it.

Run from the repository root with a Python that has mergekit 0.1.5 installed (see README.md):

    /tmp/mk/bin/python tests/data/mergekit_0.1.5/make.py

The trio is fabricated (mergebuild.testing.fabricate.llama_trio, seed 17), so only digests are
kept: outputs.json (per case, the sha256 of each float32 tensor mergekit-yaml wrote for each case
of CASES) and cases.json (each case's mergekit config). Same mergekit, torch and seeds, same bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from mergebuild.testing.fabricate import llama_trio, tensor_sha256  # noqa: E402

SHAPE = dict(layers=1, hidden=16, intermediate=24, vocab=32)
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
          "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
          "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "dtype": "float16"}
DTYPES = {"dtype": "float32", "out_dtype": "float32"}


def _models(*entries):
    return [{"model": name, **({"parameters": {"weight": w}} if w is not None else {})} for name, w in entries]


# each case: a mergekit config (model paths are the names base, a, b)
CASES = {
    "nuslerp": {"merge_method": "nuslerp", "models": _models(("a", 0.3), ("b", 0.7))},
    "nuslerp_rows_base": {"merge_method": "nuslerp", "base_model": "base", "models": _models(("a", 1.0), ("b", 2.0)),
                          "parameters": {"nuslerp_flatten": False}},
    "nuslerp_row_wise": {"merge_method": "nuslerp", "models": _models(("a", 1.0), ("b", 1.0)),
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": {"merge_method": "multislerp", "models": _models(("a", 1.0), ("b", 2.0), ("base", 0.5))},
    "multislerp_base": {"merge_method": "multislerp", "base_model": "base", "models": _models(("a", 0.4), ("b", 0.9))},
    "karcher": {"merge_method": "karcher", "models": _models(("a", None), ("b", None), ("base", None))},
    "karcher_tight": {"merge_method": "karcher", "models": _models(("a", None), ("b", None), ("base", None)),
                      "parameters": {"max_iter": 50, "tol": 1e-9}},
    "sce": {"merge_method": "sce", "base_model": "base", "models": _models(("a", None), ("b", None))},
    "sce_topk": {"merge_method": "sce", "base_model": "base", "models": _models(("a", None), ("b", None)),
                 "parameters": {"select_topk": 0.3}},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": _models(("a", None)),
                 "parameters": {"t": 0.005}},
}


def inputs() -> dict[str, dict[str, torch.Tensor]]:
    return llama_trio(seed=17, **SHAPE)


def main() -> None:
    models = inputs()
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    outputs, configs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, sd in models.items():
            (tmp / name).mkdir()
            save_file(sd, str(tmp / name / "model.safetensors"), metadata={"format": "pt"})
            (tmp / name / "config.json").write_text(json.dumps(CONFIG))
        for case, config in CASES.items():
            config = {**config, **DTYPES}
            configs[case] = config
            (tmp / f"{case}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            subprocess.run([str(mergekit_yaml), f"{case}.yml", f"out-{case}", "--no-copy-tokenizer",
                            "--no-write-model-card", "--quiet"], cwd=tmp, check=True)
            merged = {}
            for shard in sorted((tmp / f"out-{case}").glob("*.safetensors")):
                merged.update(load_file(str(shard)))
            assert set(merged) == set(models["base"]), f"{case}: mergekit wrote {sorted(merged)}"
            outputs[case] = {k: tensor_sha256(v) for k, v in sorted(merged.items())}
    import mergekit  # noqa: F401 (for the version stamp)
    from importlib.metadata import version

    (HERE / "outputs.json").write_text(json.dumps(with_earlier(outputs), indent=1, sort_keys=True))
    (HERE / "cases.json").write_text(json.dumps({"mergekit": version("mergekit"), "torch": torch.__version__,
                                                 "cases": configs}, indent=1) + "\n")


def with_earlier(outputs: dict) -> dict:
    """This machine's digests, with those another machine's run kept where they differ (a list:
    karcher's bytes depend on the CPU mergekit ran on; mergebuild's match mergekit's on each)."""
    path = HERE / "outputs.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    merged = {}
    for case, digests in outputs.items():
        merged[case] = {}
        for key, digest in digests.items():
            known = earlier.get(case, {}).get(key, [])
            known = [known] if isinstance(known, str) else known
            both = known + [digest] if digest not in known else known
            merged[case][key] = both[0] if len(both) == 1 else both
    return merged


if __name__ == "__main__":
    main()
