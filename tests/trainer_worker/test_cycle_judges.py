"""Who judges a new reward model, and what a killed leader leaves for the next one: no model is
fitted here (the store, the pair counts and the checkpoint directories only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.identities import Tally
from feedback_store.training_data import is_holdout_hash
from feedback_store.types import PreferenceGroup, RewardData, RewardModelState
from flywheel.checkpoints import CheckpointError, atomic_directory
from flywheel.settings import Settings, TrainSettings
from trainer_worker.cycle import (
    CycleContext,
    check_evidence,
    judging_raters,
    reward_window,
    unrecorded_leftover_removed,
)
from trainer_worker.reward.consensus import MIN_CROSS_FIT_RATERS, in_service_tallies
from trainer_worker.reward.data import holdout_pairs


def _prompts(holdout: bool, n: int) -> list[str]:
    found = [text for i in range(1_000)
             if is_holdout_hash(hashlib.sha256(
                 (text := f"Question {i}: what is {i} plus one?").encode()).hexdigest())
             == holdout]
    return found[:n]


def _rate(store: Store, user: str | None, texts: list[str], rounds: int = 2) -> None:
    """Per prompt and round, an answer rated up and another rated down by ``user``: a pair."""
    for r in range(rounds):
        for p, text in enumerate(texts):
            cid = f"chatcmpl-{user}-{r}-{p}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
            store.record_completion(NewCompletion(
                id=cid, kind="text", prompt_text=text, prompt_token_ids=[1, 2, 3 + p],
                messages=None, model="flywheel", policy_version="policy-0", params={},
                choices=[NewChoice(i, answer, [10 + i, 20 + r, 30 + p], [-1.0], "stop")
                         for i, answer in enumerate((f"good {r} {p}", f"bad {r} {p}"))]))
            store.add_feedback(completion_id=cid, choice_index=0, rating="up", user=user)
            store.add_feedback(completion_id=cid, choice_index=1, rating="down", user=user)


def _ctx(tmp_path: Path, store: Store) -> CycleContext:
    settings = Settings(data_dir=tmp_path, database_url=str(store.engine.url),
                        model=str(tmp_path / "base"),
                        train=TrainSettings(device="cpu", min_holdout_pairs=1))
    return CycleContext(settings, store, "cpu", should_stop=lambda: False, progress=False)


def _pairs(identity: str, n: int) -> list[PreferenceGroup]:
    return [PreferenceGroup(prompt_token_ids=[1, i], answers=[[5, i], [6, i]], source="thumbs",
                            identity=identity) for i in range(n)]


def test_the_distrusted_judge_only_when_no_rater_kept_its_weight() -> None:
    trusted, distrusted = "user:honest", "user:inverted"
    assert judging_raters({trusted: 1.0, distrusted: 0.1}) == {trusted}  # whoever gave more
    assert judging_raters({distrusted: 0.1}) == {distrusted}  # a lone rater, down-weighted
    assert judging_raters({distrusted: 0.1, "user:also": 0.1}) == {distrusted, "user:also"}
    assert judging_raters({}) == set()


def test_fewer_raters_than_a_consensus_are_counted_not_judged(store: Store) -> None:
    """An RM trained on three raters' feedback stands for no consensus of others: their new
    events are counted (the model is not even read), from four on they are judged."""
    _rate(store, "a", _prompts(False, 1), rounds=1)
    _rate(store, "b", _prompts(False, 1), rounds=1)
    first = store.feedback_watermark()
    _rate(store, "c", _prompts(False, 1), rounds=1)
    _rate(store, None, _prompts(False, 1), rounds=1)  # anonymous: never a rater
    three = store.feedback_watermark()
    assert store.rater_count(first, MIN_CROSS_FIT_RATERS) == 2
    assert store.rater_count(three, MIN_CROSS_FIT_RATERS) == 3
    _rate(store, "d", _prompts(False, 1), rounds=1)
    _rate(store, "e", _prompts(False, 1), rounds=1)
    assert store.rater_count(store.feedback_watermark(), MIN_CROSS_FIT_RATERS) == 4

    def rm(until: dict[str, int]) -> RewardModelState:
        return RewardModelState("rm-1", "/no/such/reward-model", until, True)

    data = RewardData(_pairs("user:a", 3), [])
    counted = in_service_tallies(store, rm(three), data, max_length=64)
    assert counted == {"user:a": Tally(events=3)}
    with pytest.raises(OSError):  # four raters: judged by the model, which must exist
        in_service_tallies(store, rm(store.feedback_watermark()), data, max_length=64)


def test_a_lone_rater_the_trainer_distrusts_still_judges(tmp_path: Path, store: Store) -> None:
    """One rater whose new events the RM in service once ordered against it (a weak RM, or one
    stored by a run that then died before its policy): its weight drops, and with no other rater
    to judge by, leaving its pairs out left none to judge any RM by. Every later cycle skipped
    on "need 1 pairs ..., have 0", and the weight, which only a kept RM's tallies move, stayed
    down: the worker never trained again (the compose crash test's failures)."""
    _rate(store, "solo", _prompts(True, 2) + _prompts(False, 6))
    store.record_tallies({"user:solo": Tally(events=12, scored=6, agreed=0)}, 0.1)
    assert store.identity_weights(["user:solo"]) == {"user:solo": 0.1}
    ctx = _ctx(tmp_path, store)
    until = store.feedback_watermark()

    holdout = check_evidence(ctx, until)
    assert holdout_pairs(holdout) > 0
    # The first RM's window (no RM in service: one rater is counted, not judged, so nothing
    # is fitted here); the cold check would raise Skip without judges.
    window = reward_window(ctx, None, until, seed=0, holdout=holdout, cold=True)
    assert window.judges == {"user:solo"}


def test_a_distrusted_minority_still_leaves_the_held_out_sample(tmp_path: Path,
                                                                store: Store) -> None:
    held_out = _prompts(True, 3)
    _rate(store, "honest", held_out, rounds=3)
    _rate(store, "inverted", held_out[:1], rounds=1)
    store.record_tallies({"user:inverted": Tally(events=12, scored=12, agreed=0)}, 0.1)
    holdout = check_evidence(_ctx(tmp_path, store), store.feedback_watermark())
    assert holdout_pairs(holdout) > 0
    assert {g.identity for g in holdout.groups} == {"user:honest"}


def test_a_cycle_takes_back_the_id_a_killed_one_wrote_but_never_recorded(
        tmp_path: Path, store: Store) -> None:
    """A policy is written before its gate and recorded after it: a worker killed during the
    gate left policies/policy-N complete with no row, and every later cycle, taking policy-N
    again, failed on "already exists" (and, failed, consumed its feedback)."""
    root = Path(_ctx(tmp_path, store).settings.checkpoint_dir) / "policies"
    store.add_policy(id="policy-0", parent=None, path=str(tmp_path / "base"), sha256=None,
                     status="active")
    store.add_policy(id="policy-1", parent="policy-0", path=str(root / "policy-1"),
                     sha256=None, status="rejected")
    for name in ("policy-1", "policy-2"):  # policy-2: the killed worker's, never recorded
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"weights")
    out = root / store.next_policy_id()
    assert out.name == "policy-2"
    with pytest.raises(CheckpointError, match="already exists"), atomic_directory(out):
        pass  # what every later cycle hit

    with atomic_directory(unrecorded_leftover_removed(out)) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert (root / "policy-1" / "model.safetensors").read_bytes() == b"weights"
    (aside,) = root.glob(".tmp-leftover-policy-2-*")  # moved aside, removed at the next start
    assert (aside / "model.safetensors").read_bytes() == b"weights"
