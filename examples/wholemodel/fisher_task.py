"""The loss and the data of the Fisher example (fisher.py): named by its Mergefile's computed
sources, `loss = "fisher_task.py:loss"`, `batches = "fisher_task.py:batches_a"`.

Two Fishers of a model, each from the first examples of its own task's training digits:
- the empirical Fisher: `loss` with `batches_a` / `batches_b`, one (example, true label) per
  batch: the mean of the squared per-example gradients;
- the model's Fisher, exactly: `model_loss` with `model_batches_a` / `model_batches_b`, which
  yield each example once per label y (10 batches per example); the loss is
  sqrt(p(y|x)) * cross-entropy(y) with p held fixed, so its squared gradient is
  p(y|x) * g_y^2 and the mean over the batches is (1/10) * E_x sum_y p(y|x) g_y^2: the model's
  Fisher (Matena & Raffel's), a tenth of it; the scale is the same for every model, so Fisher
  merging does not see it.
"""

import torch

from mergebuild.testing import digits

TASKS = {"a": (0, 1, 2, 3, 4), "b": (5, 6, 7, 8, 9)}


def loss(state, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(digits.forward(state, x), y)


def model_loss(state, batch):
    x, y = batch
    logits = digits.forward(state, x)
    p = logits.detach().softmax(dim=1).gather(1, y[:, None])[:, 0]
    return (p.sqrt() * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum()


def _examples(task: str):
    data = digits.digits().only(TASKS[task])
    for i in range(data.x_train.shape[0]):
        yield data.x_train[i:i + 1], data.y_train[i:i + 1]


def batches_a():
    return _examples("a")


def batches_b():
    return _examples("b")


def _every_label(task: str):
    for x, _ in _examples(task):
        for label in range(10):
            yield x, torch.tensor([label])


def model_batches_a():
    return _every_label("a")


def model_batches_b():
    return _every_label("b")
