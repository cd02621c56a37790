"""DiT model: shapes, the paper's block designs, the release's parameter layout, init invariants, label dropout."""

import math

import numpy as np
import pytest
import torch

from helpers import randomize_
from scaling.models import (BLOCKS, FAMILY_MODELS, MODELS, Attention, CrossAttention, DiT, LabelEmbedder, ModelConfig,
                            PatchEmbed, TimestepEmbedder, build_model, images_per_forward, sincos_pos_embed_2d)

PAPER = ("dit_s", "dit_b", "dit_l", "dit_xl")
LAPTOP = ("laptop_s", "laptop_b", "laptop_l", "laptop_xl")


def inputs(n: int, channels: int, size: int, num_classes: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------- presets and validation


def test_presets_paper_and_laptop_pattern():
    assert MODELS["dit_s"] == dict(depth=12, hidden_size=384, num_heads=6)
    assert MODELS["dit_b"] == dict(depth=12, hidden_size=768, num_heads=12)
    assert MODELS["dit_l"] == dict(depth=24, hidden_size=1024, num_heads=16)
    assert MODELS["dit_xl"] == dict(depth=28, hidden_size=1152, num_heads=16)
    isoflop = ("laptop_xxxs", "laptop_xxs", "laptop_xs", "laptop_m")  # sizes for isoFLOP profiles, not in the grid
    assert set(MODELS) == set(PAPER + LAPTOP + isoflop)
    assert FAMILY_MODELS == {"paper": PAPER, "laptop": LAPTOP}
    sizes = [MODELS[n] for n in ("laptop_xxxs", "laptop_xxs", "laptop_xs", "laptop_s", "laptop_m", "laptop_b")]
    gflops = [m["depth"] * m["hidden_size"] ** 2 for m in sizes]  # the blocks' cost: strictly increasing, ~2x apart
    assert all(1.5 < b / a < 3.5 for a, b in zip(gflops, gflops[1:])), gflops
    assert all(m["hidden_size"] >= 4 * 4 * 1 for m in sizes)  # a patch-4 token fits the width
    for paper, laptop in zip(PAPER, LAPTOP):
        p, s = MODELS[paper], MODELS[laptop]
        assert s["depth"] == round(p["depth"] / 4)
        assert s["hidden_size"] % 16 == 0 and abs(s["hidden_size"] - p["hidden_size"] / 6) <= 8  # width/6
        assert s["hidden_size"] // s["num_heads"] == 16 and s["hidden_size"] % s["num_heads"] == 0  # head dim 16
        assert s["hidden_size"] >= 8 * 8 * 1  # a patch-8 token of the 1-channel laptop data fits the width
    laptop = [MODELS[n] for n in LAPTOP]  # S < B < L < XL in width and depth, as the paper's
    assert [m["hidden_size"] for m in laptop] == sorted({m["hidden_size"] for m in laptop})
    assert [m["depth"] for m in laptop] == sorted(m["depth"] for m in laptop)
    assert BLOCKS == ("adaln_zero", "adaln", "in_context", "cross_attn")
    assert ModelConfig() == ModelConfig(name="laptop_s", class_dropout=0.1, learn_sigma=True)


@pytest.mark.parametrize("kwargs, bad, allowed", [
    (dict(name="dit_xxl", patch=2), "dit_xxl", "dit_s, dit_b, dit_l, dit_xl, laptop_s"),
    (dict(name="dit_s", patch=3), "patch=3", "1, 2, 4, 8, 16, 32"),
    (dict(name="dit_s", patch=0), "patch=0", "1, 2, 4, 8, 16, 32"),
    (dict(name="laptop_s", patch=4, input_size=28, block="adaLN"), "adaLN", "adaln_zero, adaln, in_context, cross_attn"),
    (dict(name="laptop_s", patch=8, input_size=28), "patch=8", "1, 2, 4, 7, 14, 28"),
])
def test_bad_arguments_raise_one_line_value_error(kwargs, bad, allowed):
    with pytest.raises(ValueError) as err:
        build_model(**kwargs)
    msg = str(err.value)
    assert bad in msg and allowed in msg and "\n" not in msg


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", LAPTOP)
def test_laptop_output_shapes_every_block_and_patch(name, block):
    for patch in (2, 4, 8):
        model = build_model(name, patch, block=block).eval()
        x, t, y = inputs(2, 4, 32)
        with torch.no_grad():
            out = model(x, t, y)
        assert out.shape == (2, 8, 32, 32)
        assert torch.isfinite(out).all()
        assert (model.in_channels, model.out_channels, model.num_classes) == (4, 8, 1000)
        assert (model.input_size, model.patch_size, model.block, model.learn_sigma) == (32, patch, block, True)


@pytest.mark.parametrize("block", BLOCKS)
def test_paper_output_shapes_on_meta(block):
    for name in PAPER:
        with torch.device("meta"):
            model = build_model(name, 2, block=block).eval()
            out = model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, 8, 32, 32)


