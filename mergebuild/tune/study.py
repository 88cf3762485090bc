"""The search: an Optuna study in SQLite inside the cache, every trial an incremental build.

The study is named from the Mergefile's path and a digest of its contents (all but [tune]'s
trials and timeout, and [soup]), so an edited search space starts a new study and a rerun of the
same one resumes it: finished trials count toward `trials` and are never run again.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

from mergebuild.errors import UsageError
from mergebuild.portable import FileLock
from mergebuild.mergefile.search import Range
from mergebuild.store.hashing import text_digest
from mergebuild.tune.config import TuneConfig, param_kind

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

INTERRUPTED = "interrupted"  # a trial's user attribute: left RUNNING by a killed process, or Ctrl-C
TRIAL_ATTR = "mergebuild"  # a trial's user attribute: {computed, reused, seconds, ..., error, stderr}


def quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", module=r"optuna(\.|$)")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def study_name(path: Path, text: str) -> str:
    doc = tomllib.loads(text)
    how = ("trials", "timeout", "parallel", "cpus_per_trial", "gpus_per_trial")  # not what is searched
    tune = {k: v for k, v in doc.get("tune", {}).items() if k not in how}
    doc = {**{k: v for k, v in doc.items() if k != "soup"}, "tune": tune}
    digest = text_digest(json.dumps([str(Path(path).absolute()), doc], sort_keys=True, default=str))
    return f"{Path(path).stem}-{digest[:12]}"


@contextmanager
def study_lock(storage: Path):
    """One `mergebuild tune` per study at a time; so a RUNNING trial found at start is stale."""
    storage.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(storage.with_suffix(".lock"))
    try:
        if not lock.acquire(blocking=False):
            raise UsageError(f"another `mergebuild tune` is running this study ({storage.name})")
        yield
    finally:
        lock.release()


def open_study(storage: Path, name: str, direction: str):
    optuna = quiet_optuna()
    return optuna.create_study(storage=f"sqlite:///{storage}", study_name=name, direction=direction,
                               load_if_exists=True, sampler=optuna.samplers.RandomSampler())


def fail_stale_trials(study) -> int:
    """Trials left RUNNING by a killed process: FAIL, marked interrupted (they do not count)."""
    import optuna
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        optuna.trial.Trial(study, t._trial_id).set_user_attr(INTERRUPTED, True)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(stale)


def counted(trial) -> bool:
    """A finished trial that counts toward `trials` (an interrupted one does not)."""
    return trial.state.is_finished() and not trial.user_attrs.get(INTERRUPTED)


def make_sampler(cfg: TuneConfig, mf, ranges: list[Range], seed: int | None):
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "grid":
        return GridSampler(grid_space(mf, ranges), seed=seed)
    if cfg.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def _grid_sampler_class():
    import optuna

    class _Grid(optuna.samplers.GridSampler):
        """Optuna's grid sampler stops optimize() when the grid is done; with ask/tell there is no
        optimize() to stop (it would raise), so the trial loop caps the trials at the grid size."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return _Grid


def GridSampler(space, seed):  # noqa: N802 (a class factory: optuna is imported lazily)
    return _grid_sampler_class()(space, seed=seed)


def grid_space(mf, ranges: list[Range]) -> dict[str, list]:
    space = {}
    for r in ranges:
        if r.choices:
            space[r.id] = list(r.choices)
        elif param_kind(mf, r) is int:
            space[r.id] = list(range(int(r.low), int(r.high) + 1, int(r.step or 1)))
        else:
            n = int(math.floor((r.high - r.low) / r.step + 1e-9))
            space[r.id] = [on_step(r, k) for k in range(n + 1)]
    return space


def grid_size(mf, ranges: list[Range]) -> int:
    return math.prod(len(v) for v in grid_space(mf, ranges).values())


def suggest(trial, mf, ranges: list[Range]) -> dict[str, float]:
    """Sample every open range; the values to substitute, by Range.id."""
    values = {}
    for r in ranges:
        if r.choices:
            v = trial.suggest_categorical(r.id, list(r.choices))
        elif param_kind(mf, r) is int:
            v = trial.suggest_int(r.id, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            v = trial.suggest_float(r.id, float(r.low), float(r.high), step=r.step, log=r.log)
        values[r.id] = round_value(r, v)
    return values


SIGNIFICANT = 4  # digits kept of a value sampled without a step: 0.4535, not 0.453498858948


def round_value(r: Range, value):
    """The value a trial builds, writes and reports: on the range's step as written (0.45, not
    0.45000000000000001), else to 4 significant digits (within the bounds). Deterministic, so
    the raw value Optuna stores always rounds to the number that was built."""
    if r.choices or not isinstance(value, float):
        return value  # a choice as written; an integer parameter's whole number
    if r.step is not None:
        return on_step(r, round((value - r.low) / r.step))
    return min(max(float(f"{value:.{SIGNIFICANT}g}"), r.low), r.high)


def on_step(r: Range, k: int) -> float:
    """low + k * step in decimal, so 0.05 * 7 reads 0.35 (floats give 0.35000000000000003)."""
    return float(Decimal(repr(r.low)) + k * Decimal(repr(r.step)))


def rounder(ranges: list[Range]):
    """params (by Range.id, as Optuna stores them) -> the rounded values that were built."""
    by_id = {r.id: r for r in ranges}

    def apply(params: dict) -> dict:
        return {k: round_value(by_id[k], v) if k in by_id else clean(v) for k, v in params.items()}

    return apply


def clean(value):
    """Round off float noise (0.30000000000000004 -> 0.3) so the TOML reads well."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def clean_params(params: dict) -> dict:
    return {k: clean(v) for k, v in params.items()}


def storage_path(cache: Path, name: str) -> Path:
    return Path(cache) / "tune" / f"{name}.sqlite"


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end
