"""What probing a LoRA canary beside the active policy costs: ``routing.route``'s CPU time.

    python bench/probe_cost.py --trees BEFORE_DIR . [--shape demo|28m|80m] [--rounds 5]

``route`` builds the routed model over two LoRA policies on one base (``routed_step.py``'s,
rank 16 on every decoder linear layer), checks every adapted layer's merged weights against
its adapters' difference (``adapters.explains``) and runs a probe forward. It runs where a new
version is loaded, before ``set_canary`` or a swap is applied (``Lanes.probe``), so a release
waits for it. Each tree's ``routing`` runs in a process of its own on the same models (same
seed), one intra-op thread, trees interleaved round by round; prints each tree's median CPU
seconds per ``route`` and its ratio to the first tree's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A child per tree: the tree's ``routing`` is imported first, so that ``routed_step`` (this
# checkout's, which builds the models and puts this checkout first on ``sys.path``) finds it
# and what it imports in ``sys.modules``.
CHILD = """
import sys, time
sys.path.insert(0, {tree!r})
import torch
from server.engines import routing
sys.path.insert(1, {bench!r})
import routed_step
assert routing.__file__.startswith({tree!r}), routing.__file__
torch.set_num_threads(1)
active, canary = routed_step.models({shape!r}, "lora")
routing.route([active, canary])  # warm: first calls allocate
start = time.thread_time()
assert routing.route([active, canary]) is not None, "the policies did not route"
print(time.thread_time() - start)
"""


def probe_seconds(tree: Path, shape: str) -> float:
    code = CHILD.format(tree=str(tree), bench=str(HERE), shape=shape)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, required=True)
    parser.add_argument("--shape", choices=["demo", "28m", "80m"], default="80m")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[Path, list[float]] = {tree: [] for tree in args.trees}
    for round_ in range(args.rounds):
        for tree in args.trees:
            times[tree].append(probe_seconds(tree.resolve(), args.shape))
            print(f"round {round_ + 1}: {tree} {times[tree][-1]:.3f} s", flush=True)
    first = statistics.median(times[args.trees[0]])
    print(f"routing.route over two LoRA policies ({args.shape}), CPU s, medians of "
          f"{args.rounds} rounds:")
    for tree, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {tree!s:<30} {median:.3f} s   {median / first:.2f}x of {args.trees[0]}")


if __name__ == "__main__":
    main()
