"""Wall time of `reca --help` and `reca validate --help` (fresh interpreters, median of --repeats).

    python benchmarks/cli_startup.py --repeats 5
"""

import argparse
import statistics
import subprocess
import sys
import time


def wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "reca_hf.cli", *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for argv in (["--help"], ["validate", "--help"], ["train", "--help"]):
        print(f"reca {' '.join(argv)}: {wall(argv, args.repeats):.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
