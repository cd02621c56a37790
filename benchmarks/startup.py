"""How fast the launcher answers: each command in a new process, median of N, as a ratio to `python -c "import
torch"` measured the same way in the same session (the floor of any command that imports torch).

    python -m benchmarks.startup                      # writes benchmarks/results/startup.txt
    python -m benchmarks.startup --repeats 5 --out -  # print only

Commands: `--help`, `--cfg job`, the paper grid's dry run (12 points) and the sampling study's dry run (72 points).
Targets: --help and --cfg job <= 1.5x, the paper dry run <= 1.8x, the sampling dry run <= 3x. Each process starts
cold in the sense of a new interpreter (imports, Hydra's plugin scan, composition); the OS file cache is warm, as
it is for a user typing the commands one after another. The 1-minute load average is printed with the results.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"--help": 1.5, "--cfg job": 1.5, "paper dry run (12 points)": 1.8, "sampling dry run (72 points)": 3.0}


def commands(out_root: str) -> dict[str, list[str]]:
    launch = [sys.executable, "-m", "scaling.launch"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "--help": [*launch, "--help"],
        "--cfg job": [*launch, "--cfg", "job"],
        "paper dry run (12 points)": [*launch, "--config-name", "paper", "-m", "dry_run=true",
                                      f"output_root={out_root}"],
        "sampling dry run (72 points)": [*launch, "--config-name", "sampling", "-m", "dry_run=true",
                                         f"output_root={out_root}"],
    }


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.txt"), help="'-' to print only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(tmp)
        times = {name: [] for name in cmds}
        for _ in range(args.repeats):  # interleaved, so that a change of load touches every command alike
            for name, cmd in cmds.items():
                times[name].append(timed(cmd))
    base = statistics.median(times['python -c "import torch"'])
    lines = [f"# benchmarks/startup.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.2f} (1 min) at the end; median of {args.repeats} new processes each",
             f"{'command':32} {'median s':>9} {'ratio':>6} {'target':>7}  runs (s)"]
    for name, ts in times.items():
        med = statistics.median(ts)
        target = TARGETS.get(name)
        verdict = "" if target is None else ("  met" if med / base <= target else "  MISSED")
        lines.append(f"{name:32} {med:9.2f} {med / base:6.2f} {f'<={target}x' if target else '':>7}  "
                     f"{' '.join(f'{t:.2f}' for t in ts)}{verdict}")
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
