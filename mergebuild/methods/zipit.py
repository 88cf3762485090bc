"""zipit: merge two models trained on different tasks (Stoica et al. 2023, ZipIt!).

A two-phase merge on a model with a layer spec (layouts/layer_specs.py: a sequential chain of
linear layers L0 .. Ln). The statistic runs both models on the `data` inputs (zipit_data.py),
layer by layer, correlates the two models' features after each zipped layer's activation and
zips them (zipit_match.py): a merge matrix M_i [w, 2w] and an unmerge matrix U_i [2w, w] per
layer, cached by the digests of the weights it ran, the data's digest, alpha, beta and the
activation. Each output tensor's task then reads its layers' matrices (M = [M_A | M_B] by
columns, U = [U_A ; U_B] by rows, U_-1 = identity):

    zipped layer i:  W_i = M_A,i W_A,i U_A,i-1 + M_B,i W_B,i U_B,i-1     b_i = M_A,i b_A,i + M_B,i b_B,i

Full zipping (`partial` = 0) zips every hidden layer, and the last layer reads the zipped
features: `head = "average"` averages the two unmerged output layers (models with the same
outputs), `head = "concat"` keeps both, A's outputs then B's (models of different label sets:
one classifier over the union). Partial zipping (`partial` = k) zips L0 .. Lk-1 only: the shared
trunk keeps its keys, and each input keeps the rest of its layers as its own head, under
`heads.<input name>.<key>`, its first layer reading the trunk through its U_k-1. One file.
"""

from __future__ import annotations

from functools import partial

from mergebuild.layouts.layer_specs import ACTIVATIONS, layer_spec, sequential_chain
from mergebuild.methods.registry import REQUIRED, STATISTIC, Method, Param, PlannedStatistic, PlannedTensor
from mergebuild.torchlazy import torch

STATISTIC_NAME = "zipit.matching"
STATISTIC_VERSION = 1
HEADS = ("average", "concat")
SPEC = "spec"  # activation: the one the architecture's layer spec declares


def zipit(*tensors, role: str, side: int = 0):
    """One tensor of the zipped model, from A's and B's and the matrices its layers read."""
    if role == "copy":
        return tensors[0]
    if role == "unmerge":  # a head's first layer: its own model's half of U
        w, u = tensors
        return w @ _half(u, side, rows=True)
    if role in ("average", "concat"):  # the output layer's bias (full zipping)
        a, b = tensors
        return (a + b) / 2 if role == "average" else torch.cat([a, b])
    if role in ("average_unmerged", "concat_unmerged"):  # the output layer's weight
        a, b, u = tensors
        a, b = a @ _half(u, 0, rows=True), b @ _half(u, 1, rows=True)
        return (a + b) / 2 if role == "average_unmerged" else torch.cat([a, b])
    a, b, m = tensors[:3]
    if role == "merge_unmerged":  # a zipped layer's weight after another zipped layer
        u = tensors[3]
        a, b = a @ _half(u, 0, rows=True), b @ _half(u, 1, rows=True)
    elif role != "merge":
        raise ValueError(f"zipit: unknown tensor role {role!r}")
    return _half(m, 0, rows=False) @ a + _half(m, 1, rows=False) @ b


def _half(matrix, side: int, rows: bool):
    """A's (side 0) or B's (1) half of a merge matrix's columns or an unmerge matrix's rows."""
    n = (matrix.shape[0] if rows else matrix.shape[1]) // 2
    part = slice(0, n) if side == 0 else slice(n, 2 * n)
    return matrix[part] if rows else matrix[:, part]


# -- planning ---------------------------------------------------------------------------------

def _chain(ctx):
    """The linear layers of A by its architecture's layer spec; B must have the same keys and shapes."""
    spec = layer_spec(ctx.arch)
    if spec is None:
        raise ValueError(f"architecture {ctx.arch.name} declares no layer spec (`layer_spec` in its architecture "
                         "file): zipit runs the models, and needs to know how")
    shapes = {n: tuple(ctx.ref(0, n).shape) for n in ctx.names(0)}
    chain = sequential_chain(shapes)
    theirs = {n: tuple(ctx.ref(1, n).shape) for n in ctx.names(1)}
    for key in shapes.keys() | theirs.keys():
        if shapes.get(key) != theirs.get(key):
            a, b = ctx.spec.inputs
            say = lambda s: "no such key" if s is None else str(list(s))  # noqa: E731
            raise ValueError(f"key {key!r}: {a} {say(shapes.get(key))} vs {b} {say(theirs.get(key))}: zipit merges "
                             "two models of the same shape")
    return chain, spec


