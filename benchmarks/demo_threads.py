"""Wall time of the Janus demo's first steps with one torch thread (cpu_threads: auto for a tiny model) and with
torch's default (cpu_threads: 0), on an idle machine and with --load busy processes beside it.

    python benchmarks/demo_threads.py --steps 100 --load 0 5
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _spin() -> None:
    while True:
        pass


def run(steps: int, threads: int, output: Path) -> float:
    command = [sys.executable, "-m", "reca_hf.cli", "train", str(ROOT / "recipes/janus/tiny_demo.yaml"),
               "--max_steps", str(steps), "--cpu_threads", str(threads), "--output_dir", str(output),
               "--eval_strategy", "no", "--save_strategy", "no", "--num_reconstruction_images", "0",
               "--collapse_action", "off"]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=environment, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 5], help="busy processes beside the run")
    parser.add_argument("--output", default="/tmp/reca-demo-threads")
    args = parser.parse_args()
    print(f"| busy processes | cpu_threads: auto (1) | cpu_threads: 0 (torch's {os.cpu_count()}) |")
    print("|---|---|---|")
    for load in args.load:
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
        for spinner in spinners:
            spinner.start()
        try:
            one = run(args.steps, 1, Path(args.output))
            default = run(args.steps, 0, Path(args.output))
        finally:
            for spinner in spinners:
                spinner.terminate()
        print(f"| {load} | {one:.1f} s | {default:.1f} s |")


if __name__ == "__main__":
    main()
