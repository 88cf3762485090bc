"""`tail_average` with `k = "auto"`: two-tailed averaging (Melis 2022) over the ordered inputs.

The rule, replayed over the checkpoints x_1 .. x_n in input order: two running tail averages, a
short one of length s and a long one of length l (both 0 at first). At each step t both grow by
one (s, l = s + 1, l + 1: each is the mean of the last s, l checkpoints up to x_t); then both are
scored, and when the short one does at least as well as the long one, the long one is dropped
and the short one becomes the long one (l, s = s, 0). After the last step the long average is
the one kept: k = l. (Melis, "Two-Tailed Averaging: Anytime, Adaptive, Once-in-a-While Optimal
Weight Averaging for Better Generalization", 2022; the rule as its author's practitioner's guide
states it.)

Every candidate is a merge `tail_average(x_1 .. x_t, k = length)` built on the project's cache
like any other (its output goes to a scratch folder beside the cache, tune's), and scored by the
merge's `scorer` (tune's scorer: a command or module:function, with its score cache). So
replaying after one more checkpoint is added plans the old steps (all cached: their tensors and
their scores) and computes only the new step's candidates; and the kept average is the last
step's candidate itself: the final merge's tensors are already in the cache.

Sits above project (it builds); cli calls `resolve_tails` before build, -n, status and explain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.errors import BuildError, MergefileError
from mergebuild.mergefile.model import FILE_SUFFIX, Mergefile, MergeSpec
from mergebuild.planning.graph import build_graph, build_order
from mergebuild.portable import FileLock
from mergebuild.planning.planner import make_plan
from mergebuild.project import BuildOptions, build, cache_dir, mergefile_of, open_project
from mergebuild.record.lock import lock_path
from mergebuild.tune.config import ScorerSpec, _scorer, check_python_scorer
from mergebuild.tune.runner import content_digest, scratch_folder
from mergebuild.tune.scoring import Scorer

AUTO = "auto"
TAG = "two-tailed"


@dataclass
class TailChoice:
    """What the rule chose for one merge, and what replaying it cost."""

    merge: str
    k: int | None  # None: not known without building (a dry run)
    n: int
    first: str | None = None  # the first checkpoint of the kept tail
    score: float | None = None
    short: int = 0  # the short average's length at the end
    steps: list[dict] = field(default_factory=list)  # per step: t, s, l, their scores, switched
    computed: int = 0  # tensors computed by the candidates' builds
    evaluated: int = 0  # candidates scored now (not from the score cache)
    unknown: int = 0  # dry run: candidates that would have to be built or scored

    def doc(self) -> dict:
        """The lineage's and --json's record of it (lineage only: k itself is in params)."""
        return {"rule": TAG, "k": self.k, "of": self.n, "first": self.first, "score": self.score,
                "short": self.short}

    def line(self) -> str:
        if self.k is None:
            return (f"{self.merge}: k = 'auto': the two-tailed rule has {self.unknown} candidate average(s) "
                    f"to build and score")
        return (f"{self.merge}: two-tailed averaging kept the last {self.k} of {self.n} checkpoints "
                f"(from {self.first}), score {self.score:.6g}; {self.computed} tensors computed, "
                f"{self.evaluated} candidates scored")


def is_auto(spec: MergeSpec) -> bool:
    return spec.method == "tail_average" and spec.params.get("k") == AUTO


def resolve_tails(opts: BuildOptions, dry: bool = False) -> tuple[BuildOptions, dict[str, TailChoice]]:
    """`opts` with every needed k = "auto" replaced by the tail the rule keeps (a Mergefile
    value; the file is not touched); with dry, from the cache only (no build, no scorer run)."""
    mf = mergefile_of(opts)
    _check_scorers(mf)
    order = build_order(mf, build_graph(mf), list(opts.targets) or mf.targets)
    auto = [n for n in order if n in mf.merges and is_auto(mf.merges[n])]
    if not auto:
        return opts, {}
    choices: dict[str, TailChoice] = {}
    merges = dict(mf.merges)
    for name in auto:  # inputs first: an auto merge upstream is resolved before its readers replay
        current = dataclasses.replace(mf, merges=merges)
        choice = _replay(current, name, opts, dry)
        choices[name] = choice
        spec = merges[name]
        params = {k: v for k, v in spec.params.items() if k != "scorer"}
        params["k"] = choice.k if choice.k is not None else 0  # unknown (dry): planned as all
        merges[name] = dataclasses.replace(spec, params=params, tail=choice.doc() if choice.k is not None else None)
    return dataclasses.replace(opts, mergefile=dataclasses.replace(mf, merges=merges)), choices


def _check_scorers(mf: Mergefile) -> None:
    for name, spec in mf.merges.items():
        if spec.method != "tail_average":
            continue
        has = "scorer" in spec.params
        if is_auto(spec) and not has:
            raise MergefileError(mf.path, f"merges.{name}", "scorer", "missing: k = \"auto\" needs a scorer, "
                                 "e.g. scorer = { python = \"score:accuracy\" } (as [tune]'s: command or python, "
                                 "direction)")
        if has and not is_auto(spec):
            raise MergefileError(mf.path, f"merges.{name}", "scorer", "a scorer is for k = \"auto\" only")


def scorer_spec(mf: Mergefile, name: str) -> ScorerSpec:
    table = mf.merges[name].params["scorer"]
    where = f"merges.{name}.scorer"
    for key in table:
        if key not in ("command", "python", "direction"):
            raise MergefileError(mf.path, where, key, "unknown field (command, python, direction)")
    spec = _scorer(mf, where, table)
    check_python_scorer(mf, spec, where)
    return spec


def _replay(mf: Mergefile, name: str, opts: BuildOptions, dry: bool) -> TailChoice:
    spec = mf.merges[name]
    upstream = set(build_order(mf, build_graph(mf), [name]))  # the candidates plan what they read only
    mf = dataclasses.replace(mf, models={n: m for n, m in mf.models.items() if n in upstream},
                             merges={n: m for n, m in mf.merges.items() if n in upstream})
    inputs = list(spec.inputs)
    cache = Path(cache_dir(mf, opts))
    scorer = Scorer(scorer_spec(mf, name), cache)
    folder = scratch_folder(cache, mf.path, TAG) / name
    # never written: the candidate builds' name in the index (one per Mergefile: replays of it
    # take turns on the scratch folder's lock)
    hidden = mf.path.with_name(f".{mf.path.stem}.{TAG}.toml")
    choice = TailChoice(name, None, len(inputs))
    s = l = 0
    guard = None if dry else _lock(folder)  # one replay at a time writes the candidates' files
    try:
        for t in range(1, len(inputs) + 1):
            s, l = s + 1, l + 1
            scores = _scores(mf, spec, inputs[:t], {"long": l, "short": s} if s != l else {"long": l}, folder, hidden,
                             opts, scorer, dry, choice)
            long, short = scores["long"], scores.get("short", scores["long"])
            if long is None or short is None:  # a dry run that would have to build
                continue
            switched = scorer.spec.better_or_equal(short, long)
            choice.steps.append({"t": t, "short": s, "long": l, "short_score": short, "long_score": long,
                                 "switched": switched})
            if switched:
                l, s, long = s, 0, short
            choice.score = long
    finally:
        scorer.close()
        lock_path(hidden).unlink(missing_ok=True)
        if guard is not None:
            guard.release()
    if choice.unknown:
        choice.score = None
        return choice
    choice.k, choice.short, choice.first = l, s, inputs[len(inputs) - l]
    return choice


def _lock(folder: Path) -> FileLock:
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock")
    lock.acquire()
    return lock


def _scores(mf: Mergefile, spec: MergeSpec, inputs: list[str], lengths: dict[str, int], folder: Path,
            hidden: Path, opts: BuildOptions, scorer: Scorer, dry: bool, choice: TailChoice) -> dict:
    """The scores of tail_average(inputs, k) for each slot's k: from the score cache when a
    candidate's tensors are all cached and were scored before; else built (incrementally, one
    build for the step's candidates) and scored. None: unknown in a dry run."""
    params = {key: v for key, v in spec.params.items() if key != "scorer"}
    merges = {n: dataclasses.replace(m, output=None) for n, m in mf.merges.items()}  # upstream: no file written
    targets = {slot: f"_{TAG}_{spec.name}_{slot}" for slot in lengths}
    for slot, k in lengths.items():
        merges[targets[slot]] = dataclasses.replace(spec, name=targets[slot], inputs=tuple(inputs),
                                                    params={**params, "k": k}, output=folder / f"{slot}{FILE_SUFFIX}")
    cand_opts = BuildOptions(mergefile=dataclasses.replace(mf, path=hidden, merges=merges),
                             targets=tuple(targets.values()), cache_dir=opts.cache_dir, device=opts.device,
                             lock_timeout=opts.lock_timeout)
    contents = _contents(cand_opts)
    scores = {slot: _cached_score(scorer, contents[target]) for slot, target in targets.items()}
    todo = [slot for slot, value in scores.items() if value is None]
    if not todo:
        return scores
    if dry:
        choice.unknown += len(todo)
        return scores
    _, results = build(dataclasses.replace(cand_opts, targets=tuple(targets[slot] for slot in todo)))
    choice.computed += sum(r.computed for r in results.values())
    contents = _contents(cand_opts)
    for slot in todo:
        score = scorer.score(folder / f"{slot}{FILE_SUFFIX}", contents[targets[slot]])
        if not score.ok:
            raise BuildError(f"[merges.{spec.name}] scorer: {score.error} (scoring the mean of the last "
                             f"{lengths[slot]} of {inputs[0]} .. {inputs[-1]})")
        choice.evaluated += 1
        scores[slot] = score.value
    return scores


def _contents(opts: BuildOptions) -> dict[str, str | None]:
    """Each target's content digest (its tensors' digests; None: one is still to compute), read
    from a plan while its cache is open (a plan's tasks may be loaded from the index lazily)."""
    mf, cache = open_project(opts, readonly=True, remote=False)
    try:
        plan = make_plan(mf, cache, list(opts.targets))
        return {t: content_digest(plan, t) for t in opts.targets}
    finally:
        cache.close()


def _cached_score(scorer: Scorer, content: str | None) -> float | None:
    if content is None or scorer.cache is None:
        return None
    return scorer.cache.get(content, scorer.identity)
