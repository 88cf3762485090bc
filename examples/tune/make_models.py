"""Train the example's classifiers: all from ONE shared initialisation, on scikit-learn's bundled
digits (CPU, a few seconds, no download), saved as safetensors in models/.

- base:        the shared initialisation, briefly trained on 200 training images;
- low, high:   fine-tuned from base on the digits 0-4 only, and 5-9 only (two specialists:
               task arithmetic / TIES material);
- ft1 .. ft4:  fine-tuned from base on all training images, each with its own learning rate,
               shuffling and label smoothing (model soup ingredients).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from digits import save_splits, split

HERE = Path(__file__).resolve().parent


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def train(net: MLP, x, y, *, epochs: int, lr: float, seed: int, smoothing: float = 0.0) -> MLP:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=g).split(32):
            opt.zero_grad()
            loss_fn(net(x[batch]), y[batch]).backward()
            opt.step()
    return net


def save(net: MLP, name: str) -> None:
    path = HERE / "models" / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    print(path.relative_to(HERE))


def main() -> None:
    print(save_splits().relative_to(HERE))
    x, y = split("train")
    torch.manual_seed(0)
    base = train(MLP(), x[:200], y[:200], epochs=3, lr=0.05, seed=0)
    save(base, "base")
    state = base.state_dict()

    def from_base() -> MLP:
        net = MLP()
        net.load_state_dict(state)
        return net

    for name, keep in (("low", y < 5), ("high", y >= 5)):
        save(train(from_base(), x[keep], y[keep], epochs=20, lr=0.05, seed=1), name)
    for i, (lr, smoothing) in enumerate(((0.02, 0.0), (0.05, 0.1), (0.1, 0.0), (0.03, 0.2)), start=1):
        save(train(from_base(), x, y, epochs=15, lr=lr, seed=10 + i, smoothing=smoothing), f"ft{i}")


if __name__ == "__main__":
    main()
