"""The inputs' own metadata an output copies: A1111's rule, `[settings] copy_metadata`.

A1111's checkpoint merger starts an output's metadata from model A's, updates it with B's, then
C's (later inputs win), and writes its own keys over them. mergebuild does the same for every
key (`copy_metadata = true`, the default), for the keys listed, or for none (`false`), and then
writes its own keys over them. Never copied (mergefile.model.never_copied): mergebuild's own keys
(`mergebuild.*`), the keys it writes itself (`format`, A1111's `sd_merge_*`, its ModelSpec keys),
and other tools' lineage of the input, which the output would carry stale (`mecha_recipe`,
ComfyUI's `prompt` / `workflow`, kohya's `sshs_*` hashes of that file). A LoRA file baked in is
not a model the output is: its training metadata is not copied.

An input that is a merge of the same build passes on exactly what a file it wrote would hold for
its reader: what it copied itself, and its method's own keys. Keys are copied, never nested, so
an output holds each key once: the copied part is at most the union of its ancestors' own keys
(each with its last value), however many generations made it.
"""

from __future__ import annotations

from mergebuild.mergefile.model import never_copied


def copied_metadata(plan, target: str, loras: set[str]) -> dict[str, str]:
    """The metadata `target`'s output starts from: its inputs', later inputs winning."""
    rule = plan.mergefile.settings.copy_metadata
    if rule is False:
        return {}
    keep = (lambda k: never_copied(k) is None) if rule is True else set(rule).__contains__
    passed: dict[str, dict[str, str]] = {}
    for name in plan.recipe.closure(target):  # inputs first, the target last
        if name in plan.sources:
            own = {} if name in loras else plan.sources[name].metadata
        elif name in plan.mergefile.models:  # a computed source (a Fisher) passes on nothing
            own = {}
        else:
            own = {}
            for i in plan.mergefile.merges[name].inputs:
                own.update(passed[i])
            if name == target:
                return own
            own = {**own, **plan.merges[name].output_metadata}
        passed[name] = {k: v for k, v in own.items() if isinstance(k, str) and isinstance(v, str) and keep(k)}
    return {}
