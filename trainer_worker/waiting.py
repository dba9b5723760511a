"""What a wait is waiting for, said in users' terms: an undecided canary, a skipped cycle.

Each text goes into the record's metrics and from there into the `reason` of `/v1/policies` and
`/v1/training/runs`, the console and the log.
"""

from __future__ import annotations

from flywheel.approval import CanaryDecision, GiveWay
from flywheel.raters import is_untrusted_key

RaterThumbs = dict[str, tuple[int, int]]


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def canary_wait_reason(decision: CanaryDecision, thumbs: dict[str, RaterThumbs], active: str,
                       canary: str, give_way: GiveWay | None = None) -> str:
    """Why a canary is still undecided: too few thumbs, raters the rules cannot count yet, or an
    interval that still straddles both bounds (and, by ``give_way``, when a newer candidate may
    take its place)."""
    raters = set(thumbs.get(active, {})) | set(thumbs.get(canary, {}))
    if len(raters) == 1 and is_untrusted_key(next(iter(raters))):
        return ("canary: every thumb so far comes from one untrusted API key, which counts as "
                "one rater and cannot decide alone; it needs thumbs from other raters (or list "
                "the key in FLYWHEEL_TRUSTED_KEYS if it vouches for its users)")
    counted = min(decision.active.n, decision.canary.n)
    if counted < decision.min_ratings:
        return (f"canary: {decision.canary.n:.0f} counted thumbs on {canary} and "
                f"{decision.active.n:.0f} on {active} from {len(raters)} rater(s), "
                f"{decision.min_ratings} needed on each before a decision")
    low, high = decision.interval
    if decision.tipped_by is not None and decision.without is not None:
        who = ("an untrusted API key, which could be anyone"
               if is_untrusted_key(decision.tipped_by) else "one rater")
        return (f"canary: {len(raters)} raters rate {canary} {_points(decision.shown)} points "
                f"against {active} (always-valid 95% interval {_points(low)} to "
                f"{_points(high)}), but without the thumbs of {who} ({decision.tipped_by}) the "
                f"others show {_points(decision.without)}: no single rater decides a small "
                "group's canary; more thumbs from the others settle it")
    return (f"canary: {len(raters)} rater(s) so far rate {canary} {_points(decision.shown)} points "
            f"against {active} (always-valid 95% interval {_points(low)} to {_points(high)}); "
            f"it is promoted once the interval lies above {_points(-decision.margin)} and "
            "rejected once it lies below 0: more thumbs or more raters narrow it"
            + (f"; {rule}" if give_way and (rule := give_way.describe()) else ""))


def cap_note(metrics: dict[str, float]) -> str:
    """"; identity caps kept K of N examples (...)" when the caps cut more than a tenth of a
    cycle's examples, else ""."""
    capped = int(metrics.get("reward/capped_examples", 0))
    cap = metrics.get("reward/identity_cap")
    if capped <= 0 or cap is None:
        return ""
    kept = int(metrics.get("reward/kept_examples", 0))
    if capped * 10 <= capped + kept:
        return ""
    return (f"; identity caps kept {kept} of {kept + capped} examples (one rater keeps at most "
            f"{int(cap)}: every untrusted API key is one rater, and one alone counts nothing; "
            "list keys that vouch for their users in FLYWHEEL_TRUSTED_KEYS)")
