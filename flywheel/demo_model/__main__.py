"""``python -m flywheel.demo_model --out DIR [--preset demo] [--seed 0]``."""

from __future__ import annotations

import argparse

from flywheel.demo_model.build import build_demo_model
from flywheel.demo_model.train import PRESETS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the Flywheel demo model.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    path = build_demo_model(args.out, preset=args.preset, seed=args.seed, progress=not args.quiet)
    print(path)


if __name__ == "__main__":
    main()
