"""Small MLP classifiers trained on scikit-learn's bundled digits data, for the whole-model
examples (examples/wholemodel/) and their tests.

The data is `sklearn.datasets.load_digits`: 1797 grey 8x8 images of the digits 0-9 (64 features,
pixel values 0..16, scaled here to 0..1), shipped inside scikit-learn, so nothing is downloaded.
A model is a plain state dict of a sequential MLP, the key layout mergebuild's `mlp` layer spec
reads:

    layers.0.weight [h0, 64]   layers.0.bias [h0]     ReLU
    layers.1.weight [h1, h0]   layers.1.bias [h1]     ReLU
    ...
    layers.L.weight [c, hL-1]  layers.L.bias [c]      logits over `classes`

A model trained on some labels only (`classes=(0, 1, 2, 3, 4)`) has one logit per label it knows,
in that order. Same seed, same bytes: initialisation and batch order come from torch Generators
seeded by `seed` alone, and the split of the data from `split_seed`.

torch and scikit-learn are imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ALL_CLASSES = tuple(range(10))
# three hidden layers of 128: two such MLPs from different seeds show a clear loss barrier at the
# midpoint of their plain average (about 55% test accuracy against 97% at the ends; two layers of
# 128-256 lost only 6-9 points), which weight matching removes
HIDDEN = (128, 128, 128)


@dataclass(frozen=True)
class Split:
    """The digits data as float32 tensors: inputs [n, 64] in 0..1, labels [n] int64."""

    x_train: object
    y_train: object
    x_test: object
    y_test: object

    def only(self, classes) -> "Split":
        """The samples whose label is in `classes` (a disjoint-task model's data)."""
        import torch

        keep_train = torch.isin(self.y_train, torch.tensor(list(classes)))
        keep_test = torch.isin(self.y_test, torch.tensor(list(classes)))
        return Split(self.x_train[keep_train], self.y_train[keep_train],
                     self.x_test[keep_test], self.y_test[keep_test])


def digits(test_size: float = 0.3, split_seed: int = 0) -> Split:
    """scikit-learn's digits, split stratified into train and test."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=test_size, random_state=split_seed, stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Split(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def layer_count(state: dict) -> int:
    """The linear layers of the trunk (`layers.i.weight`; a zipped model's heads are not counted)."""
    return sum(1 for key in state if key.startswith("layers.") and key.endswith(".weight"))


def init_mlp(sizes, seed: int) -> dict:
    """A fresh MLP with torch.nn.Linear's default initialisation (uniform in +-1/sqrt(fan_in))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / fan_in ** 0.5
        state[f"layers.{i}.weight"] = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        state[f"layers.{i}.bias"] = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return state


def forward(state: dict, x, activation: str = "relu"):
    """The MLP's logits; the activation follows every layer but the last."""
    import torch

    n = layer_count(state)
    for i in range(n):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        if i < n - 1:
            x = torch.relu(x) if activation == "relu" else getattr(torch, activation)(x)
    return x


def heads(state: dict) -> list[str]:
    """The head names of a partially zipped model (keys `heads.<name>.layers.i.*`), in key order."""
    return list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("heads.")))


def forward_heads(state: dict, x, activation: str = "relu") -> dict:
    """{head name: logits} of a partially zipped model: the shared trunk (`layers.i.*`), then each
    head's layers (`heads.<name>.layers.j.*`, j continuing the trunk's numbering)."""
    import torch

    act = torch.relu if activation == "relu" else getattr(torch, activation)
    trunk = layer_count(state)
    for i in range(trunk):
        x = act(x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"])
    out = {}
    for name in heads(state):
        prefix = f"heads.{name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        h, depth = x, layer_count(own)
        for j in range(trunk, trunk + depth):
            h = h @ own[f"layers.{j}.weight"].T + own[f"layers.{j}.bias"]
            if j < trunk + depth - 1:
                h = act(h)
        out[name] = h
    return out


def train_mlp(split: Split, hidden=HIDDEN, seed: int = 0, classes=ALL_CLASSES, epochs: int = 15,
              lr: float = 2e-3, batch_size: int = 64, weight_decay: float = 0.0, start: dict | None = None,
              checkpoints: list | None = None) -> dict:
    """An MLP trained with Adam on the samples of `classes` (its head: one logit per class).
    `start`: fine-tune these weights instead of a fresh init (`hidden` is then theirs);
    `checkpoints`: a list that gets a copy of the weights after every epoch (a training run's series).

    Runs on one thread (restored afterwards): these matmuls are too small to share, and 2 busy
    cores ran 4-10x slower with more; one thread also makes the bytes independent of the machine's
    thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(split, hidden, seed, classes, epochs, lr, batch_size, weight_decay, start, checkpoints)
    finally:
        torch.set_num_threads(threads)


def _train(split, hidden, seed, classes, epochs, lr, batch_size, weight_decay, start=None, checkpoints=None) -> dict:
    import torch

    data = split.only(classes) if tuple(classes) != ALL_CLASSES else split
    targets = _relabel(data.y_train, classes)
    fresh = init_mlp((data.x_train.shape[1], *hidden, len(classes)), seed) if start is None else \
        {k: v.detach().clone() for k, v in start.items()}
    state = {k: v.requires_grad_() for k, v in fresh.items()}
    optimizer = torch.optim.Adam(state.values(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed + 1_000_003)
    n = data.x_train.shape[0]
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=order).split(batch_size):
            loss = torch.nn.functional.cross_entropy(forward(state, data.x_train[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if checkpoints is not None:
            checkpoints.append({k: v.detach().clone().contiguous() for k, v in state.items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def features(state: dict, x, activation: str = "relu"):
    """The activations after the last layer of `state`, every layer followed by the activation
    (a model's hidden features, when `state` is its layers without the output layer)."""
    import torch

    act = torch.relu if activation == "relu" else getattr(torch, activation)
    for i in range(layer_count(state)):
        x = act(x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"])
    return x


def accuracy(state: dict, x, y, classes=ALL_CLASSES) -> float:
    """The share of samples whose highest logit is their label (logit j means classes[j])."""
    import torch

    with torch.no_grad():
        return accuracy_of(forward(state, x), y, classes)


def accuracy_of(logits, y, classes=ALL_CLASSES) -> float:
    import torch

    predicted = torch.tensor(list(classes))[logits.argmax(dim=1)]
    return float((predicted == y).float().mean())


def joint_accuracy(logits_per_head, heads_classes, x_labels) -> float:
    """ZipIt!'s joint accuracy over the union of every head's classes: each head's logits are
    turned into probabilities on their own (a softmax per head) and the most probable class of
    any head is the prediction (Stoica et al. 2023, evaluation of multi-head models)."""
    import torch

    best_p, best_class = None, None
    for logits, classes in zip(logits_per_head, heads_classes):
        p, j = logits.softmax(dim=1).max(dim=1)
        c = torch.tensor(list(classes))[j]
        if best_p is None:
            best_p, best_class = p, c
        else:
            better = p > best_p
            best_p, best_class = torch.where(better, p, best_p), torch.where(better, c, best_class)
    return float((best_class == x_labels).float().mean())


def save(state: dict, path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_inputs(x, path) -> Path:
    """Inputs for a data-driven merge (zipit's `data`): one tensor `inputs` [n, features]."""
    return save({"inputs": x}, path)


def _relabel(y, classes):
    """Labels as positions in `classes` (the head's logit index)."""
    import torch

    lookup = torch.full((int(max(ALL_CLASSES)) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
    return lookup[y]
