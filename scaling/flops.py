"""Model compute and size: forward Gflops per image (fvcore and a closed form) and parameter counts.

Convention (the paper's, Table 4, and fvcore's): one fused multiply-add counts as ONE flop; elementwise ops
(activations, the adaLN modulation, residual adds, the softmax) are not counted. fvcore also counts layer
norms (4 flops per element, 5 with an affine), which we keep: they are under 0.1% of any DiT.

    python -m scaling.flops                        # the paper's 12 models vs the published Table 4
    python -m scaling.flops --family laptop --csv  # the laptop family as CSV
    python -m scaling.flops --family laptop --input-size 28 --in-channels 1 --patches 7 4 2
"""

import argparse
import csv
import importlib.resources
import math
import sys
import warnings

import torch
from torch import nn

from scaling.models import BLOCKS, FAMILY_MODELS, MODELS, build_model, check_model_args


def train_flops(gflops_per_img, batch_img, step):
    """Training compute in FLOPs, the project's one convention (paper Fig. 9): gflops_per_img x 1e9 x batch_img x
    step x 3 (forward and backward ~ 3 forwards; one multiply-add counted as one flop, as Gflops are)."""
    return gflops_per_img * 1e9 * batch_img * step * 3


PATCHES = (8, 4, 2)                 # the paper's grid, in the order of Table 4
FREQUENCY_EMBEDDING_SIZE = 256      # sinusoidal timestep features fed to the timestep MLP (models.TimestepEmbedder)
CROSS_TOKENS = 2                    # [embed(t), embed(y)], the cross-attention block's conditioning sequence


