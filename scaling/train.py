"""The training job: one grid point of the study, trained, checkpointed and resumable (paper section 4).

Read top to bottom: setup, resume, then one loop with inline blocks for logging, checkpoints and evals.
Resuming replays exactly what an uninterrupted run would have done: the data order, the flips, the diffusion
timesteps and noise and the label dropout all come from generators seeded by (seed, step), and the checkpoint
holds the model, the EMA, the optimizer and the step.

    python -m scaling.train model.name=laptop_s patch=4 train.steps=300     # one run, Hydra-style overrides
"""

import copy
import functools
import math
import os
import sys
import time

import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from scaling.checkpoint import checkpoint_path, list_steps, load_latest, non_finite, save_checkpoint
from scaling.config import (DEVICES, PRECISIONS, RunConfig, build_model_for, config_from_overrides, config_to_dict,
                            make_plan, run_dir_for, validate)
from scaling.diffusion import Diffusion, sample
from scaling.evaluate import evaluate_checkpoint, missing_evals
from scaling.rundir import (Lease, LeaseLost, RunDir, append_jsonl, atomic_write_text, clean_temporary, read_json,
                            read_status, repair_jsonl, write_json, write_status)
from scaling.signals import ENVIRONMENT, StopSignals, stop_signals
from scaling.tracking import Tracker
from scaling.valloss import split_heldout

# Dense bf16 peak of the GPUs we know, for MFU (vendor datasheets; SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# ----------------------------------------------------------------------------- data order


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, batch_img: int, n: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at `step`: a pure function, so a resumed run sees the same data."""
    out, pos = [], step * batch_img
    while len(out) < batch_img:
        epoch, offset = divmod(pos + len(out), n)
        take = min(batch_img - len(out), n - offset)
        out.extend(_epoch_permutation(n, seed, epoch)[offset:offset + take].tolist())
    return out


class StepBatches(Sampler):
    """Yields this rank's (index, flip) pairs for steps start..end-1; flips are seeded by (seed, step)."""

    def __init__(self, n, batch_img, seed, start, end, rank, world, flip):
        self.n, self.batch_img, self.seed, self.start, self.end = n, batch_img, seed, start, end
        self.rank, self.world, self.flip = rank, world, flip

    def __len__(self):
        return self.end - self.start

    def __iter__(self):
        for step in range(self.start, self.end):
            idx = batch_indices(step, self.batch_img, self.n, self.seed)
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            flips = (torch.rand(len(idx), generator=g) < 0.5).tolist() if self.flip else [False] * len(idx)
            yield list(zip(idx, flips))[self.rank::self.world]


