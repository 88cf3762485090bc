"""The diagonal empirical Fisher of a model, computed from the user's loss and data.

Not a method module (no METHODS): the compute of a computed source's statistic
(planning/computed.py plans it, execute/statistics.py runs it only when its key changed).

What is computed, exactly: with theta the model's floating-point tensors (float32, or float64
when the compute dtype is), and b_1 .. b_N the first N = `samples` batches `batches()` yields,

    F = (1/N) * sum_i (d loss(theta, b_i) / d theta) ** 2        elementwise, per tensor

so each batch is one sample: batches of one example give the per-example empirical Fisher of
Matena & Raffel 2022; a batch of B examples contributes the square of its mean gradient. A
tensor the loss does not reach gets a Fisher of 0. The result is float32. torch's global seed is
set to 0 first, so a loss that samples (dropout) is repeatable.
"""

from __future__ import annotations

import math
from pathlib import Path

from mergebuild.errors import BuildError
from mergebuild.mergefile.scripts import load_script, user_modules
from mergebuild.torchlazy import torch

NAME, VERSION = "fisher.diagonal", 1
SCRIPT_PREFIX = "_mergebuild_script_"


def diagonal_fisher(reader, *, samples: int, loss: str, batches: str, names: list, floats: list,
                    where: str, loss_path: Path, batches_path: Path, folders: list, local: list) -> dict:
    """The Fisher of every float tensor of input 0, {name: float32 tensor}. `loss` and `batches`
    are the functions as written (in the key), the paths where they are; `folders` go on
    sys.path while the scripts run, `local` are the project's module files they import."""
    state = {n: reader.load(0, n) for n in names}
    wanted = torch.float64 if any(t.dtype == torch.float64 for t in state.values()) else torch.float32
    params = [n for n in floats]
    for n in params:
        state[n] = state[n].detach().to(wanted).clone().requires_grad_(True)
    with user_modules(folders, local, SCRIPT_PREFIX):
        loss_fn = _function(loss_path, loss, where, "loss")
        batches_fn = _function(batches_path, batches, where, "batches")
        torch.manual_seed(0)
        sums = {n: torch.zeros_like(state[n], dtype=wanted) for n in params}
        stream = _call(batches_fn, (), where, f"batches ({batches})")
        try:
            stream = iter(stream)
        except TypeError:
            raise BuildError(f"[{where}] batches ({batches}) returned {type(stream).__name__}, not an iterable "
                             "of batches") from None
        for i in range(samples):
            batch = _next(stream, i, samples, where, batches)
            value = _call(loss_fn, (state, batch), where, f"loss ({loss}) on batch {i}")
            _check_scalar(value, i, where, loss)
            grads = torch.autograd.grad(value, [state[n] for n in params], allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n].add_(g.detach() * g.detach())
    out = {}
    for n in params:
        fisher = (sums[n] / samples).to(torch.float32)
        if not bool(torch.isfinite(fisher).all()):
            raise BuildError(f"[{where}] the Fisher of {n!r} holds NaN or Inf (the loss's gradients overflow: "
                             "check the loss, or the model's values)")
        out[n] = fisher
    return out


def _function(path: Path, written: str, where: str, field: str):
    """The function a script defines (planning checked it is defined: this runs the script)."""
    name = written.rpartition(":")[2]
    module = _load_script(path, where, field)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BuildError(f"[{where}] {field}: {written} is not a function once {path.name} runs")
    return fn


def _load_script(path: Path, where: str, field: str):
    try:
        return load_script(path, SCRIPT_PREFIX)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (the user's script: one line, exit 1)
        raise BuildError(f"[{where}] {field}: running {path.name} raised {type(e).__name__}: {e}") from None


def _call(fn, args, where: str, what: str):
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (the user's code: one line, exit 1)
        raise BuildError(f"[{where}] {what} raised {type(e).__name__}: {e}") from None


def _next(stream, i: int, samples: int, where: str, batches: str):
    try:
        return next(stream)
    except StopIteration:
        raise BuildError(f"[{where}] batches ({batches}) yielded {i} batches, fewer than samples = {samples}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001
        raise BuildError(f"[{where}] batches ({batches}) raised {type(e).__name__}: {e} (batch {i})") from None


def _check_scalar(value, i: int, where: str, loss: str) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {list(value.shape)}"
        raise BuildError(f"[{where}] loss ({loss}) returned {what} on batch {i}: it must return a scalar tensor")
    if not value.requires_grad:
        raise BuildError(f"[{where}] loss ({loss}) returned a value that does not depend on the state dict "
                         f"(batch {i}): compute it from the tensors it is given")
    if not math.isfinite(float(value.detach())):
        raise BuildError(f"[{where}] loss ({loss}) is {float(value.detach())} on batch {i}")