def count_params(model: nn.Module) -> int:
    """Trainable parameters: the frozen sin-cos position embedding is not counted.

    Table 4's millions agree with this count (and, after rounding, also with the count that includes pos_embed);
    the release's train.py prints all parameters: 675,129,632 for DiT-XL/2, of which 294,912 are pos_embed.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: the two matmuls q k^T and softmax(.) v.

    q (B, heads, Lq, d), k (B, heads, Lk, d), v (B, heads, Lk, dv): B heads Lq Lk d + B heads Lq Lk dv
    multiply-adds. fvcore has no handle for the fused kernel and would silently count zero.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2])
    queries = math.prod(q[:-1])                                      # B heads Lq
    return queries * k[-2] * q[-1] + queries * k[-2] * v[-1]


def gflops_per_img(model: nn.Module, input_size: int | None = None, in_channels: int | None = None) -> float:
    """Forward Gflops for one image, traced by fvcore on a batch of 1 in eval mode (works on the meta device).

    fvcore's warnings about ops without a handle (elementwise ops: adds, multiplies, activations, softmax) are
    silenced: the paper's convention does not count them either.
    """
    input_size = model.input_size if input_size is None else input_size
    in_channels = model.in_channels if in_channels is None else in_channels
    weight = next(model.parameters())
    x = torch.zeros(1, in_channels, input_size, input_size, device=weight.device, dtype=weight.dtype)
    t = torch.zeros(1, device=weight.device)
    y = torch.zeros(1, dtype=torch.long, device=weight.device)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings of torch.jit
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(model, (x, t, y))
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            flops = analysis.total()
    finally:
        model.train(was_training)
    return flops / 1e9


def closed_form_gflops(name: str, patch: int, input_size: int = 32, in_channels: int = 4,
                       block: str = "adaln_zero", learn_sigma: bool = True) -> float:
    """Forward Gflops per image by hand, in multiply-adds; agrees with fvcore within 0.5% (tests/test_flops.py).

    With hidden h, depth L, T = (input_size / p)^2 tokens, C in, Co out channels (2C with learned sigma):
      patch embedding      T (C p^2) h
      timestep MLP         256 h + h^2                       (label embedding is a lookup: 0)
      per block, all designs, over the n tokens it sees:
        qkv 3 n h^2, attention output proj n h^2, MLP 8 n h^2   (= 12 n h^2)
        attention q k^T and softmax(.) v                       2 n^2 h
      adaLN-Zero: + 6 h^2 (regress shift, scale, gate x 2) per block; n = T
      adaLN:      + 4 h^2 (shift, scale x 2) per block;            n = T
      in-context: n = T + 2 (the t and y tokens), nothing else
      cross-attn: n = T, + q T h^2, kv 2 * 2 h^2, proj T h^2, attention 2 T 2 h  (about +15%, paper section 3.2)
      final layer: T h (p^2 Co) linear, + 2 h^2 adaptive norm for the adaLN designs
      layer norms (fvcore's estimate): 4 flops per element without affine, 5 with
    """
    check_model_args(name, patch, input_size, block)
    h, depth = MODELS[name]["hidden_size"], MODELS[name]["depth"]
    T = (input_size // patch) ** 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    adaptive = block in ("adaln_zero", "adaln")
    n = T + 2 if block == "in_context" else T
    norm_per_elem = 4 if adaptive else 5

    per_block = 12 * n * h * h + 2 * n * n * h + 2 * norm_per_elem * n * h
    if block == "adaln_zero":
        per_block += 6 * h * h
    elif block == "adaln":
        per_block += 4 * h * h
    elif block == "cross_attn":
        per_block += 2 * T * h * h + CROSS_TOKENS * 2 * h * h + 2 * T * CROSS_TOKENS * h + norm_per_elem * T * h

    flops = (T * in_channels * patch * patch * h                          # patch embedding
             + FREQUENCY_EMBEDDING_SIZE * h + h * h                        # timestep MLP
             + depth * per_block
             + T * h * patch * patch * out_channels                        # final linear
             + norm_per_elem * T * h                                       # final norm
             + (2 * h * h if adaptive else 0))                             # final adaLN regression
    return flops / 1e9


def closed_form_params(name: str, patch: int, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                       block: str = "adaln_zero", learn_sigma: bool = True, class_dropout: float = 0.1) -> int:
    """Trainable parameters by hand (weights + biases; frozen pos_embed excluded); equals count_params exactly.

    With hidden h: per block attention 4h^2 + 4h, MLP 8h^2 + 5h, plus adaLN-Zero 6h^2 + 6h | adaLN 4h^2 + 4h |
    in-context two LayerNorm affines 4h | cross-attention q, kv, proj 4h^2 + 4h and three affines 6h.
    """
    check_model_args(name, patch, input_size, block)
    h, depth = MODELS[name]["hidden_size"], MODELS[name]["depth"]
    out_channels = 2 * in_channels if learn_sigma else in_channels
    adaptive = block in ("adaln_zero", "adaln")
    per_block = {
        "adaln_zero": 12 * h * h + 9 * h + 6 * h * h + 6 * h,
        "adaln": 12 * h * h + 9 * h + 4 * h * h + 4 * h,
        "in_context": 12 * h * h + 9 * h + 2 * 2 * h,
        "cross_attn": 12 * h * h + 9 * h + 4 * h * h + 4 * h + 3 * 2 * h,
    }[block]
    patch_out = patch * patch * out_channels
    return (in_channels * patch * patch * h + h                            # patch embedding
            + FREQUENCY_EMBEDDING_SIZE * h + h + h * h + h                 # timestep MLP
            + (num_classes + int(class_dropout > 0)) * h                   # label table (+ null class)
            + depth * per_block
            + h * patch_out + patch_out                                    # final linear
            + (2 * h * h + 2 * h if adaptive else 2 * h))                  # final adaLN regression | LN affine


# ----------------------------------------------------------------------------- the published table


def paper_table() -> dict[tuple[str, int], dict]:
    """scaling/reference/dit_table4.csv keyed by (model, patch): params_m, gflops, ... as published."""
    path = importlib.resources.files("scaling") / "reference" / "dit_table4.csv"
    with path.open() as f:
        return {(row["model"], int(row["patch"])): row for row in csv.DictReader(f)}


def grid_table(family: str = "paper", input_size: int = 32, in_channels: int = 4, block: str = "adaln_zero",
               num_classes: int = 1000, patches: tuple[int, ...] = PATCHES) -> list[dict]:
    """One row per (model, patch) of a family, counted by fvcore, at full precision (`format_rows` rounds).

    Paper models are built on the meta device (no memory, no compute: the whole grid traces in seconds); the
    laptop models are small enough that tracing them on the CPU is faster than the meta device's Python kernels.
    The published columns are filled only in the paper's setting (paper family, 32x32x4 latents, 1000 classes,
    adaLN-Zero); elsewhere they are None.
    """
    if family not in ("paper", "laptop"):
        raise ValueError(f"family={family!r}; allowed: paper, laptop")
    names = FAMILY_MODELS[family]
    paper_setting = family == "paper" and (input_size, in_channels, block, num_classes) == (32, 4, "adaln_zero", 1000)
    published = paper_table() if paper_setting else {}
    rows = []
    for name in names:
        for patch in patches:
            with torch.device("meta" if family == "paper" else "cpu"):
                model = build_model(name, patch, input_size=input_size, in_channels=in_channels,
                                    num_classes=num_classes, block=block)
            gflops = gflops_per_img(model, input_size, in_channels)
            ref = published.get((name, patch))
            rows.append({
                "model": name, "patch": patch, "tokens": (input_size // patch) ** 2,
                "params_m": count_params(model) / 1e6, "gflops": gflops,
                "paper_gflops": float(ref["gflops"]) if ref else None,
                "rel_diff_pct": 100 * (gflops / float(ref["gflops"]) - 1) if ref else None,
                "paper_params_m": float(ref["params_m"]) if ref else None,
            })
    return rows


def format_rows(rows: list[dict]) -> list[dict]:
    """Rounded strings for printing: params to 0.01 M, Gflops to 0.001, differences to 0.01%; None -> ''."""
    digits = {"params_m": 2, "gflops": 3, "paper_gflops": 2, "rel_diff_pct": 2, "paper_params_m": 0}
    return [{k: "" if v is None else f"{v:.{digits[k]}f}" if k in digits else str(v) for k, v in row.items()}
            for row in rows]


def format_table(rows: list[dict]) -> str:
    cells = format_rows(rows)
    cols = list(cells[0])
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(r[c].rjust(widths[c]) for c in cols) for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scaling.flops",
                                     description="Params and forward Gflops per image of the DiT grid (fvcore).")
    parser.add_argument("--family", choices=("paper", "laptop"), default="paper")
    parser.add_argument("--input-size", type=int, default=32, help="latent/pixel side the model sees")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--block", choices=BLOCKS, default="adaln_zero")
    parser.add_argument("--patches", type=int, nargs="+", default=list(PATCHES), help="patch sizes (default 8 4 2)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of an aligned table")
    args = parser.parse_args(argv)
    try:
        rows = grid_table(args.family, args.input_size, args.in_channels, args.block, args.num_classes,
                          tuple(args.patches))
    except ValueError as err:
        parser.error(str(err))
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(format_rows(rows))
    else:
        print(format_table(rows))


if __name__ == "__main__":
    main()