def test_other_sizes_channels_and_fixed_sigma():
    model = build_model("laptop_s", 7, input_size=28, in_channels=1, num_classes=10, learn_sigma=False)
    x, t, y = inputs(3, 1, 28, num_classes=10)
    assert model(x, t, y).shape == (3, 1, 28, 28) and model.out_channels == 1
    model = build_model("laptop_b", 1, input_size=6, in_channels=3, num_classes=10, block="cross_attn")
    x, t, y = inputs(2, 3, 6, num_classes=10)
    assert model(x, t.float() + 0.5, y).shape == (2, 6, 6, 6) and model.out_channels == 6


# ----------------------------------------------------------------------------- the public release's layout


def release_dit_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of DiT-XL-2-256x256.pt (facebookresearch/DiT), written out by hand."""
    shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for i in range(28):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3456, 1152),
            f"blocks.{i}.attn.qkv.bias": (3456,),
            f"blocks.{i}.attn.proj.weight": (1152, 1152),
            f"blocks.{i}.attn.proj.bias": (1152,),
            f"blocks.{i}.mlp.fc1.weight": (4608, 1152),
            f"blocks.{i}.mlp.fc1.bias": (4608,),
            f"blocks.{i}.mlp.fc2.weight": (1152, 4608),
            f"blocks.{i}.mlp.fc2.bias": (1152,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6912, 1152),
            f"blocks.{i}.adaLN_modulation.1.bias": (6912,),
        })
    return shapes


def test_dit_xl2_matches_release_state_dict():
    with torch.device("meta"):
        model = build_model("dit_xl", 2)
    expected = release_dit_xl2_shapes()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert len({k.split(".")[1] for k in got if k.startswith("blocks.")}) == 28
    # The release's train.py prints 675,129,632 = all parameters, the frozen pos_embed (294,912) included.
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 675_129_632 - 256 * 1152
    # A checkpoint with exactly these names and shapes loads strictly.
    ckpt = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    model.load_state_dict(ckpt, strict=True, assign=True)
    with pytest.raises(RuntimeError):
        model.load_state_dict({**ckpt, "final_layer.linear.weight": torch.empty(16, 1152, device="meta")},
                              strict=True, assign=True)


@pytest.mark.slow  # ~10 s: materialises and initialises 675M parameters on the CPU
def test_dit_xl2_starts_as_zero_function():
    # Build on meta and materialise without the constructors' default init: initialize_weights alone must set
    # every parameter of the adaLN-Zero model (it does in the release), and the output must be exactly zero.
    with torch.device("meta"):
        model = build_model("dit_xl", 2)
    model = model.to_empty(device="cpu")
    model.initialize_weights()
    x, t, y = inputs(1, 4, 32)
    with torch.no_grad():
        out = model.eval()(x, t, y)
    assert out.shape == (1, 8, 32, 32)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.allclose(model.pos_embed[0], sincos_pos_embed_2d(1152, 16))


# ----------------------------------------------------------------------------- block designs (paper section 3.2)


@pytest.mark.parametrize("name", LAPTOP + ("dit_s",))
def test_adaln_zero_initial_output_is_exactly_zero_and_blocks_are_identity(name):
    model = build_model(name, 4).eval()
    x, t, y = inputs(2, 4, 32)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros(2, 8, 32, 32))
        tokens = torch.randn(2, 64, MODELS[name]["hidden_size"])
        c = torch.randn(2, MODELS[name]["hidden_size"])
        assert torch.equal(model.blocks[0](tokens, c), tokens)


@pytest.mark.parametrize("block", ["adaln", "in_context", "cross_attn"])
def test_other_designs_do_not_start_at_zero(block):
    model = build_model("laptop_s", 4, block=block).eval()
    with torch.no_grad():
        out = model(*inputs(2, 4, 32))
    assert out.abs().mean() > 1e-3


def test_block_designs_follow_the_paper():
    h = MODELS["laptop_b"]["hidden_size"]
    zero, ada = build_model("laptop_b", 4), build_model("laptop_b", 4, block="adaln")
    # adaLN-Zero regresses (shift, scale, gate) x 2; adaLN has no gate: (shift, scale) x 2. Norms carry no affine.
    assert zero.blocks[0].adaLN_modulation[1].out_features == 6 * h
    assert ada.blocks[0].adaLN_modulation[1].out_features == 4 * h
    assert zero.blocks[0].norm1.weight is None and ada.blocks[0].norm1.weight is None
    assert torch.all(zero.blocks[0].adaLN_modulation[1].weight == 0)
    assert ada.blocks[0].adaLN_modulation[1].weight.abs().sum() > 0
    assert ada.final_layer.linear.weight.abs().sum() > 0

    # In-context: two extra tokens through standard (affine LayerNorm) ViT blocks, removed before the final layer.
    seen = {}
    ctx = build_model("laptop_b", 4, block="in_context")
    ctx.blocks[0].register_forward_hook(lambda m, a, out: seen.update(block=a[0].shape))
    ctx.final_layer.register_forward_hook(lambda m, a, out: seen.update(final=a[0].shape))
    ctx(*inputs(2, 4, 32))
    assert seen == {"block": (2, 66, h), "final": (2, 64, h)}
    assert ctx.blocks[0].norm1.weight is not None and not hasattr(ctx.final_layer, "adaLN_modulation")

    # Cross-attention: image tokens attend to the length-two sequence [embed(t), embed(y)].
    seen = {}
    cross = build_model("laptop_b", 4, block="cross_attn")
    cross.blocks[0].cross_attn.register_forward_hook(lambda m, a, out: seen.update(q=a[0].shape, kv=a[1].shape))
    cross(*inputs(2, 4, 32))
    assert seen == {"q": (2, 64, h), "kv": (2, 2, h)}


def test_in_context_tokens_are_t_and_y_embeddings():
    model = randomize_(build_model("laptop_s", 8, block="in_context")).eval()
    x, t, y = inputs(2, 4, 32)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.update(x=a[0]))
    with torch.no_grad():
        model(x, t, y)
        assert torch.allclose(seen["x"][:, -2], model.t_embedder(t))
        assert torch.allclose(seen["x"][:, -1], model.y_embedder(y, train=False))
        assert torch.allclose(seen["x"][:, :16], model.x_embedder(x) + model.pos_embed)


@pytest.mark.parametrize("block", BLOCKS)
def test_every_trainable_parameter_gets_a_gradient(block):
    model = randomize_(build_model("laptop_s", 4, input_size=16, block=block)).train()
    model(*inputs(4, 4, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None


# ----------------------------------------------------------------------------- components against references


def test_attention_matches_plain_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(3, 10, 64)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias                                  # (N, L, 3D)
    q, k, v = (qkv[..., i * 64:(i + 1) * 64].reshape(3, 10, 4, 16).transpose(1, 2) for i in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)    # (N, heads, L, L)
    ref = (weights @ v).transpose(1, 2).reshape(3, 10, 64) @ attn.proj.weight.T + attn.proj.bias
    assert (attn(x) - ref).abs().max() < 1e-5

    cross = CrossAttention(64, 4)
    cond = torch.randn(3, 2, 64)
    q = (x @ cross.q.weight.T + cross.q.bias).reshape(3, 10, 4, 16).transpose(1, 2)
    kv = cond @ cross.kv.weight.T + cross.kv.bias
    k, v = (kv[..., i * 64:(i + 1) * 64].reshape(3, 2, 4, 16).transpose(1, 2) for i in range(2))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)    # (N, heads, L, 2)
    ref = (weights @ v).transpose(1, 2).reshape(3, 10, 64) @ cross.proj.weight.T + cross.proj.bias
    assert (cross(x, cond) - ref).abs().max() < 1e-5


def test_patch_embed_is_the_convolution_and_unpatchify_inverts_token_order():
    torch.manual_seed(0)
    embed = PatchEmbed(4, 3, 32)
    x = torch.randn(2, 3, 16, 12)
    conv = embed.proj(x).flatten(2).transpose(1, 2)                             # (N, T, D) via the conv
    assert (embed(x) - conv).abs().max() < 1e-5

    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2, learn_sigma=False)
    img = torch.randn(2, 3, 8, 8)
    tokens = torch.empty(2, 16, 2 * 2 * 3)                                       # token (i, j) holds (a, b, c)
    for i in range(4):
        for j in range(4):
            for a in range(2):
                for b in range(2):
                    tokens[:, i * 4 + j, (a * 2 + b) * 3:(a * 2 + b + 1) * 3] = img[:, :, i * 2 + a, j * 2 + b]
    assert torch.equal(model.unpatchify(tokens), img)


def test_sincos_pos_embed_matches_mae_formula():
    dim, grid = 16, 4
    # The MAE / DiT release recipe: meshgrid(w, h), first half of the channels from grid[0], second from grid[1].
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(gw), one_d(gh)], axis=1)
    assert np.allclose(sincos_pos_embed_2d(dim, grid).numpy(), ref, atol=1e-6)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 250, 999])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    args = t.numpy()[:, None] * freqs[None]
    assert np.allclose(emb.numpy(), np.concatenate([np.cos(args), np.sin(args)], axis=1), atol=2e-4)
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (4, 7)


# ----------------------------------------------------------------------------- frozen position embedding


def test_pos_embed_is_frozen():
    model = randomize_(build_model("laptop_s", 4, input_size=16)).train()
    before = model.pos_embed.detach().clone()
    assert not model.pos_embed.requires_grad
    assert all(p is not model.pos_embed for p in model.parameters() if p.requires_grad)
    assert "pos_embed" in model.state_dict()                                     # saved, as in the release
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1)
    model(*inputs(4, 4, 16)).square().mean().backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)
    assert torch.allclose(before[0], sincos_pos_embed_2d(MODELS["laptop_s"]["hidden_size"], 4))


# ----------------------------------------------------------------------------- label dropout


def test_label_dropout_rate_train_vs_eval():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.randint(0, 10, (20_000,))
    null = emb.embedding_table.weight[10]
    dropped = (emb(labels, train=True) == null).all(1).float().mean().item()
    assert abs(dropped - 0.1) < 0.01
    assert not (emb(labels, train=False) == null).all(1).any()
    force = (torch.arange(20_000) % 4 == 0).long()
    forced = (emb(labels, train=False, force_drop_ids=force) == null).all(1)
    assert torch.equal(forced, force.bool())

    no_drop = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)
    assert no_drop.embedding_table.num_embeddings == 10
    assert torch.equal(no_drop(labels, train=True), no_drop.embedding_table.weight[labels])


def test_model_drops_labels_only_in_training_mode():
    model = randomize_(build_model("laptop_s", 4, input_size=16, num_classes=10, class_dropout=0.5))
    x, t, y = inputs(32, 4, 16, num_classes=10)
    torch.manual_seed(123)
    out_train = model.train()(x, t, y)
    torch.manual_seed(123)
    drop = torch.rand(32) < 0.5
    assert 0 < drop.sum() < 32
    with torch.no_grad():
        expected = model.eval()(x, t, torch.where(drop, 10, y))
        assert torch.allclose(out_train, expected, atol=1e-6)
        assert not torch.allclose(model(x, t, y), expected, atol=1e-6)             # eval: labels kept as given
        assert torch.equal(model(x, t, y), model(x, t, y))


def test_images_per_forward_takes_2048_tokens_on_a_cpu_and_the_whole_batch_elsewhere():
    xl2 = build_model("laptop_xl", 2, input_size=16, in_channels=1, num_classes=10)     # 64 tokens an image
    s8 = build_model("laptop_s", 8, input_size=16, in_channels=1, num_classes=10)      # 4 tokens
    ctx = build_model("laptop_s", 4, input_size=16, in_channels=1, num_classes=10, block="in_context")  # 16 + 2
    assert images_per_forward(xl2, "cpu", 250) == 32
    assert images_per_forward(s8, "cpu", 250) == 250 and images_per_forward(s8, "cpu", 1000) == 512
    assert images_per_forward(ctx, torch.device("cpu"), 250) == 113
    assert images_per_forward(xl2, "cuda", 250) == 250  # an accelerator takes the batch (no CUDA needed to ask)
    huge = build_model("laptop_s", 1, input_size=64, in_channels=1, num_classes=10)     # 4,096 tokens
    assert images_per_forward(huge, "cpu", 250) == 8 and images_per_forward(huge, "cpu", 5) == 5  # 8 at least
