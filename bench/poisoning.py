"""bench/learning.py with two hostile users who rate every answer the wrong way round, as much
as ten honest users together, beside the same run without them.

    python bench/poisoning.py --taste terse --minutes 10

Ten honest users (the taste of bench/tastes.py) and two hostile ones: each hostile user is
drawn five times as often as an honest one, so the two give as many ratings as the ten honest
users combined, and every thumb they give is inverted and every ranking reversed. Printed per
run: approval by the honest taste of the first and the last served policy (the target: at least
15 points of rise with the hostile users), and the identities' weights (GET /v1/identities) at
the end of the poisoned run. The simulation, the server and the summary are bench/learning.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import learning

HOSTILE = ("hostile-0", "hostile-1")
HONEST = 10
VOLUME = 5  # draws of each hostile user per draw of an honest one: 2 x 5 = 10 honest users


class PoisonedUsers(learning.SimulatedUsers):
    """The simulated users, plus hostile ones whose feedback is inverted on the way out."""

    async def _post(self, kind: str, path: str, payload: dict[str, Any]) -> None:
        if payload.get("user") in HOSTILE:
            payload = dict(payload)
            if "rating" in payload:
                payload["rating"] = "down" if payload["rating"] == "up" else "up"
            if "ranking" in payload:
                payload["ranking"] = list(reversed(payload["ranking"]))
        await super()._post(kind, path, payload)


def poisoned(client: httpx.AsyncClient, taste: Any, rng: Any, n: int,
             users: list[str]) -> PoisonedUsers:
    return PoisonedUsers(client, taste, rng, n, [*users, *(h for h in HOSTILE
                                                           for _ in range(VOLUME))])


async def identities(url: str, admin_key: str | None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
        response = await client.get("/v1/identities", params={"limit": 20})
        return list(response.json().get("data", [])) if response.status_code == 200 else []


def run(label: str, args: argparse.Namespace, hostile: bool) -> dict[str, Any]:
    """One bench/learning.py run; returns its summary JSON (and the identities at the end)."""
    out = Path(args.out) / f"poisoning-{label}"
    seen: list[list[dict[str, Any]]] = []
    original_users, original_final = learning.SimulatedUsers, learning.fetch_final
    if hostile:
        learning.SimulatedUsers = poisoned  # type: ignore[misc, assignment]

    async def final_with_identities(url: str) -> Any:
        seen.append(await identities(url, None))
        return await original_final(url)

    learning.fetch_final = final_with_identities  # type: ignore[assignment]
    sys.argv = ["learning.py", "--taste", args.taste, "--minutes", str(args.minutes),
                "--users", str(HONEST), "--out", str(out), "--seed", str(args.seed),
                "--plot", str(Path(args.plot_dir) / f"poisoning-{label}-{args.taste}.png"),
                *(f"--set={item}" for item in args.set)]
    try:
        learning.main()
    finally:
        learning.SimulatedUsers, learning.fetch_final = original_users, original_final
    summary = json.loads((out / f"learning-{args.taste}.json").read_text())
    summary["identities"] = seen[0] if seen else []
    return summary


def rise(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    versions = [v for v in summary["versions"] if v["answers"]]
    first = versions[0]["approval"] if versions else None
    final = summary["final"]["approval"] if summary.get("final") else None
    return first, final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taste", default="terse")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--plot-dir", default="bench/out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", choices=("clean", "poisoned"), default=None)
    args = parser.parse_args()
    results = {}
    for label, hostile in (("clean", False), ("poisoned", True)):
        if args.only in (None, label):
            results[label] = run(label, args, hostile)
    print(f"\n{'run':<10} {'first':>7} {'final':>7} {'rise':>8}")
    for label, summary in results.items():
        first, final = rise(summary)
        gain = None if first is None or final is None else 100 * (final - first)
        print(f"{label:<10} {learning._pct(first):>7} {learning._pct(final):>7} "
              f"{'-' if gain is None else format(gain, '+.1f'):>8} points"
              f"{'  (target: >= +15)' if label == 'poisoned' else ''}")
    for row in results.get("poisoned", {}).get("identities", [])[:6]:
        agreement = "-" if row["agreement"] is None else f"{row['agreement']:.2f}"
        print(f"  {row['identity']:<16} weight {row['weight']:.2f}, {row['events']} events, "
              f"agreement {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
