"""`mergebuild tune`: search a Mergefile's open ranges with Optuna, every trial an incremental build;
`mergebuild tune --greedy-soup`: the greedy model soup. See ../../docs/tune.md.

Sits above build.py (it builds) and beside report.py; only cli.py imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mergebuild.project import BuildOptions, cache_dir
from mergebuild.portable import replace
from mergebuild.mergefile.parse import load_mergefile
from mergebuild.mergefile.search import open_ranges, substitute
from mergebuild.tune.config import check_python_scorer, tune_config
from mergebuild.tune.display import TrialView, fmt, short, trial_doc, write_plots
from mergebuild.tune.runner import Evaluation, Runner
from mergebuild.tune.scoring import Scorer
from mergebuild.tune.study import (INTERRUPTED, TRIAL_ATTR, Deadline, counted, fail_stale_trials, grid_size,
                                   make_sampler, open_study, rounder, storage_path, study_lock, study_name, suggest)

__all__ = ["TuneOptions", "run_tune", "run_greedy_soup", "best_path"]


@dataclass(frozen=True)
class TuneOptions:
    mergefile: Path = Path("mergefile.toml")
    cache_dir: Path | None = None
    trials: int | None = None  # overrides [tune] trials
    apply: bool = False  # write the best values into the Mergefile itself
    plot: Path | None = None  # a folder for history.png and importances.png
    no_cache: bool = False  # a fresh cache for every trial (and no score cache): for comparisons
    quiet: bool = False
    device: str | None = None
    ray: str | None = None  # trials on a Ray cluster: its address ("": RAY_ADDRESS, else a local Ray)
    parallel: int | None = None  # with ray: trials at once (overrides [tune] parallel)


def best_path(mergefile: Path) -> Path:
    """mergefile.toml -> mergefile.best.toml, beside it."""
    mergefile = Path(mergefile)
    return mergefile.with_name(f"{mergefile.stem}.best.toml")


def run_tune(opts: TuneOptions) -> tuple[dict, int]:
    """Run the study's remaining trials; returns the --json document and the exit code (0 when a
    trial of the study completed, else 1)."""
    from optuna.trial import TrialState

    path = Path(opts.mergefile)
    mf = load_mergefile(path, allow_search=True)
    text = path.read_text(encoding="utf-8")
    ranges = open_ranges(mf)
    cfg = tune_config(mf, ranges)
    check_python_scorer(mf, cfg.scorer, "tune")
    trials = cfg.trials if opts.trials is None else opts.trials
    cache = cache_dir(mf, BuildOptions(cache_dir=opts.cache_dir))
    name = study_name(mf.path, text)
    storage = storage_path(cache, name)
    view = TrialView([r.id for r in ranges], cfg.scorer.maximize, opts.quiet)
    rounded = rounder(ranges)  # Optuna's raw params -> the values each trial built
    interrupted = None
    pool = _trial_pool(opts, cfg, mf, cache)  # with --ray: an unreachable cluster fails before the study opens
    with study_lock(storage):
        study = open_study(storage, name, cfg.scorer.direction)
        stale = fail_stale_trials(study)
        earlier = study.get_trials(deepcopy=False)
        done = sum(counted(t) for t in earlier)
        study.sampler = make_sampler(cfg, mf, ranges, None if cfg.seed is None else cfg.seed + len(earlier))
        todo = max(0, trials - done)
        if cfg.sampler == "grid":
            todo = min(todo, max(0, grid_size(mf, ranges) - done))
        if earlier:
            extra = f" ({stale} interrupted trial(s) marked FAIL, not counted)" if stale else ""
            view.note(f"resuming study {name}: {done} trials finished earlier{extra}, {todo} to run")
        scorer = Scorer(cfg.scorer, None if opts.no_cache else cache)
        runner = Runner(mf.path, cache, scorer, fresh_cache=opts.no_cache, device=opts.device)
        try:
            with view:
                for t in earlier:
                    view.add(trial_doc(t, rounded), earlier=True)
                deadline = Deadline(cfg.timeout)
                if pool is not None:
                    _run_on_ray(study, pool, todo, deadline, mf, ranges, text, cfg, view, rounded)
                for _ in range(todo if pool is None else 0):
                    if deadline.passed():
                        view.note(f"timeout: {cfg.timeout} s passed, no new trial started")
                        break
                    view.add(trial_doc(_run_trial(study, runner, mf, ranges, text, cfg), rounded))
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: report the study, then stop as asked
            interrupted = e
        finally:
            scorer.close()
            runner.close()
            if pool is not None:
                pool.close()
        all_trials = study.get_trials(deepcopy=False)
        doc = {"study": name, "best": None, "trials": [trial_doc(t, rounded) for t in all_trials]}
        complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            values = rounded(best.params)
            doc["best"] = {"number": best.number, "params": values, "value": best.value}
            doc.update(_write_best(opts, path, text, values, view))
            if not interrupted:
                _rebuild(runner, substitute(text, values), cfg.target, view)
            view.note(f"best: trial {best.number}, score {fmt(best.value)}: "
                      + ", ".join(f"{short(k)} = {fmt(v)}" for k, v in values.items()))
        else:
            failed = [d for d in doc["trials"] if d.get("error")]
            last = f"; the last error: {failed[-1]['error']}" if failed else ""
            view.note(f"mergebuild tune: no trial completed{last}")
        if opts.plot is not None:
            written, notes = write_plots(study, len(ranges), opts.plot)
            for p in written:
                view.note(f"wrote {p}")
            for n in notes:
                view.note(n)
    if interrupted:
        raise interrupted
    return doc, 0 if complete else 1


def _trial_pool(opts: TuneOptions, cfg, mf, cache: Path):
    if opts.ray is None:
        return None
    from mergebuild.tune.ray_runner import TrialPool

    return TrialPool(opts.ray or None, opts.parallel or cfg.parallel, cfg.cpus_per_trial, cfg.gpus_per_trial,
                     mf.path, cache, cfg.scorer, opts.no_cache, opts.device)


def _run_on_ray(study, pool, todo: int, deadline, mf, ranges, text: str, cfg, view: TrialView, rounded) -> None:
    from mergebuild.tune.ray_runner import run_parallel

    view.note(f"ray: {pool.size} trials at once")
    run_parallel(study, pool, todo, deadline, lambda trial: substitute(text, suggest(trial, mf, ranges)), cfg.target,
                 _record, lambda t: view.add(trial_doc(t, rounded)),
                 lambda: view.note(f"timeout: {cfg.timeout} s passed, no new trial started"))


def _run_trial(study, runner: Runner, mf, ranges, text: str, cfg):
    from optuna.trial import TrialState

    trial = study.ask()
    try:
        values = suggest(trial, mf, ranges)
        ev = runner.evaluate(substitute(text, values), cfg.target)  # its outputs go to runner.scratch
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            trial.set_user_attr(INTERRUPTED, True)
        else:
            trial.set_user_attr(TRIAL_ATTR, {"error": f"{type(e).__name__}: {e}"})
        study.tell(trial, state=TrialState.FAIL)
        raise
    _record(trial, ev)
    return study.tell(trial, ev.value) if ev.ok else study.tell(trial, state=TrialState.FAIL)


def _record(trial, ev: Evaluation) -> None:
    """One user attribute (one SQLite commit) per trial; display.trial_attrs() reads it."""
    attrs = {"computed": ev.computed, "reused": ev.reused, "seconds": round(ev.seconds, 3),
             "build_seconds": round(ev.build_seconds, 3)}
    if ev.score is not None:
        attrs["score_cached"] = ev.score.cached
        attrs["score_seconds"] = round(ev.score.seconds, 3)
    if ev.error:
        attrs["error"] = ev.error
        attrs["stderr"] = ev.tail
        trial.set_user_attr("error", ev.error)  # also top-level, where optuna's tools show them
        trial.set_user_attr("stderr", ev.tail)
    trial.set_user_attr(TRIAL_ATTR, attrs)


def _write_best(opts: TuneOptions, path: Path, text: str, values: dict, view: TrialView) -> dict:
    best_text = substitute(text, values)
    target = best_path(path)
    _atomic_write(target, best_text)
    view.note(f"wrote {target}")
    out = {"best_file": str(target.absolute())}
    if opts.apply:
        _atomic_write(path, best_text)
        view.note(f"applied the best values to {path}")
        out["applied"] = str(path.absolute())
    return out


def _rebuild(runner: Runner, text: str, target: str, view: TrialView) -> None:
    """Leave the best point in the target's real output (trials wrote theirs in runner.scratch;
    from the cache: only the file is written)."""
    try:
        runner.build(text, target)
    except Exception as e:  # noqa: BLE001 (the study's results stand; say why the file is not the best)
        view.note(f"could not rebuild the best point: {e}")


def _atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    replace(temp, path)


def run_greedy_soup(opts: TuneOptions) -> tuple[dict, int]:
    from mergebuild.tune.soup import greedy_soup

    return greedy_soup(opts)
