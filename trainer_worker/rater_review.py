"""Trust weights kept current while a canary runs.

Identity weights are stored by training cycles (feedback_store/identities.py): each cycle scores
the raters' new events against the reward model in service. No cycle starts while a canary runs,
so without this a rater who started flooding inverted thumbs after the last cycle would keep
full weight for the canary's whole life. `RaterReview` scores the newest `REVIEW_EVENTS` events
since the RM in service was trained, against that RM, each time a quarter of that many more (or
`train.min_new_feedback`, if larger) have arrived, and adds those tallies to the stored
standing. It stores nothing: the next cycle scores the same events once more and stores them
then, so no event is counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from feedback_store import Store
from feedback_store.errors import StoreError
from feedback_store.identities import Tally
from feedback_store.types import Marks, RewardModelState
from flywheel.settings import Settings

log = logging.getLogger(__name__)

# Newest events scored per review: enough for the Wilson bound to catch any rater behind a few
# percent of them, and seconds of reward-model scoring on a CPU, between two polls.
REVIEW_EVENTS = 2_000


class RaterReview:
    """The worker's current view of each rater's trust weight."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._key: tuple[str, int] | None = None  # (RM id, events stored) at the last review
        self._tallies: dict[str, Tally] = {}

    def weights(self, names: Iterable[str], device: str = "cpu") -> dict[str, float]:
        """Each identity's weight from its stored standing plus what the review found since."""
        self._refresh(device)
        return self._combined(set(names))

    def _combined(self, names: set[str]) -> dict[str, float]:
        return self.store.weights_with(self._tallies, names,
                                       self.settings.feedback.disagreeing_weight)

    def _refresh(self, device: str) -> None:
        rm = self.store.latest_reward_model_state()
        if rm is None:
            self._key, self._tallies = None, {}
            return
        until = self.store.feedback_watermark()
        events = until["feedback"] + until["rankings"]
        if (self._key is not None and self._key[0] == rm.id
                and events - self._key[1] < max(self.settings.train.min_new_feedback,
                                                REVIEW_EVENTS // 4)):
            return
        try:
            self._tallies = self._score(rm, until, device)
        except (OSError, StoreError, ValueError) as exc:
            log.warning("rater review skipped (weights stay as stored and last reviewed): %s",
                        exc)
            return
        self._key = (rm.id, events)
        low = sorted(name for name, weight in self._combined(set(self._tallies)).items()
                     if weight < 1.0)
        log.info("rater review against %s: %d raters with new events, %d down-weighted%s",
                 rm.id, len(self._tallies), len(low), f" ({', '.join(low[:5])})" if low else "")

    def _score(self, rm: RewardModelState, until: Marks, device: str) -> dict[str, Tally]:
        from trainer_worker.reward.consensus import in_service_tallies

        data = self.store.cycle_reward_data(since=rm.watermark, until=until,
                                            new=min(REVIEW_EVENTS,
                                                    self.settings.feedback.new_examples),
                                            replay=0, seed=0)
        if not data.groups and not data.thumbs:
            return {}
        return in_service_tallies(self.store, rm, data, self.settings.reward.max_length, device)
