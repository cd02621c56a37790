"""Chaos test of the training job and its lease: random SIGKILLs, and launches racing for one run.

    python -m benchmarks.chaos                      # 20 kill trials, 100 + 100 lease races (~10 min on 2 cores)
    python -m benchmarks.chaos --trials 2 --races 4 # the suite's quick version (tests/test_reliability.py)

Kill trials: a 60-step laptop_s/8 run (checkpoint every 5 steps) is started with `python -m scaling.train`,
killed with SIGKILL at a random moment (during start-up, a step, a checkpoint save) one to three times, then run to
the end (the kill moments are uniform over the wall time of an uninterrupted run: start-up, steps and checkpoint
saves alike). Each trial checks, against one uninterrupted run: every checkpoint loads with `weights_only=True`
(corrupt), the final model, EMA and optimizer state are equal to the bit (differ), metrics.jsonl holds steps
1..60 once each in order (bad rows), no temporary file and no lease are left (temp left).

Lease races: 2 processes start at a barrier and take the lease of one run, either fresh (no lock.json) or stale
(a lock.json of a dead process); each winner holds it while the others try. Exactly one holder each time.

Prints one summary line (and writes it with the details to --out, default benchmarks/results/chaos.txt).
"""

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaling.checkpoint import checkpoint_path, list_steps, load_checkpoint
from scaling.rundir import RunDir, RunLocked, acquire_lease, read_jsonl, read_status, write_json

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
RUN_ARGS = ["model=laptop_s", "patch=8", "data.image_size=16", "data.max_images=512", "train.batch_img=8",
            "train.log_every=1", "train.ckpt_every=5", f"train.steps={STEPS}", "eval.inline=false", "wandb=disabled"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


# ----------------------------------------------------------------------------- kills


def start(output_root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scaling.train", *RUN_ARGS, f"output_root={output_root}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_dir(output_root: Path) -> RunDir:
    runs = list((output_root / "runs").glob("*")) if (output_root / "runs").is_dir() else []
    if len(runs) != 1:
        raise RuntimeError(f"expected one run under {output_root}, found {len(runs)}")
    return RunDir(runs[0])


def final_state(run: RunDir) -> dict:
    """What training produced: model, EMA and optimizer state (the checkpoint's config names its output root)."""
    ckpt = load_checkpoint(checkpoint_path(run, STEPS))
    return {k: ckpt[k] for k in ("model", "ema", "opt", "step", "img_seen")}


def states_equal(a: dict, b: dict) -> bool:
    flat = lambda d, p="": ({f"{p}{k}": v for k, v in d.items() if not isinstance(v, dict)}
                            | {k2: v2 for k, v in d.items() if isinstance(v, dict) for k2, v2 in flat(v, f"{p}{k}.").items()})
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k]
                                          for k in fa)


def kill_trial(output_root: Path, rng: random.Random, reference: dict, wall_s: float) -> dict:
    """Kill a run 1-3 times at random moments within the wall time `wall_s` of an uninterrupted run (start-up,
    steps and checkpoint saves alike), finish it, check it; counts of each kind of damage."""
    kills, during_start = 0, 0
    for _ in range(rng.randint(1, 3)):
        proc = start(output_root)
        delay = rng.uniform(0.1, wall_s)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            started = (output_root / "runs").is_dir() and any((output_root / "runs").glob("*/metrics.jsonl"))
            during_start += not started
        if proc.returncode == 0:
            break  # it finished before the kill
    proc = start(output_root)
    rc = proc.wait(timeout=600)
    run = run_dir(output_root)
    corrupt = 0
    for step in list_steps(run):
        try:
            torch.load(checkpoint_path(run, step), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - counted
            corrupt += 1
    steps = [r.get("step") for r in read_jsonl(run.metrics)]
    temp = [p for p in list(run.path.glob(".*.tmp")) + list(run.checkpoints.glob(".tmp*"))]
    return {"kills": kills, "during_start": during_start, "rc": rc, "corrupt": corrupt,
            "differ": int(rc != 0 or not states_equal(final_state(run), reference)),
            "bad_rows": int(steps != list(range(1, STEPS + 1))), "temp_left": len(temp) + run.lock.exists(),
            "done": read_status(run)["state"] == "done"}


# ----------------------------------------------------------------------------- lease races


def _race(run_path: str, barrier, results, hold_s: float) -> None:
    barrier.wait()
    try:
        lease = acquire_lease(RunDir(run_path))
    except RunLocked:
        results.put("locked")
        return
    except BaseException as e:  # noqa: BLE001 - a crash is what the race counts
        results.put(f"crash {type(e).__name__}: {e}")
        return
    results.put("held")
    time.sleep(hold_s)  # hold while the others try
    lease.release()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def race(run: RunDir, racers: int, rounds: int, stale: bool, hold_s: float = 0.3) -> list[list[str]]:
    """`rounds` times: a fresh or a stale lock.json, then `racers` processes take the lease at once; the sorted
    outcomes of each round ("held", "locked", or "crash ...")."""
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for _ in range(rounds):
        run.lock.unlink(missing_ok=True)
        if stale:
            write_json(run.lock, {"host": socket.gethostname(), "pid": dead_pid(), "heartbeat": time.time(),
                                  "token": "stale", "generation": 1})
        barrier, results = ctx.Barrier(racers), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(run.path), barrier, results, hold_s)) for _ in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        outcomes.append(sorted(results.get(timeout=5) for _ in procs))
    return outcomes


