"""Which raters the trust weight down-weights, simulated for crowds of 1 to 1,000 raters.

    python bench/trust_weights.py [--runs 200] [--events 40 160]

For 1, 3, 10, 100 and 1,000 honest raters alone, beside hostile raters (a fifth as many, at
least one, at half an honest rater's volume, thumbing against their taste) and beside one
untrusted key minting `user` ids (one identity, as much as all honest raters together,
inverted), prints the share of honest raters down-weighted (false), of hostile raters caught
and of runs that catch the key, after ``--events`` new events per honest rater judged by a
reward model in service of accuracy 0.6 or 0.75 on the crowd's taste
(tests/simulated_trust.py; tests/trainer_worker/test_trust_scenarios.py checks the targets).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.simulated_trust import TrustCrowd, rates

ACCURACIES = (0.6, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--events", type=float, nargs="+", default=[40.0, 160.0])
    args = parser.parse_args()
    head = " | ".join(f"acc {a}: honest down / hostile caught / key caught" for a in ACCURACIES)
    for events in args.events:
        print(f"\n{events:g} new events per honest rater, {args.runs} runs per row")
        print(f"| crowd | {head} |")
        for n in (1, 3, 10, 100, 1000):
            runs = args.runs if n < 1000 else max(1, args.runs // 10)
            for label, crowd in ((f"{n} honest", TrustCrowd(n)),
                                 (f"{n} honest + {max(1, n // 5)} hostile",
                                  TrustCrowd(n, hostile=max(1, n // 5))),
                                 (f"{n} honest + minting key", TrustCrowd(n, minted=True))):
                cells = [" / ".join("-" if math.isnan(x) else f"{x:.1%}"
                                    for x in rates(crowd, a, events, runs))
                         for a in ACCURACIES]
                print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
