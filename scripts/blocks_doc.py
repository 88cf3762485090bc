"""Write docs/blocks.md from the architecture files (tests/unit/test_arch_files.py checks that
it is current): every architecture's blocks in list order, the other names it accepts, and how
it is detected."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergebuild.layouts.blocks import architectures  # noqa: E402

HEAD = """# Blocks of each architecture

Written by `python scripts/blocks_doc.py` from `mergebuild/layouts/archs/*.json`; do not edit.
A block list is read in the order given here; a block table may use any name below (see
docs/mergefile.md, "Parameters that vary by block or layer").
"""


def _ranges(blocks: tuple[str, ...]) -> str:
    """`BASE, IN00..IN11, M00, OUT00..OUT11`: runs of one prefix with numbers shortened."""
    out, run = [], []
    for name in [*blocks, None]:
        stem = name.rstrip("0123456789") if name else None
        if run and (stem != run[0].rstrip("0123456789") or stem == name):
            out.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
            run = []
        if name is not None:
            run.append(name)
    return ", ".join(f"`{r}`" for r in out)


def section(arch) -> str:
    lines = [f"## {arch.name}", "", arch.description + ".", ""]
    said = [f"{field} {' / '.join(f'`{v}`' for v in values)}" for field, values in arch.detect_config.items()]
    if said:
        lines.append(f"- detected in a model folder by config.json's {' or '.join(said)}")
    if arch.detect:
        alts = " or ".join(" + ".join(f"`{p}`" for p in alt) for alt in arch.detect)
        lines.append(f"- detected by keys starting with {alts}")
    elif arch.is_fallback:
        lines.append("- the fallback: any model no other file detects")
    if arch.blocks:
        lines.append(f"- {len(arch.blocks)} blocks: {_ranges(arch.blocks)}")
    if arch.aliases:
        shown = sorted(arch.aliases.items(), key=lambda kv: arch.blocks.index(kv[1]))
        first, last = shown[0], shown[-1]
        lines.append(f"- also named ({len(shown)} aliases): `{first[0]}` = `{first[1]}` .. `{last[0]}` = `{last[1]}`")
    if arch.groups:
        groups = ", ".join(f"`{g}`" for g in arch.groups)
        lines.append(f"- groups inside a block (a group's value beats its block's): {groups}")
    if arch.extra.get("presets"):
        lines.append(f"- presets: {', '.join(f'`{p}`' for p in arch.extra['presets'])}")
    if arch.layer_patterns:
        stacks = "; ".join(f"{c} `{p.pattern}`" for c, p in arch.layer_patterns.items())
        lines.append(f"- layers, each component's numbered from 0 (a gradient spans the first unless it names "
                     f"another): {stacks}")
    elif arch.layer_pattern is not None:
        lines.append(f"- layers (gradients) from `{arch.layer_pattern.pattern}`")
    if arch.llm.get("embeddings") or arch.llm.get("lm_head"):
        names = ", ".join(f"`{n}`" for n in arch.llm.get("embeddings", []) + arch.llm.get("lm_head", []))
        tied = f" (lm_head absent when config.json's `{arch.llm['tied']}`)" if arch.llm.get("tied") else ""
        lines.append(f"- embeddings and head: {names}{tied}")
    if arch.llm.get("post_layers"):
        lines.append(f"- after the layers (a passthrough takes them from its last slice): "
                     f"{', '.join(f'`{p}`' for p in arch.llm['post_layers'])}")
    lines.append(f"- components: {', '.join(f'`{c}`' for c in arch.components)}")
    if arch.modelspec:
        lines.append(f"- ModelSpec architecture: `{arch.modelspec.get('architecture')}`")
    return "\n".join(lines) + "\n"


def render() -> str:
    return HEAD + "\n" + "\n".join(section(a) for a in architectures().values())


if __name__ == "__main__":
    (ROOT / "docs/blocks.md").write_text(render(), encoding="utf-8")