class Flipped(Dataset):
    """Indexes a dataset with (index, flip). Latent datasets provide `get(i, flip)` (latents of the flipped
    image, since flipping a latent tensor is not flipping the image); image datasets are flipped here."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        i, flip = item
        if hasattr(self.dataset, "get"):
            return self.dataset.get(i, flip)
        x, y = self.dataset[i]
        return (x.flip(-1) if flip else x), y


# ----------------------------------------------------------------------------- setup helpers


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or submitit's environment; a single process otherwise."""
    if "SLURM_JOB_ID" in os.environ and "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"train.device={name!r}; allowed: {', '.join(DEVICES)}")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on GPUs that support it (paper: mixed precision is not used; DiT's later code uses it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 but this GPU does not support bf16; use auto or fp32")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, over the two modules' parameter lists (made once: walking the
    modules at every step cost a tiny model ~0.7 ms of its ~13 ms step)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay at `step`; with warmup the EMA first tracks the model closely (an assumption of ours, not the
    paper's: DiT uses a constant 0.9999 over 400K+ steps, far longer than its 10K-step horizon)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from: what torch.manual_seed seeds for this device, without its
    visits to every other backend (~0.9 ms a call on a CPU, 7% of a tiny model's step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


@torch.no_grad()
def save_sample_grid(run: RunDir, step: int, ema, diffusion_cfg, plan: dict, device, n: int = 32) -> None:
    """A quick EMA sample grid (DDIM, 50 steps) so a person can see what the model draws at this step."""
    from torchvision.utils import save_image

    g = torch.Generator(device).manual_seed(step)
    y = torch.arange(n, device=device) % plan["num_classes"]
    shape = (n, plan["in_channels"], plan["input_size"], plan["input_size"])
    x = sample(ema, Diffusion(diffusion_cfg), y, shape, sampler="ddim", num_steps=50, generator=g,
               clip_denoised=plan.get("pixel_space", True))
    if not plan.get("pixel_space", True):
        return  # latent runs: the evaluation decodes through the VAE and writes its own grid
    save_image((x.float().cpu() + 1) / 2, run.samples / f"grid_step_{step:07d}.png", nrow=8)


# ----------------------------------------------------------------------------- the job


def train(cfg: RunConfig) -> dict:
    """Train one grid point into its run directory; returns the final status dict.

    `cfg` is a `scaling.config.RunConfig`. Idempotent: a finished run returns at once (evaluating any
    checkpoint that lacks evals), an unfinished one resumes from its newest checkpoint.
    """
    with stop_signals() as stop:  # already installed by the launcher when it runs this job
        validate(cfg)
        tc = cfg.train
        rank, world, local_rank = setup_distributed()
        device = resolve_device(tc.device, local_rank)
        if tc.batch_img % world:
            raise ValueError(f"train.batch_img={tc.batch_img} does not split over {world} ranks")
        run = run_dir_for(cfg)
        plan = {**make_plan(cfg, device=str(device), world_size=world), "cpu_threads": torch.get_num_threads()}
        if rank != 0:
            return _train_locked(cfg, run, plan, rank, world, device, None, stop)
        run.create()
        with Lease(run).hold() as lease:  # a second launch of a running run stops here, before touching its files
            clean_temporary(run)
            atomic_write_text(run.config, OmegaConf.to_yaml(config_to_dict(cfg)))
            write_json(run.plan, plan)
            return _train_locked(cfg, run, plan, rank, world, device, lease, stop)


def last_checkpoint_note(run: RunDir, before: int) -> str:
    """'the last finite checkpoint is <path>' for error messages, naming the newest checkpoint before a step."""
    steps = [s for s in list_steps(run) if s < before]
    return f"the last finite checkpoint is {checkpoint_path(run, steps[-1])}" if steps else "no checkpoint was kept"


def final_status(run: RunDir, lease: Lease | None, state: str, step: int, **extra) -> None:
    """A status that no heartbeat may overwrite (the beat stops first), written only while this process holds
    the run's lease."""
    if lease is None:
        write_status(run, state, step, **extra)
    else:
        lease.write_final_status(state, step, **extra)


def _train_locked(cfg: RunConfig, run: RunDir, plan: dict, rank: int, world: int, device: torch.device,
                  lease: Lease | None, stop: StopSignals) -> dict:
    tc = cfg.train
    log = print if rank == 0 else (lambda *a, **k: None)

    # Model, EMA, optimizer, diffusion. The initial weights depend on the seed only.
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, plan).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                            weight_decay=tc.weight_decay, fused=device.type in ("cuda", "cpu"))
    diffusion = Diffusion(cfg.diffusion)

    # Resume from the newest finite checkpoint, if any.
    step, img_seen = 0, 0
    ckpt = load_latest(run, map_location=device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, img_seen = int(ckpt["step"]), int(ckpt["img_seen"])
        log(f"[train] {run.run_id}: resumed from step {step}")
        del ckpt
    if rank == 0:
        repair_jsonl(run.metrics, step)  # steps after the checkpoint are replayed and logged again
    tracker = run_tracker(cfg, run, plan, rank)
    tracker.replay(step)  # rows an earlier attempt logged to a wandb service that died with it

    def checkpoint_and_eval(step, img_seen, evals: bool) -> bool:
        """Save; run the inline evals due at this step. True when one ran here (its draw wrote a sample grid)."""
        done: list[int] = []
        if bad := non_finite({"model": model.state_dict(), "ema": ema.state_dict()}):  # every rank: all stop
            raise FloatingPointError(f"{len(bad)} non-finite weights at step {step} (first {bad[0]}); not saved; "
                                     f"{last_checkpoint_note(run, step)}")
        if rank == 0:
            lease.check()  # a holder that lost its lease (suspended past the limit) must not write
            save_checkpoint(run, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                  "step": step, "img_seen": img_seen, "rng": rng_state(),
                                  "data": {"seed": cfg.seed, "position_img": img_seen},
                                  "config": config_to_dict(cfg)})
            lease.set_step(step)
            if evals:
                done = _scheduled_evals(cfg, run, ema, plan, device, step, tracker)
        if world > 1:
            torch_dist.barrier()
        return step in done

    if step >= tc.steps:
        if rank == 0:
            _scheduled_evals(cfg, run, ema, plan, device, None, tracker)
            final_status(run, lease, "done", step)
        tracker.finish()
        return read_status(run)

    dataset, heldout = split_heldout(cfg.data, cfg.val, diffusion, plan["pixel_space"], device, tc.steps,
                                     tc.log_every, tc.ckpt_every)
    loader = DataLoader(Flipped(dataset), num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                        batch_sampler=StepBatches(len(dataset), tc.batch_img, cfg.seed, step, tc.steps, rank,
                                                  world, cfg.data.flip))
    train_model = torch.compile(model) if tc.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index]
                                                                if device.type == "cuda" else None)
    amp_dtype = autocast_dtype(tc.precision, device)
    peak = peak_flops(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())  # the same tensors all run long

    if rank == 0:
        lease.set_step(step)
    log(f"[train] {run.run_id}: {plan['params'] / 1e6:.2f}M params, {plan['gflops_per_img']:.4g} Gflops/img, "
        f"steps {step}->{tc.steps}, batch {tc.batch_img}, {device}, world {world}")
    bar = tqdm(total=tc.steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), unit="step",
               dynamic_ncols=True)
    model.train()
    t_log, steps_since_log, loss_sum, start_step = time.perf_counter(), 0, 0.0, step
    if world > 1:  # a signal while starting reached some ranks only: all decide together
        flag = torch.tensor([stop.signal or 0], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        stop.signal = int(flag.item()) or None
    try:
        if stop.signal is None:  # a signal while the job was starting: stop before the first step
            for batch in loader:
                x, y = (t.to(device, non_blocking=True) for t in batch)
                seed_step(step_seed(cfg.seed, rank, step), device)  # label dropout and everything below
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = diffusion.training_losses(train_model, x, t, y)
                loss = losses["loss"].mean()
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss is {loss_val} at step {step + 1}; "
                                             f"{last_checkpoint_note(run, step + 1)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
                if not math.isfinite(grad_norm.item()):  # the update is not applied: weights stay finite
                    raise FloatingPointError(f"gradient norm is {grad_norm.item()} at step {step + 1} (loss "
                                             f"{loss_val:.4g}); {last_checkpoint_note(run, step + 1)}")
                opt.step()
                update_ema(ema_params, params, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
                step += 1
                img_seen += tc.batch_img
                loss_sum += loss_val
                steps_since_log += 1
                bar.update(1)
                if lease is not None and lease.lost:
                    lease.check()  # raises LeaseLost, naming the new holder

                if step % tc.log_every == 0 or step == tc.steps:
                    dt = time.perf_counter() - t_log
                    img_per_s = steps_since_log * tc.batch_img / dt
                    row = {"step": step, "img_seen": img_seen, "loss": loss_sum / steps_since_log,
                           "mse": losses["mse"].mean().item(), "vlb": losses["vlb"].mean().item(), "lr": tc.lr,
                           "grad_norm": float(grad_norm), "img_per_s": img_per_s, "wall_s": dt, "time": time.time()}
                    if device.type == "cuda":
                        row["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                        if peak:  # model flops: 3 passes x 2 flops per multiply-add (paper counts MACs)
                            row["mfu"] = 3 * 2 * plan["gflops_per_img"] * 1e9 * img_per_s / (peak * world)
                    if rank == 0:
                        row.update(heldout.log_row(step, ema, model))  # val_* columns (scaling/valloss.py)
                        lease.check()  # a holder that lost its lease adds no row to the new holder's file
                        append_jsonl(run.metrics, row)
                        tracker.log(row)
                        eta_s = (tc.steps - step) * dt / steps_since_log
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_per_s:.0f}")
                        if bar.disable:  # no terminal (SLURM log, CI): a plain line with the rate and ETA
                            log(f"[train] step {step}/{tc.steps} | loss {row['loss']:.4f} | {img_per_s:.1f} img/s | "
                                f"ETA {format_duration(eta_s)}", flush=True)
                    t_log, steps_since_log, loss_sum = time.perf_counter(), 0, 0.0

                if world > 1:  # a signal reaches the ranks at different steps: all stop at the same one
                    flag = torch.tensor([stop.signal or 0], device=device)
                    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
                    stop.signal = int(flag.item()) or None
                t_pause = time.perf_counter()
                if step % tc.ckpt_every == 0 or step == tc.steps or stop.signal is not None:
                    evaluated = checkpoint_and_eval(step, img_seen, evals=stop.signal is None)  # else: next launch
                    # The eval's draw already wrote samples/eval_step*.png: a second sampling would cost ~6% of a
                    # laptop run (32 samples x 50 steps at each checkpoint).
                    if rank == 0 and tc.grid_every == 0 and stop.signal is None and not evaluated:
                        save_sample_grid(run, step, ema, cfg.diffusion, plan, device)
                elif rank == 0 and tc.grid_every and step % tc.grid_every == 0:
                    save_sample_grid(run, step, ema, cfg.diffusion, plan, device)
                t_log += time.perf_counter() - t_pause  # img/s and the ETA count training steps, not evals
                if stop.signal is not None:
                    break
        if stop.signal is not None:
            # The checkpoint and the status come first; anything optional after them may fail without harm.
            if rank == 0:
                final_status(run, lease, "preempted", step)
            log(f"[train] {run.run_id}: {stop.name} -> saved step {step}, exiting for requeue", flush=True)
            if world > 1:
                torch_dist.barrier()
            _quietly(bar.close)
            _quietly(tracker.finish)
            if (requeue := stop.requeue_handler()) is not None:  # submitit's under SLURM: requeues, then exits
                with ENVIRONMENT:  # not while a thread submits an eval job without the SLURM_* variables
                    requeue(stop.signal, None)
            return read_status(run)
    except BaseException as e:
        if isinstance(e, SystemExit) and stop.signal is not None:
            raise  # submitit's requeue handler exits the job after our checkpoint: preempted, not failed
        if rank == 0 and not isinstance(e, LeaseLost):  # a lost lease: the run's files are another's now
            try:
                if isinstance(e, KeyboardInterrupt):  # Ctrl-C twice: nothing saved since the last checkpoint
                    saved = [s for s in list_steps(run) if s <= step]
                    final_status(run, lease, "preempted", saved[-1] if saved else 0,
                                 error=f"interrupted at step {step} before saving it")
                else:
                    final_status(run, lease, "failed", step, error=f"{type(e).__name__}: {e}")
            except OSError as write_error:  # e.g. the disk is still full: the lease goes, the run reads as stale
                print(f"[train] could not write {run.status}: {write_error}", file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()
        _quietly(tracker.finish)
    if rank == 0:
        final_status(run, lease, "done", step, img_seen=img_seen, steps_this_launch=step - start_step)
    if world > 1:
        torch_dist.barrier()  # every rank returns the final status
    return read_status(run)


def _quietly(action) -> None:
    """Run optional work (closing a progress bar, wandb's finish) whose failure must not fail the run."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - e.g. wandb's service died with the signal
        print(f"[train] ignored while stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run_tracker(cfg: RunConfig, run: RunDir, plan: dict | None = None, rank: int = 0) -> Tracker:
    """The run's wandb mirror (scaling.tracking), for its training job and for an eval job (plan from plan.json)."""
    return Tracker(cfg.wandb, run.run_id, cfg.sweep, run.path, config_to_dict(cfg),
                   read_json(run.plan, {}) if plan is None else plan, rank)


def mirror_eval(cfg: RunConfig, row: dict) -> dict:
    """Log an evals.jsonl row to the run's wandb history from a process without a tracker of the run (an eval job);
    returns the row."""
    try:
        tracker = run_tracker(cfg, run_dir_for(cfg))
    except Exception as e:  # noqa: BLE001 - a mirror: evals.jsonl holds the row; an eval job must not fail on wandb
        print(f"[wandb] could not start: {type(e).__name__}: {e}; the eval is in evals.jsonl", file=sys.stderr,
              flush=True)
        return row
    try:
        tracker.log_eval(row)
    finally:
        tracker.finish()
    return row


def _scheduled_evals(cfg, run, ema, plan, device, step, tracker) -> list[int]:
    """Inline evals (local runs): this checkpoint, or every checkpoint lacking an eval when step is None.
    Returns the steps evaluated."""
    if not cfg.eval.inline:
        return []
    todo = missing_evals(run.path, cfg.eval, cfg.train.ckpt_every, cfg.train.steps)
    todo = todo if step is None else [s for s in todo if s == step]
    for s in todo:
        tracker.log_eval(evaluate_checkpoint(run.path, s, cfg.eval, device=device))
    return todo


def format_duration(seconds: float) -> str:
    """5m07s, or 2h03m from an hour on (progress lines and ETAs)."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def main(argv=None) -> int:
    cfg = config_from_overrides(sys.argv[1:] if argv is None else argv)
    status = train(cfg)
    print(f"[train] {status['state']} at step {status['step']}")
    return 0 if status["state"] in ("done", "preempted") else 1


if __name__ == "__main__":
    raise SystemExit(main())
