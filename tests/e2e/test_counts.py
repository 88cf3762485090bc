"""-n tells the truth about the work: the tensors it says are dirty or may change are the ones the
build then computes (a swap's tensors depend only on the input they take)."""

from __future__ import annotations

import json

from tests.conftest import build_json, mergefile, run_cli

TEXT = """
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"
[models.anime]
path = "models/anime.safetensors"
[merges.mix1]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {a1}
[merges.sw]
method = "swap"
inputs = ["mix1", "base"]
component = "text_encoder"
[merges.final]
method = "add_difference"
inputs = ["sw", "anime", "base"]
alpha = {a3}
output = "out/final.safetensors"
"""


def _counts(project) -> dict[str, int]:
    doc = json.loads(run_cli("-n", "--json", cwd=project, check=True).stdout)["merges"]
    return {n: m["dirty"] + m["pending"] for n, m in doc.items()}


def test_dry_run_counts_are_what_the_build_computes(project):
    for a1, a3 in ((0.4, 0.5), (0.45, 0.5), (0.45, 0.6), (0.3, 0.7)):
        mergefile(project / "mergefile.toml", TEXT.format(a1=a1, a3=a3))
        said = _counts(project)
        done = {n: m["computed"] for n, m in build_json(cwd=project)["merges"].items()}
        assert said == done, (a1, a3, said, done)
    assert said["sw"] == 0  # the swapped text encoder comes from base, which did not change
