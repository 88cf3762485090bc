"""The architecture files' permutation specs keep the function: a model with any permutation the
spec allows computes exactly what the original does. Each model is run here, in float64: blocks
of the SD1 and SDXL UNets (resnet with GroupNorm and the time embedding, a spatial transformer
with self and cross attention heads and a GEGLU feed-forward, SDXL's label embedding), Llama MLP
blocks, and a sequential MLP whose spec is derived from its keys. A control test shows the
check fails for a permutation the spec forbids (across GroupNorm groups)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergebuild.layouts.blocks import architectures
from mergebuild.layouts.permutations import Group, permutation_groups, tensor_axes
from mergebuild.methods.rebasin import apply_permutations
from mergebuild.testing.fabricate import layout_keys, llama_keys

UNET = "model.diffusion_model."


def random_permutation(group: Group, gen: torch.Generator) -> torch.Tensor:
    """Any permutation the group allows: blocks kept whole (moved only if move_blocks)."""
    s = group.size // group.blocks
    order = torch.randperm(group.blocks, generator=gen) if group.move_blocks else torch.arange(group.blocks)
    return torch.cat([int(h) * s + torch.randperm(s, generator=gen) for h in order])


def permuted(sd: dict, groups: dict[str, Group], perms: dict[str, torch.Tensor]) -> dict:
    axes = tensor_axes(groups)
    out = dict(sd)
    for key, entries in axes.items():
        if key in sd:
            out[key] = apply_permutations(sd[key], [perms[g] for g, _, _ in entries], [[a, r] for _, a, r in entries])
    return out


def random_weights(shapes: dict, gen: torch.Generator, prefixes: tuple[str, ...]) -> dict:
    sd = {}
    for key, shape in shapes.items():
        if key.startswith(prefixes):
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
            if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "in_layers.0.weight",
                             "out_layers.0.weight")):
                sd[key] = 1 + 0.5 * sd[key]
    return sd


# the blocks of an LDM UNet, as its code computes them ----------------------------------------
def linear(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def resnet(sd, p, x, emb):
    h = F.conv2d(F.silu(F.group_norm(x, 32, sd[p + ".in_layers.0.weight"], sd[p + ".in_layers.0.bias"])),
                 sd[p + ".in_layers.2.weight"], sd[p + ".in_layers.2.bias"], padding=1)
    h = h + linear(sd, p + ".emb_layers.1", F.silu(emb))[:, :, None, None]
    h = F.group_norm(h, 32, sd[p + ".out_layers.0.weight"], sd[p + ".out_layers.0.bias"])
    h = F.conv2d(F.silu(h), sd[p + ".out_layers.3.weight"], sd[p + ".out_layers.3.bias"], padding=1)
    skip = sd.get(p + ".skip_connection.weight")
    return (x if skip is None else F.conv2d(x, skip, sd[p + ".skip_connection.bias"])) + h


def attention(sd, p, x, context, heads):
    q, k, v = x @ sd[p + ".to_q.weight"].T, context @ sd[p + ".to_k.weight"].T, context @ sd[p + ".to_v.weight"].T
    n = heads(q.shape[-1])
    split = lambda t: t.reshape(t.shape[0], t.shape[1], n, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return linear(sd, p + ".to_out.0", out.transpose(1, 2).reshape(x.shape))


def transformer(sd, p, x, context, heads):
    b, c, hh, ww = x.shape
    h = F.group_norm(x, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"])
    w_in = sd[p + ".proj_in.weight"]
    if w_in.dim() == 4:
        h = F.conv2d(h, w_in, sd[p + ".proj_in.bias"]).flatten(2).transpose(1, 2)
    else:
        h = linear(sd, p + ".proj_in", h.flatten(2).transpose(1, 2))
    i = 0
    while f"{p}.transformer_blocks.{i}.norm1.weight" in sd:
        t = f"{p}.transformer_blocks.{i}"
        norm = lambda name, y: F.layer_norm(y, y.shape[-1:], sd[f"{t}.{name}.weight"], sd[f"{t}.{name}.bias"])  # noqa: E731
        h = attention(sd, t + ".attn1", norm("norm1", h), norm("norm1", h), heads) + h
        h = attention(sd, t + ".attn2", norm("norm2", h), context, heads) + h
        a, gate = linear(sd, t + ".ff.net.0.proj", norm("norm3", h)).chunk(2, dim=-1)
        h = linear(sd, t + ".ff.net.2", a * F.gelu(gate)) + h
        i += 1
    w_out = sd[p + ".proj_out.weight"]
    if w_out.dim() == 4:
        h = F.conv2d(h.transpose(1, 2).reshape(b, -1, hh, ww), w_out, sd[p + ".proj_out.bias"])
    else:
        h = linear(sd, p + ".proj_out", h).transpose(1, 2).reshape(b, -1, hh, ww)
    return h + x


def time_embedding(sd, t_emb, y=None):
    emb = linear(sd, UNET + "time_embed.2", F.silu(linear(sd, UNET + "time_embed.0", t_emb)))
    if y is not None:
        emb = emb + linear(sd, UNET + "label_emb.0.2", F.silu(linear(sd, UNET + "label_emb.0.0", y)))
    return emb


def sd1_blocks(sd, x, t_emb, context):
    heads = lambda inner: 8  # noqa: E731 - SD1: 8 heads everywhere
    emb = time_embedding(sd, t_emb)
    h = transformer(sd, UNET + "input_blocks.1.1", resnet(sd, UNET + "input_blocks.1.0", x, emb), context, heads)
    h = resnet(sd, UNET + "input_blocks.4.0", h, emb)  # 1x1 skip connection: more channels out
    return transformer(sd, UNET + "input_blocks.4.1", h, context, heads)


def sdxl_blocks(sd, x, t_emb, y, context):
    heads = lambda inner: inner // 64  # noqa: E731 - SDXL: heads of 64 dims
    emb = time_embedding(sd, t_emb, y)
    h = resnet(sd, UNET + "input_blocks.4.0", x, emb)
    return transformer(sd, UNET + "input_blocks.4.1", h, context, heads)


def unet_groups(arch: str, layout: str, shrink: int):
    shapes = {k: s for k, (s, _) in layout_keys(layout, shrink).items()}
    groups = permutation_groups(architectures()[arch], {k: v for k, v in shapes.items() if k.startswith(UNET)})
    return shapes, groups


def check_same(f, sd, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    perms = {name: random_permutation(g, gen) for name, g in groups.items()}
    moved = sum(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    assert moved >= len(perms) - 1  # the check is not on identities
    before, after = f(sd), f(permuted(sd, groups, perms))
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_sd1_unet_blocks_compute_the_same_function_under_the_spec():
    shapes, groups = unet_groups("sd1", "sd1-ldm", 10)
    kinds = {name.rsplit(".", 1)[-1] for name in groups}
    assert {"hidden", "stream", "qk", "vo", "ff", "emb", "mlp"} <= kinds
    gen = torch.Generator().manual_seed(1)
    sd = random_weights(shapes, gen, (UNET,))
    x = torch.randn(2, 32, 4, 4, generator=gen, dtype=torch.float64)
    t_emb = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 5, shapes[UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1],
                          generator=gen, dtype=torch.float64)
    check_same(lambda s: sd1_blocks(s, x, t_emb, context), sd, groups)


def test_sdxl_unet_blocks_compute_the_same_function_under_the_spec():
    shapes, groups = unet_groups("sdxl", "sdxl-sgm", 5)  # 640 -> 128 channels: two heads of 64
    assert any(name.endswith("label_emb.mlp") for name in groups)
    gen = torch.Generator().manual_seed(2)
    sd = random_weights(shapes, gen, (UNET + "input_blocks.4.", UNET + "time_embed.", UNET + "label_emb."))
    x = torch.randn(1, shapes[UNET + "input_blocks.4.0.in_layers.0.weight"][0], 4, 4, generator=gen, dtype=torch.float64)
    t_emb = torch.randn(1, shapes[UNET + "time_embed.0.weight"][1], generator=gen, dtype=torch.float64)
    y = torch.randn(1, shapes[UNET + "label_emb.0.0.weight"][1], generator=gen, dtype=torch.float64)
    context = torch.randn(1, 3, shapes[UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"][1],
                          generator=gen, dtype=torch.float64)
    used = {n: g for n, g in groups.items() if all(a.key in sd for a in g.axes)}
    assert len(used) >= 8
    check_same(lambda s: sdxl_blocks(s, x, t_emb, y, context), sd, used)


def test_a_permutation_across_groupnorm_groups_changes_the_function():
    """The control: the same check catches a permutation the spec does not allow."""
    shapes, groups = unet_groups("sd1", "sd1-ldm", 10)
    gen = torch.Generator().manual_seed(3)
    sd = random_weights(shapes, gen, (UNET,))
    x = torch.randn(2, 32, 4, 4, generator=gen, dtype=torch.float64)
    t_emb = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 5, 76, generator=gen, dtype=torch.float64)
    name = UNET + "input_blocks.4.0.hidden"
    free = Group(name, groups[name].size, groups[name].axes)  # no blocks: units may cross groups
    perms = {name: torch.randperm(free.size, generator=gen)}
    before = sd1_blocks(sd, x, t_emb, context)
    after = sd1_blocks(permuted(sd, {name: free}, perms), x, t_emb, context)
    assert (after - before).abs().max() > 1e-3


def test_llama_mlp_blocks_compute_the_same_function():
    shapes = {k: s for k, (s, _) in llama_keys(layers=2, hidden=16, intermediate=24).items()}
    groups = permutation_groups(architectures()["llama"], shapes)
    assert sorted(groups) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    gen = torch.Generator().manual_seed(4)
    sd = random_weights(shapes, gen, ("model.layers.",))
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)

    def mlps(s):
        h = x
        for i in range(2):
            p = f"model.layers.{i}.mlp"
            h = h + F.silu(h @ s[p + ".gate_proj.weight"].T) * (h @ s[p + ".up_proj.weight"].T) @ s[p + ".down_proj.weight"].T
        return h

    check_same(mlps, sd, groups)


def sequential_mlp(sizes=(8, 16, 12, 3), norm=True, seed=5):
    gen = torch.Generator().manual_seed(seed)
    sd, i = {}, 0
    for n_in, n_out in zip(sizes, sizes[1:]):
        sd[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        sd[f"layers.{i}.bias"] = torch.randn(n_out, generator=gen, dtype=torch.float64)
        if norm and i == 0:  # a LayerNorm after the first layer: its weight and bias follow the units
            sd["layers.1.weight"] = 1 + 0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64)
            sd["layers.1.bias"] = torch.randn(n_out, generator=gen, dtype=torch.float64)
        i += 2 if not (norm and i == 0) else 3
    return sd


def run_sequential(sd, x):
    h = x
    layers = sorted({int(k.split(".")[1]) for k in sd})
    for i in layers:
        w, b = sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]
        if w.dim() == 1:
            h = F.layer_norm(h, h.shape[-1:], w, b)
        else:
            h = F.linear(h, w, b)
            if i != layers[-1]:
                h = torch.relu(h)
    return h


def test_a_sequential_mlp_spec_is_derived_from_its_keys_and_keeps_the_function():
    sd = sequential_mlp()
    groups = permutation_groups(architectures()["generic"], {k: tuple(v.shape) for k, v in sd.items()})
    assert sorted(groups) == ["layers.0", "layers.3"]
    assert {a.key for a in groups["layers.0"].axes} == {"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                                          "layers.1.bias", "layers.3.weight"}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_same(lambda s: run_sequential(s, x), sd, groups)


@pytest.mark.parametrize("shapes, words", [
    ({"layers.0.weight": (16, 8), "layers.0.bias": (16,), "layers.2.weight": (12, 10)}, "not a sequential chain"),
    ({"layers.0.weight": (16, 8)}, "fewer than two weight"),
])
def test_a_model_the_derived_spec_does_not_fit_is_one_clear_error(shapes, words):
    with pytest.raises(ValueError, match=words):
        permutation_groups(architectures()["generic"], shapes)


def test_a_unet_whose_channels_do_not_fall_in_groupnorm_groups_is_refused():
    shapes = {k: s for k, (s, _) in layout_keys("sd1-ldm", 32).items() if k.startswith(UNET)}  # 320 -> 10 channels
    with pytest.raises(ValueError, match="do not fall in"):
        permutation_groups(architectures()["sd1"], shapes)