def one_holder(outcomes: list[list[str]]) -> tuple[int, int]:
    """(rounds with exactly one holder and no crash, crashes)."""
    good = sum(o.count("held") == 1 and all(x in ("held", "locked") for x in o) for o in outcomes)
    return good, sum(x.startswith("crash") for o in outcomes for x in o)


# ----------------------------------------------------------------------------- main


def chaos(trials: int, races: int, seed: int = 0, work: Path | None = None) -> dict:
    work = Path(work or tempfile.mkdtemp(prefix="dit-chaos-"))
    rng = random.Random(seed)
    walls = []
    for name in ("reference", "warm"):  # the second run has warm caches (the dataset, imports): its time counts
        t0 = time.monotonic()
        if start(work / name).wait(timeout=600) != 0:
            raise RuntimeError("the uninterrupted reference run failed")
        walls.append(time.monotonic() - t0)
    wall_s = 0.9 * walls[-1]  # kill moments within a fresh run's own time, so the first kill of a trial lands
    reference = final_state(run_dir(work / "reference"))
    rows = []
    for i in range(trials):
        rows.append(kill_trial(work / f"trial{i}", rng, reference, wall_s))
        print(f"[chaos] trial {i + 1}/{trials}: {rows[-1]}", flush=True)
    run = RunDir(work / "race").create()
    fresh = one_holder(race(run, 2, races, stale=False))
    stale = one_holder(race(run, 2, races, stale=True))
    total = lambda k: sum(r[k] for r in rows)
    summary = {"trials": trials, "reference_wall_s": round(wall_s, 1), "kills": total("kills"), "kills_during_start": total("during_start"),
               "corrupt": total("corrupt"), "differ": total("differ"), "bad_rows": total("bad_rows"),
               "temp_left": total("temp_left"), "not_done": trials - total("done"),
               "fresh_races": races, "fresh_one_holder": fresh[0], "fresh_crashes": fresh[1],
               "stale_races": races, "stale_one_holder": stale[0], "stale_crashes": stale[1], "rows": rows}
    shutil.rmtree(work, ignore_errors=True)
    return summary


def summary_line(s: dict) -> str:
    return (f"chaos: {s['trials']} trials, {s['kills']} SIGKILLs at random moments of a {s['reference_wall_s']} s run "
            f"({s['kills_during_start']} before its first metrics row): "
            f"{s['corrupt']} corrupt, {s['differ']} differ, {s['bad_rows']} with bad metric rows, "
            f"{s['temp_left']} temporary files or leases left, {s['not_done']} not done | lease races: fresh "
            f"{s['fresh_one_holder']}/{s['fresh_races']} one holder, {s['fresh_crashes']} crashes; stale "
            f"{s['stale_one_holder']}/{s['stale_races']} one holder, {s['stale_crashes']} crashes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--races", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.txt"))
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    s = chaos(args.trials, args.races, args.seed)
    line = summary_line(s)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            f"# python -m benchmarks.chaos --trials {args.trials} --races {args.races} --seed {args.seed}\n"
            f"# {os.cpu_count()} CPU cores, torch {torch.__version__}, {time.monotonic() - t0:.0f} s\n"
            + "\n".join(f"trial {i}: {r}" for i, r in enumerate(s["rows"])) + "\n" + line + "\n")
    bad = s["corrupt"] + s["differ"] + s["bad_rows"] + s["temp_left"] + s["not_done"] + s["fresh_crashes"] + \
        s["stale_crashes"] + (s["fresh_races"] - s["fresh_one_holder"]) + (s["stale_races"] - s["stale_one_holder"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
