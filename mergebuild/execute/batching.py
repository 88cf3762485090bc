"""Small tensors travel and compute together.

A checkpoint is mostly small tensors by count (SD1.5: 726 of its 1143 tensors are biases, norms
and small convs of at most 64K elements), and every tensor costs the executor the same fixed
overhead: a read and a write future, a method call of a few torch ops, and on a GPU a staging
copy, a transfer each way and a synchronisation. An elementwise method gives the same result on
the concatenation of its inputs as on each tensor alone, so small tensors that share a method,
parameters and dtypes are gathered into one Batch: one upload per input, one method call, one
download. Each tensor keeps its own cache key, digest and blob; only the trip is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mergebuild.planning.planner import DIRTY, TensorTask

SMALL = 1 << 16  # elements: tensors up to this size may share a batch
BATCH = 1 << 22  # elements in one batch at most (the size of a compute chunk)
LAG = 64 << 20  # bytes of other results after which an open batch goes anyway


@dataclass
class Batch:
    tasks: list[TensorTask] = field(default_factory=list)
    numel: int = 0
    opened_at: int = 0  # bytes of results before its first member

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def spans(self):
        """(task, first element, element count) for each member, in the concatenation's order."""
        offset = 0
        for task in self.tasks:
            n = math.prod(task.shape)
            yield task, offset, n
            offset += n


def group_small(tasks: list[TensorTask], input_dtypes) -> list:
    """The tasks in order, with the small batchable ones gathered into Batches.

    `input_dtypes(task)` gives the stored dtype of each input. A batch is emitted where it
    fills up, or once LAG bytes of other tensors have passed since its first member: the output's
    data hash follows the writes in file order, and a batch held back to the end would stall it
    until the commit. A batch of one stays a task."""
    units: list = []
    open_batches: dict[tuple, Batch] = {}
    passed = 0  # bytes of results so far
    for task in tasks:
        passed += task.nbytes
        signature = _signature(task, input_dtypes) if _batchable(task) else None
        if signature is None:
            units.append(task)
        else:
            n = math.prod(task.shape)
            batch = open_batches.get(signature)
            if batch is not None and batch.numel + n > BATCH:
                units.append(_unit(open_batches.pop(signature)))
                batch = None
            if batch is None:
                batch = open_batches[signature] = Batch(opened_at=passed)
            batch.tasks.append(task)
            batch.numel += n
        for signature in [s for s, b in open_batches.items() if passed - b.opened_at > LAG]:
            units.append(_unit(open_batches.pop(signature)))
    units += [_unit(b) for b in open_batches.values()]
    return units


def _batchable(task: TensorTask) -> bool:
    method = task.method
    return (task.state == DIRTY and method is not None and method.elementwise and not method.takes_key
            and task.channels is None and not task.clip and bool(task.inputs)
            and 0 < math.prod(task.shape) <= SMALL)


def _signature(task: TensorTask, input_dtypes) -> tuple:
    params = repr(sorted(task.params.items()))  # sorted by name: names are unique
    return task.method.name, params, task.dtype, tuple(input_dtypes(task))


def _unit(batch: Batch):
    return batch.tasks[0] if len(batch.tasks) == 1 else batch