def _settings(ctx, layers: int, spec: dict) -> dict:
    params = ctx.spec.params
    alpha, beta = _number(params, "alpha", ALPHA.default), _number(params, "beta", BETA.default)
    if alpha < 0 or not 0 <= beta <= 1:
        raise ValueError(f"alpha must be 0 or more and beta within 0..1, got alpha = {alpha}, beta = {beta}")
    depth = params.get("partial", 0)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"partial is one whole number for the whole model (how many layers to zip), got {depth!r}")
    if not 0 <= depth <= layers - 1:
        raise ValueError(f"partial = {depth}: the model has {layers} linear layers, so it zips 1 to {layers - 1} "
                         "of them (0: all, one model out)")
    if depth and ctx.spec.inputs[0] == ctx.spec.inputs[1]:
        raise ValueError("partial zipping writes one head per input, under its name: the inputs must differ")
    activation = params.get("activation", SPEC)
    return {"alpha": alpha, "beta": beta, "zipped": depth or layers - 1, "partial": bool(depth),
            "head": params.get("head", HEAD.default),
            "activation": spec.get("activation", "relu") if activation == SPEC else activation}


def _number(params: dict, name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is one number for the whole model (the matching is global), got {value!r}")
    return float(value)


def _statistic(ctx) -> PlannedStatistic:
    from mergebuild.methods.zipit_data import data_digest

    chain, spec = _chain(ctx)
    settings = _settings(ctx, len(chain), spec)
    ctx.plan_zip = chain, settings  # plan_tasks reads them back
    base = ctx.plan.mergefile.path.parent
    cache = getattr(ctx.plan, "cache", None)
    digest = data_digest(ctx.spec.params["data"], base, chain[0].inputs, cache.index if cache is not None else None)
    zipped = chain[:settings["zipped"]]
    outputs = {}
    for i, layer in enumerate(zipped):
        outputs[f"merge.{i}"] = ("F32", (layer.outputs, 2 * layer.outputs))
        outputs[f"unmerge.{i}"] = ("F32", (2 * layer.outputs, layer.outputs))
    compute = partial(_compute, data=ctx.spec.params["data"], base=str(base), digest=digest,
                      where=f"merges.{ctx.spec.name}")
    return PlannedStatistic(
        STATISTIC_NAME, STATISTIC_VERSION, compute,
        reads=tuple((i, key) for i in (0, 1) for layer in zipped for key in layer.keys),
        outputs=outputs,
        params={"layers": [[layer.weight, layer.bias] for layer in zipped], "activation": settings["activation"],
                "alpha": settings["alpha"], "beta": settings["beta"]},
        data={"data": digest})


def _planned(ctx):
    """(chain, settings): the statistic's, or found again when a merge is planned without it."""
    found = getattr(ctx, "plan_zip", None)
    if found is None:
        chain, spec = _chain(ctx)
        found = chain, _settings(ctx, len(chain), spec)
    return found


def _tasks(ctx):
    chain, settings = _planned(ctx)
    zipped = settings["zipped"]
    for i, layer in enumerate(chain[:zipped]):
        u = ((STATISTIC, f"unmerge.{i - 1}"),) if i else ()
        m = (STATISTIC, f"merge.{i}")
        yield _task(ctx, layer.weight, (layer.outputs, layer.inputs), ((0, layer.weight), (1, layer.weight), m) + u,
                    "merge_unmerged" if i else "merge")
        if layer.bias:
            yield _task(ctx, layer.bias, (layer.outputs,), ((0, layer.bias), (1, layer.bias), m), "merge")
    u = (STATISTIC, f"unmerge.{zipped - 1}")
    if not settings["partial"]:
        last, head = chain[-1], settings["head"]
        rows = last.outputs * (2 if head == "concat" else 1)
        yield _task(ctx, last.weight, (rows, last.inputs), ((0, last.weight), (1, last.weight), u), f"{head}_unmerged")
        if last.bias:
            yield _task(ctx, last.bias, (rows,), ((0, last.bias), (1, last.bias)), head)
        return
    for side, name in enumerate(ctx.spec.inputs):
        for j, layer in enumerate(chain[zipped:]):
            for key in layer.keys:
                first_weight = j == 0 and key == layer.weight
                inputs = ((side, key), u) if first_weight else ((side, key),)
                yield _task(ctx, key, tuple(ctx.ref(side, key).shape), inputs, "unmerge" if first_weight else "copy",
                            side=side, out=f"heads.{name}.{key}")


def _task(ctx, key: str, shape, inputs, role: str, side: int = 0, out: str | None = None) -> PlannedTensor:
    params = {"role": role, **({"side": side} if role == "unmerge" else {})}
    return PlannedTensor(out or key, ctx.out_dtype(ctx.ref(0, key).dtype), tuple(shape), inputs, params)


def _compute(reader, *, layers: list, activation: str, alpha: float, beta: float, data: str, base: str,
             digest: str, where: str) -> dict:
    """The merge and unmerge matrices of every zipped layer (runs in the executor)."""
    from mergebuild.methods.zipit_data import input_batches
    from mergebuild.methods.zipit_match import FeatureMoments, zip_features

    width = reader.shape(0, layers[0][0])[1]
    moments = [FeatureMoments(2 * reader.shape(0, weight)[0]) for weight, _ in layers]
    with torch.no_grad():
        for batch in input_batches(data, base, digest, width, where):
            features = [_features(reader, side, layers, activation, batch) for side in (0, 1)]
            for i, moment in enumerate(moments):
                moment.add(torch.cat([features[0][i], features[1][i]], dim=1).double().numpy())
    out = {}
    for i, moment in enumerate(moments):
        merge, unmerge = zip_features(moment.correlation(), alpha, beta)
        out[f"merge.{i}"] = torch.tensor(merge, dtype=torch.float32)
        out[f"unmerge.{i}"] = torch.tensor(unmerge, dtype=torch.float32)
    return out


def _features(reader, side: int, layers: list, activation: str, x) -> list:
    """The model's features after each layer's activation, on inputs x."""
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
           "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda t: t}[activation]
    out = []
    for weight, bias in layers:
        w = reader.load(side, weight)
        x = x.to(w.dtype) @ w.T
        if bias is not None:
            x = x + reader.load(side, bias)
        x = act(x)
        out.append(x)
    return out


DATA = Param("data", str, REQUIRED, "the inputs both models run on: \"inputs.safetensors\" (one 2-D tensor "
             "[samples, features]) or \"script.py:function\" (a function returning batches)")
PARTIAL = Param("partial", int, 0, "zip the first k linear layers only; the rest stay one head per input, under "
                "heads.<input>. (0: zip them all, one model out)")
ALPHA = Param("alpha", float, 0.5, "ZipIt!'s alpha: how much a merged feature's correlations shrink before it may "
              "merge again (0: each feature merges at most once)")
BETA = Param("beta", float, 1.0, "ZipIt!'s beta: the share of merges each model may make within itself "
             "(0: only across the models)")
HEAD = Param("head", str, "average", "full zipping's output layer: average A's and B's (same outputs), or concat "
             "them (A's outputs, then B's: different label sets)", choices=HEADS)
ACTIVATION = Param("activation", str, SPEC, "what follows each layer but the last when the models run on the data "
                   "(spec: what the architecture's layer spec says)", choices=(SPEC, *ACTIVATIONS))

FOLLOWS = "Stoica et al. 2023 (ZipIt!), matching as in the authors' match_tensors_zipit"
METHODS = [
    Method("zipit", 1, zipit, ("A", "B"), (DATA, PARTIAL, ALPHA, BETA, HEAD, ACTIVATION), __doc__.split("\n\n")[0],
           plan_tasks=_tasks, statistic=_statistic),
]
