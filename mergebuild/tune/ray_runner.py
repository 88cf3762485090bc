"""`mergebuild tune --ray`: trials evaluated in parallel on a Ray cluster (docs/cluster.md).

The driver keeps the study: it alone asks Optuna for points and tells it the results, in the
study's storage as today (the SQLite file in the cache), so the sampler sees every trial that is
running and nothing about the study crosses the network but parameters and scores. Each of
`parallel` Ray actors (one worker process each, `cpus_per_trial` / `gpus_per_trial` reserved)
evaluates one trial at a time: the incremental build of the filled-in Mergefile against the
cache, then the scorer, exactly as a local trial (runner.py), with its own folder of trial
outputs. Builds on one cache take its lock in turn (store/cache.py `exclusive`), so work one trial
computed is reused by the next; scorers run side by side.

A worker that dies loses only its trial: it is run again once on a fresh worker, and recorded
as FAIL (error "the Ray worker running it died") if that one dies too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import MergebuildError, UsageError
from mergebuild.execute.ray_cluster import connect, task_error
from mergebuild.tune.runner import Evaluation, Runner
from mergebuild.tune.scoring import Scorer

RETRIES = 1  # runs of a trial again after its worker died
WORKER_ATTR = "ray"  # a trial's user attribute: {pid, node, started, finished, attempts}


class TrialWorker:
    """A Ray actor's body: a Runner of its own (its own trial-output folder) on the shared cache."""

    def __init__(self, mergefile: str, cache: str, scorer, no_cache: bool, device: str | None, slot: int, cwd: str):
        # a python scorer's relative paths mean what they mean in `mergebuild tune` run here
        os.chdir(cwd if os.path.isdir(cwd) else str(Path(mergefile).parent))
        self.runner = Runner(Path(mergefile), Path(cache), Scorer(scorer, None if no_cache else Path(cache)),
                             fresh_cache=no_cache, device=device, tag=f"tune-ray{slot}")

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.runner.close()

    def evaluate(self, text: str, target: str) -> tuple[Evaluation, dict]:
        import ray

        started = time.time()
        ev = self.runner.evaluate(text, target)
        where = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()[:12],
                 "started": round(started, 3), "finished": round(time.time(), 3)}
        return ev, where


@dataclass
class Running:
    trial: object
    worker: object = None
    text: str = ""
    target: str = ""
    attempts: int = 1


class TrialPool:
    """`size` actors; submit a text to a free one, wait for the first to finish."""

    def __init__(self, address: str | None, size: int | None, cpus: float, gpus: float, mergefile: Path,
                 cache: Path, scorer, no_cache: bool, device: str | None):
        self.ray = connect(address)
        fits = _fits(self.ray, cpus, gpus)
        if size is not None and size > fits:
            raise UsageError(f"--parallel {size}: the Ray cluster fits {fits} trial(s) of {cpus:g} CPU"
                             + (f" and {gpus:g} GPU" if gpus else "") + " at once")
        self.size = size or fits
        self._make = lambda slot: self.ray.remote(TrialWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=1).remote(
            str(Path(mergefile).absolute()), str(Path(cache).absolute()), scorer, no_cache, device, slot, os.getcwd())
        self.free = [(slot, self._make(slot)) for slot in range(self.size)]
        self.running: dict = {}  # ObjectRef -> (Running, slot)

    def submit(self, running: Running, text: str, target: str, slot_actor=None) -> None:
        slot, actor = slot_actor or self.free.pop()
        running.worker = actor
        ref = actor.evaluate.remote(text, target)
        running.text, running.target = text, target
        self.running[ref] = (running, slot)

    def wait(self):
        """(Running, Evaluation, where) of the first trial to finish; a trial whose worker died is
        run again (RETRIES) on a new worker, else returned with ev None and where the error."""
        while True:
            [ref], _ = self.ray.wait(list(self.running), num_returns=1)
            running, slot = self.running.pop(ref)
            try:
                ev, where = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                actor = self._make(slot)  # the dead one is gone: a new process in its slot
                if running.attempts <= RETRIES:
                    running.attempts += 1
                    self.submit(running, running.text, running.target, (slot, actor))
                    continue
                self.free.append((slot, actor))
                return running, None, {"error": f"the Ray worker running it died ({type(e).__name__}), "
                                                f"{running.attempts} time(s)"}
            except Exception as e:  # noqa: BLE001 (what the evaluation raised, as a local trial would)
                self.free.append((slot, running.worker))
                raise task_error(self.ray, e) from None
            self.free.append((slot, running.worker))
            where["attempts"] = running.attempts
            return running, ev, where

    def close(self) -> None:
        """Let each idle worker release its trial folder, then end them all."""
        actors = [a for _, a in self.free] + [r.worker for r, _ in self.running.values()]
        try:
            self.ray.get([a.close.remote() for _, a in self.free], timeout=30)
        except Exception:  # noqa: BLE001 (a dead worker's locks went with its process)
            pass
        for actor in actors:
            self.ray.kill(actor)

    def cancel(self) -> None:
        for ref in list(self.running):
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 (close() ends the workers anyway)
                pass
        self.running.clear()


def _fits(ray, cpus: float, gpus: float) -> int:
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    if fits < 1:
        raise UsageError(f"the Ray cluster has no room for a trial of {cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
                         + f" (it has {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU)")
    return fits


def run_parallel(study, pool: TrialPool, todo: int, deadline, make_text, target: str, record, on_done,
                 on_timeout) -> None:
    """Run `todo` trials, `pool.size` at a time: ask, submit, and tell each as it finishes.

    make_text(trial) -> the Mergefile text of the point Optuna suggests; record(trial, ev) stores
    the evaluation's attributes; on_done(frozen trial) shows it. On Ctrl-C every running trial is
    marked interrupted (it does not count) and the interrupt goes on."""
    from optuna.trial import TrialState

    from mergebuild.tune.study import INTERRUPTED, TRIAL_ATTR

    started = 0
    try:
        while started < todo or pool.running:
            while started < todo and pool.free and not deadline.passed():
                trial = study.ask()
                try:
                    text = make_text(trial)
                except MergebuildError as e:
                    trial.set_user_attr(TRIAL_ATTR, {"error": f"{type(e).__name__}: {e}"})
                    on_done(study.tell(trial, state=TrialState.FAIL))
                    started += 1
                    continue
                pool.submit(Running(trial), text, target)
                started += 1
            if started < todo and deadline.passed():
                on_timeout()
                todo = started
            if not pool.running:
                break
            running, ev, where = pool.wait()
            trial = running.trial
            trial.set_user_attr(WORKER_ATTR, where)
            if ev is None:
                trial.set_user_attr(TRIAL_ATTR, {"error": where["error"]})
                trial.set_user_attr("error", where["error"])
                on_done(study.tell(trial, state=TrialState.FAIL))
                continue
            record(trial, ev)
            on_done(study.tell(trial, ev.value) if ev.ok else study.tell(trial, state=TrialState.FAIL))
    except BaseException as e:
        for running, _slot in list(pool.running.values()):
            if isinstance(e, KeyboardInterrupt):
                running.trial.set_user_attr(INTERRUPTED, True)
            study.tell(running.trial, state=TrialState.FAIL)
        pool.cancel()
        raise
