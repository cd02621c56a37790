"""DiT: the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023).

Reads top-down: embedders (timestep, label, 2-D sin-cos position, patch), attention and MLP, the four block
designs of the paper (section 3.2, Fig. 5), the final layer, the model, the size presets, `build_model`.

With `block="adaln_zero"` the parameter names and shapes are those of the public DiT release
(facebookresearch/DiT `models.py`), so its checkpoints (e.g. DiT-XL-2-256x256.pt) load with
`load_state_dict(strict=True)`. Notation in shape comments: N batch, C channels, H = W input side, p patch,
T = (H / p)^2 image tokens, D hidden size.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = ("adaln_zero", "adaln", "in_context", "cross_attn")


@dataclass
class ModelConfig:
    name: str = "laptop_s"          # a key of MODELS
    class_dropout: float = 0.1      # label dropout for classifier-free guidance (paper section 3.1)
    learn_sigma: bool = True        # output 2C channels: epsilon and the variance interpolation v (ADM)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, one (shift, scale) per image broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> D: sinusoidal frequencies (ADM / Transformer, 256 of them) then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) integer or fractional timesteps -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                                # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (N, 2 half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)    # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> D, with label dropout for classifier-free guidance (paper section 3.1).

    With `dropout_prob > 0` the table has one extra row, the null class `num_classes`. Labels are replaced by the
    null class with probability `dropout_prob` in training, or exactly where `force_drop_ids == 1`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)                                    # (N, D)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / the DiT release), (grid_size^2, embed_dim), row-major tokens.

    Half of the channels encode one grid coordinate, half the other, each as [sin(pos w_k), cos(pos w_k)] with
    w_k = 10000^(-k / (embed_dim / 4)). As in the release, the first half encodes the column index.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")                  # (G, G) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]                                 # (G^2, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)              # (G^2, D/2)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()           # (G^2, D)


class PatchEmbed(nn.Module):
    """Image -> tokens: a p x p convolution with stride p (named `proj` as timm's PatchEmbed in the release).

    A stride-p p x p convolution is one linear map applied to each flattened (C, p, p) patch; the forward pass
    computes it that way with the convolution's own weight (same result as `self.proj(x)`, same flops), which
    also lets the model run on the meta device, where fvcore counts the whole grid's flops without any compute.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
        x = x.reshape(N, (H // p) * (W // p), C * p * p)                      # (N, T, C p p), row-major tokens
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)       # (N, T, D)


# ----------------------------------------------------------------------------- attention and MLP


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(d)) v, with timm's layout (`qkv`, `proj`)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                # (N, heads, L, d) each
        x = F.scaled_dot_product_attention(q, k, v)                            # (N, heads, L, d)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))                   # (N, L, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: image tokens (queries) attend to conditioning tokens (keys, values)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        S = cond.shape[1]
        q = self.q(x).reshape(N, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (N, heads, L, d)
        kv = self.kv(cond).reshape(N, S, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                    # (N, heads, S, d) each
        x = F.scaled_dot_product_attention(q, k, v)                            # (N, heads, L, d)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))                   # (N, L, D)


class Mlp(nn.Module):
    """Pointwise feedforward D -> 4D -> D with tanh-approximated GELU (timm's `Mlp` names: fc1, fc2)."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio), bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- blocks (paper section 3.2, Fig. 5)


class DiTBlock(nn.Module):
    """adaLN-Zero block (gated=True) and adaLN block (gated=False), paper section 3.2.

    adaLN: the layer norms have no learned affine; their dimension-wise scale (gamma) and shift (beta) are
    regressed from c = embed(t) + embed(y) by a SiLU + linear layer, one (gamma, beta) per image for all tokens.
    adaLN-Zero also regresses dimension-wise gates alpha applied right before each residual connection; the
    regression layer is zero-initialised (`DiT.initialize_weights`), so every block starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (N, T, D), c (N, D)
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class InContextBlock(nn.Module):
    """In-context conditioning block (paper section 3.2): a standard pre-LN ViT block, unchanged.

    The t and y embeddings ride along as two extra tokens of the sequence (see `DiT.forward`), "treating them no
    differently from the image tokens", like cls tokens in ViTs. Assumption (the paper does not say): the two
    tokens get no position embedding; they differ from each other and from image tokens by content alone.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (N, T + 2, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block (paper section 3.2): a pre-LN ViT block with a multi-head cross-attention layer after
    the self-attention, attending to the length-two sequence [embed(t), embed(y)] (as Vaswani et al. and LDM's
    class conditioning). The paper's most expensive design, roughly +15% Gflops.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x (N, T, D), cond (N, 2, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Layer norm then a linear decoder of each token into p x p x out_channels (paper section 3.2, "Transformer
    decoder"). The norm is adaptive (shift, scale regressed from c) for the adaLN designs, a plain affine
    LayerNorm for in-context and cross-attention.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x (N, T, D), c (N, D) or None
        if c is None:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))       # (N, T, p p out_channels)


# ----------------------------------------------------------------------------- the model


class DiT(nn.Module):
    """Diffusion Transformer: x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W).

    out_channels = 2C with learned sigma (first C: epsilon, last C: variance interpolation v as ADM), else C.
    `block` picks the conditioning design of paper Fig. 5 (one of BLOCKS).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, block: str = "adaln_zero"):
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide input_size={input_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.block = block
        self.grid_size = input_size // patch_size
        num_patches = self.grid_size ** 2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)  # frozen
        if block in ("adaln_zero", "adaln"):
            self.blocks = nn.ModuleList(
                [DiTBlock(hidden_size, num_heads, mlp_ratio, gated=block == "adaln_zero") for _ in range(depth)])
        elif block == "in_context":
            self.blocks = nn.ModuleList([InContextBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        elif block == "cross_attn":
            self.blocks = nn.ModuleList([CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        else:
            raise ValueError(f"block={block!r}; allowed: {', '.join(BLOCKS)}")
        adaptive = block in ("adaln_zero", "adaln")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=adaptive)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation, as the release: xavier-uniform linears with zero bias, the fixed sin-cos position
        embedding, xavier on the patch convolution seen as a linear layer, N(0, 0.02) label table and timestep
        MLP; for adaLN-Zero, zero modulation layers and a zero final linear (every block starts as the identity
        and the model outputs zeros). The other designs keep the xavier init everywhere else.
        """
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(basic_init)
        pos_embed = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block == "adaln_zero":
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.linear.weight, 0)
            nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p p c) -> (N, c, H, W), the inverse of PatchEmbed's token order (row-major, channels last)."""
        c, p, g = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)                               # (N, h, w, p, q, c)
        x = x.permute(0, 5, 1, 3, 2, 4)                                        # (N, c, h, p, w, q)
        return x.reshape(x.shape[0], c, g * p, g * p)                          # (N, c, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (N, C, H, W), t (N,), y (N,); label dropout only in training mode
        x = self.x_embedder(x) + self.pos_embed                                # (N, T, D)
        t_emb = self.t_embedder(t)                                             # (N, D)
        y_emb = self.y_embedder(y, self.training)                              # (N, D)
        if self.block in ("adaln_zero", "adaln"):
            c = t_emb + y_emb                                                  # (N, D)
            for block in self.blocks:
                x = block(x, c)                                                # (N, T, D)
            x = self.final_layer(x, c)                                         # (N, T, p p out)
        elif self.block == "in_context":
            num_tokens = x.shape[1]
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)  # (N, T + 2, D)
            for block in self.blocks:
                x = block(x)
            x = self.final_layer(x[:, :num_tokens])                            # (N, T, p p out)
        else:  # cross_attn
            cond = torch.stack([t_emb, y_emb], dim=1)                          # (N, 2, D)
            for block in self.blocks:
                x = block(x, cond)                                             # (N, T, D)
            x = self.final_layer(x)                                            # (N, T, p p out)
        return self.unpatchify(x)                                              # (N, out, H, W)


# ----------------------------------------------------------------------------- size presets

MODELS: dict[str, dict[str, int]] = {
    # The paper's configurations (Table 1): DiT-S, B, L, XL.
    "dit_s": dict(depth=12, hidden_size=384, num_heads=6),
    "dit_b": dict(depth=12, hidden_size=768, num_heads=12),
    "dit_l": dict(depth=24, hidden_size=1024, num_heads=16),
    "dit_xl": dict(depth=28, hidden_size=1152, num_heads=16),
    # Laptop family: the same four shapes scaled down so that the whole study trains on a CPU in minutes.
    # depth = paper depth / 4 (rounded), hidden = paper hidden / 6 (rounded to a multiple of 16), head dim 16;
    # the order of the four in depth, width and compute is kept. The width is set by patch 8: on 1-channel
    # 16x16 images a patch-8 token carries 64 values, and a model narrower than that cannot represent its own
    # input, so its noise prediction is rank-limited (at hidden/16 laptop-S/8, 24 wide, never left noise:
    # FD-500 8745). Hidden/(p^2 C) at patch 8 is then 1-3, the paper's S-XL/8 on 4-channel latents 1.5-4.5.
    # Results are labelled "laptop", never "paper".
    "laptop_s": dict(depth=3, hidden_size=64, num_heads=4),
    "laptop_b": dict(depth=3, hidden_size=128, num_heads=8),
    "laptop_l": dict(depth=6, hidden_size=176, num_heads=11),
    "laptop_xl": dict(depth=7, hidden_size=192, num_heads=12),
    # Sizes between and below those four, for isoFLOP profiles at patch 4 (sweeps/laptop_isoflop.yaml): at laptop
    # budgets the compute-optimal size is at or below laptop-S/4, so the profiles need smaller models to span it.
    # Patch-4 Gflops/img at 16x16x1: XXS 0.00048, XS 0.0010, S 0.0026, M 0.0058, B 0.0102 (steps of ~2.2x).
    # XXXS (one block, 0.00026) is a probe below the sweep, not in it: docs/laptop/README.md, "The isoFLOP study".
    "laptop_xxxs": dict(depth=1, hidden_size=32, num_heads=2),
    "laptop_xxs": dict(depth=2, hidden_size=32, num_heads=2),
    "laptop_xs": dict(depth=2, hidden_size=48, num_heads=3),
    "laptop_m": dict(depth=3, hidden_size=96, num_heads=6),
}

# The 4 x 3 grid of each family (the paper's Table 4 and its laptop counterpart); the other laptop presets are
# sizes for isoFLOP profiles.
FAMILY_MODELS: dict[str, tuple[str, ...]] = {
    "paper": ("dit_s", "dit_b", "dit_l", "dit_xl"),
    "laptop": ("laptop_s", "laptop_b", "laptop_l", "laptop_xl"),
}


# Tokens per forward pass when a CPU evaluates a model without gradients (sampling, the held-out loss): a batch
# of 250 laptop-XL/2 images (16,000 tokens) ran at 90-120 img/s on a core of the 2-core VM with the other core
# busy, in chunks of 32 images (2,048 tokens) at 120-132 img/s, as the activations then stay in cache
# (benchmarks/eval_cpu.py). Chunks change no image drawn, but a matrix multiply may round a row differently
# with the number of rows: the outputs then differ at float rounding (max |difference| ~1e-6, laptop-L's; 0 for
# the other laptop widths on this CPU). Forwards of fewer than MIN_FORWARD_IMAGES are slow.
CPU_FORWARD_TOKENS = 2048
MIN_FORWARD_IMAGES = 8


def images_per_forward(model: nn.Module, device, limit: int) -> int:
    """How many images one no-grad forward of `model` should take on `device`: `limit` (the batch: one forward)
    on accelerators; on a CPU, CPU_FORWARD_TOKENS worth of tokens, at least MIN_FORWARD_IMAGES and at most
    `limit`."""
    if torch.device(device).type != "cpu":
        return limit
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper's model
    tokens = model.grid_size ** 2 + (2 if model.block == "in_context" else 0)
    return min(limit, max(MIN_FORWARD_IMAGES, CPU_FORWARD_TOKENS // tokens))


def in_chunks(model_fn, images: int):
    """model_fn(x, t, y) at most `images` images at a time, in chunks of near-equal size (250 in chunks of at most
    32: eight of 31 or 32, not a last one of 26), the outputs concatenated."""
    def chunked(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = -(-x.shape[0] // images)
        if k <= 1:
            return model_fn(x, t, y)
        return torch.cat([model_fn(*part) for part in zip(*(v.tensor_split(k) for v in (x, t, y)))])
    return chunked


def check_model_args(name: str, patch: int, input_size: int, block: str) -> None:
    """One-line ValueErrors naming the bad value and the allowed values."""
    if name not in MODELS:
        raise ValueError(f"model name={name!r} is not a model; allowed: {', '.join(MODELS)}")
    if block not in BLOCKS:
        raise ValueError(f"block={block!r}; allowed: {', '.join(BLOCKS)}")
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be >= 1")
    if patch < 1 or input_size % patch:
        divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
        raise ValueError(f"patch={patch} does not divide input_size={input_size}; "
                         f"allowed: {', '.join(map(str, divisors))}")


def build_model(name: str, patch: int, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                learn_sigma: bool = True, block: str = "adaln_zero", class_dropout: float = 0.1) -> DiT:
    """The preset `name` (a key of MODELS) with patch size `patch` on an input_size x input_size x in_channels
    input. E.g. DiT-XL/2 on 256 px ImageNet latents: build_model("dit_xl", 2)."""
    check_model_args(name, patch, input_size, block)
    if in_channels < 1:
        raise ValueError(f"in_channels={in_channels} must be >= 1")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout={class_dropout} must be in [0, 1)")
    return DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, **MODELS[name],
               class_dropout_prob=class_dropout, num_classes=num_classes, learn_sigma=learn_sigma, block=block)
