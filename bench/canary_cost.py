"""The canary's cost, (B)/(A) of ``canary_serving.py``, in several checkouts side by side.

    python bench/canary_cost.py --trees BEFORE_DIR . [--fractions 0.2 0.5] [--rounds 5]
                                [--seconds 8] [--model DIR] [--own-process]
                                [--canary-weights all|layers] [--canary full|lora]

Runs this checkout's ``canary_serving.py`` (one round each) against each tree's code, the trees
and fractions interleaved round by round so that background load hits all alike, and prints each
run's (B)/(A) tokens/s and (A)/(B) tokens per CPU second (the cost that holds however much CPU
other jobs leave), then their medians side by side and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "canary_serving.py"
RATES = re.compile(r"\(B\)/\(A\) tokens/s = ([0-9.]+)x")
PER_CPU = re.compile(r"\(A\)/\(B\) tokens per CPU second = ([0-9.]+)x")
LONGEST = re.compile(r"longest wait between two deltas of a stream: \(A\) ([0-9.]+)s, "
                     r"\(B\) ([0-9.]+)s")


def one_run(tree: Path, fraction: float,
            args: argparse.Namespace) -> tuple[float, float, float]:
    """One round of ``canary_serving.py`` on ``tree``'s engine: its ratios of tokens/s and of
    tokens per CPU second, and (B)'s longest wait between two deltas of a stream (seconds)."""
    # The tree's packages are imported first: the bench's own ``sys.path`` entry (this
    # checkout) then finds them in ``sys.modules``.
    command = [sys.executable, "-c",
               f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); "
               "import flywheel, server.engines.transformers_engine; "
               f"sys.argv = [{str(BENCH)!r}] + sys.argv[1:]; "
               f"runpy.run_path({str(BENCH)!r}, run_name='__main__')",
               "--model", str(args.model), "--fraction", str(fraction), "--rounds", "1",
               "--seconds", str(args.seconds), "--canary-weights", args.canary_weights,
               "--canary", args.canary,
               *(["--own-process"] if args.own_process else [])]
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True)
    rate, per_cpu = RATES.search(out.stdout), PER_CPU.search(out.stdout)
    longest = LONGEST.search(out.stdout)
    if rate is None or per_cpu is None or longest is None:
        raise RuntimeError(f"no ratio in the output of {tree}:\n{out.stdout}\n{out.stderr}")
    return float(rate.group(1)), float(per_cpu.group(1)), float(longest.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=Path, nargs="+", required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base").resolve())
    parser.add_argument("--own-process", action="store_true")
    parser.add_argument("--canary-weights", choices=["all", "layers"], default="all")
    parser.add_argument("--canary", choices=["full", "lora"], default="full")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    load = os.getloadavg()
    ratios: dict[tuple[Path, float], list[tuple[float, float, float]]] = {
        (t, f): [] for t in trees for f in args.fractions}
    for round_ in range(args.rounds):
        for tree in trees:
            for fraction in args.fractions:
                rate, per_cpu, longest = one_run(tree, fraction, args)
                ratios[tree, fraction].append((rate, per_cpu, longest))
                print(f"round {round_ + 1}: {tree.name} {fraction:.0%} tokens/s {rate:.2f}x, "
                      f"per CPU second {per_cpu:.2f}x, (B)'s longest wait {longest:.2f}s",
                      flush=True)
    print(f"with a canary / without, medians of {args.rounds} rounds of {args.seconds:.0f}s "
          f"per arm, core {'in its own' if args.own_process else 'in the bench'} process, "
          f"canary: {args.canary}, weights: {args.canary_weights}")
    print(f"{'':<24}" + "".join(f"{'tokens/s ' + f'{f:.0%}':>16}" for f in args.fractions)
          + "".join(f"{'per CPU s ' + f'{f:.0%}':>16}" for f in args.fractions)
          + "".join(f"{'longest wait ' + f'{f:.0%}':>19}" for f in args.fractions))
    for tree in trees:
        print(f"{tree.name:<24}" + "".join(
            f"{statistics.median(r[i] for r in ratios[tree, f]):>15.2f}x"
            for i in (0, 1) for f in args.fractions) + "".join(
            f"{statistics.median(r[2] for r in ratios[tree, f]):>18.2f}s"
            for f in args.fractions))
    print(f"load average (1, 5, 15 min): before {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          "after {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
