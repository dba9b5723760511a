"""The training cycle on a real store and the tiny model: evidence, the RM floor, the gate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.training_data import is_holdout_hash
from flywheel.approval import wilson_interval
from flywheel.checkpoints import seal
from flywheel.serving_plan import record_base_policy
from flywheel.settings import PPOConfig, RewardConfig, Settings, TrainSettings
from trainer_worker.cycle import CycleContext, Skip, _carried_kl_coef, gate, run_cycle
from trainer_worker.reward import RewardModel

GOOD, BAD = "Sure! Here is a kind and clear answer.", "Ugh. Look it up yourself."


def prompts_on_side(holdout: bool, n: int) -> list[str]:
    """``n`` prompt texts that the stored split puts on the held-out (or training) side."""
    found = []
    for i in range(10_000):
        text = f"Question {i}: what is {i} plus one?"
        if is_holdout_hash(hashlib.sha256(text.encode()).hexdigest()) == holdout:
            found.append(text)
            if len(found) == n:
                return found
    raise AssertionError("no such prompts")


def seed(store: Store, model: Path, texts: list[str], rounds: int) -> None:
    """Per prompt and round, a good and a bad answer, ranked and rated: two pairs."""
    tok = AutoTokenizer.from_pretrained(model)
    for r in range(rounds):
        for p, text in enumerate(texts):
            messages = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
            ids = tok.encode(rendered, add_special_tokens=False)
            choices = [NewChoice(i, answer,
                                 [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id],
                                 [-1.0], "stop") for i, answer in enumerate((GOOD, BAD))]
            cid = f"chatcmpl-{r}-{p}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
            store.record_completion(NewCompletion(
                id=cid, kind="chat", prompt_text=text, prompt_token_ids=ids, messages=messages,
                model="flywheel", policy_version="policy-0", params={}, choices=choices))
            store.add_feedback(completion_id=cid, choice_index=0, rating="up")
            store.add_feedback(completion_id=cid, choice_index=1, rating="down")
            store.add_ranking(items=[(cid, 0), (cid, 1)])


def make_ctx(tmp_path: Path, store: Store, model: Path, *,
             reward: RewardConfig = RewardConfig(epochs=1, batch_size=4),
             **train: object) -> CycleContext:
    settings = Settings(
        data_dir=tmp_path, database_url=str(store.engine.url), model=str(model),
        train=TrainSettings(**{"eval_prompts": 4, "device": "cpu", "min_holdout_pairs": 4,
                               "reward_accuracy_floor": 0.0, **train}),  # type: ignore[arg-type]
        ppo=PPOConfig(steps=1, rollout_batch_size=4, num_minibatches=1, ppo_epochs=1,
                      max_new_tokens=8),
        reward=reward,
    )
    record_base_policy(settings, store)
    return CycleContext(settings, store, "cpu", should_stop=lambda: False, progress=False)


@pytest.fixture
def store(sqlite_store: Store) -> Store:
    return sqlite_store


def reward_root(ctx: CycleContext) -> Path:
    return Path(ctx.settings.checkpoint_dir) / "reward"


def test_too_few_pairs_skips_a_first_rm_before_training(tmp_path: Path, store: Store,
                                                         tiny_model_dir: Path) -> None:
    """A first RM counts held-out pairs and those cross-validation over the other prompts would
    judge; too few of both skip the cycle before any RM is fitted."""
    seed(store, tiny_model_dir, prompts_on_side(True, 2) + prompts_on_side(False, 2), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir, min_holdout_pairs=50)
    result = run_cycle(ctx, run_id=1)
    assert result.status == "skipped" and result.policy_id is None
    assert result.reward_model_id is None  # no RM in service yet
    reason = result.metrics["cycle/skip_reason"]
    assert reason.startswith("need 50 pairs to judge a reward model, have ")
    held_out = int(result.metrics["reward/holdout_pairs"])
    folded = int(result.metrics["reward/cross_validated_pairs"])
    assert held_out > 0 and folded > 0
    assert f"have {held_out + folded} ({held_out} on held-out prompts, {folded} by " in reason
    assert store.latest_reward_model() is None and not reward_root(ctx).exists()
    json.dumps(result.metrics)


def test_a_first_rm_is_judged_by_cross_validation_too(tmp_path: Path, store: Store,
                                                      tiny_model_dir: Path) -> None:
    """Too few held-out pairs for any RM to pass the floor on them alone; the pairs on the other
    prompts, each judged by an RM fitted without its prompt, keep a first RM that learned."""
    seed(store, tiny_model_dir, prompts_on_side(True, 1) + prompts_on_side(False, 10), rounds=2)
    floor = 0.55
    ctx = make_ctx(tmp_path, store, tiny_model_dir, min_holdout_pairs=12,
                   reward_accuracy_floor=floor,
                   reward=RewardConfig(epochs=4, batch_size=4, lr=1e-3))
    result = run_cycle(ctx, run_id=1)
    held_out = int(result.metrics["reward/holdout_pairs"])
    folded = int(result.metrics["reward/cross_validated_pairs"])
    assert wilson_interval(held_out, held_out)[0] < floor  # all right: still under the floor
    assert folded > 2 * held_out
    assert result.metrics["reward/judged_pairs"] == held_out + folded
    assert result.metrics["reward/accuracy_low"] >= floor, result.metrics.get("cycle/skip_reason")
    kept = store.latest_reward_model()
    assert kept is not None and result.reward_model_id == kept["id"]


def _rm_in_service(ctx: CycleContext, store: Store, tiny_model_dir: Path) -> None:
    """An RM in service trained on every event so far (none is new: it judges no rater)."""
    in_service = reward_root(ctx) / "rm-1"
    RewardModel.from_base(tiny_model_dir).save_pretrained(in_service)
    store.add_reward_model(id="rm-1", parent=None, path=str(in_service), sha256=None,
                           metrics={}, watermark=store.feedback_watermark(),
                           trained_on_train_split=True)


def test_a_new_rm_continues_the_one_in_service_once_held_out_pairs_can_judge_it(
        tmp_path: Path, store: Store, tiny_model_dir: Path) -> None:
    """Held-out pairs alone judge an RM that continues the one in service: no cross-validation
    (its start saw every fold)."""
    seed(store, tiny_model_dir, prompts_on_side(True, 2) + prompts_on_side(False, 2), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir, min_holdout_pairs=4)
    _rm_in_service(ctx, store, tiny_model_dir)
    result = run_cycle(ctx, run_id=1)
    assert result.reward_model_id == "rm-2", result.metrics.get("cycle/skip_reason")
    assert result.metrics["reward/warm_start"] == 1.0
    assert "reward/cross_validated_pairs" not in result.metrics
    assert store.latest_reward_model()["parent"] == "rm-1"


def test_too_few_held_out_pairs_start_a_new_rm_from_the_base(tmp_path: Path, store: Store,
                                                              tiny_model_dir: Path) -> None:
    """With an RM in service but too few held-out pairs to judge one that continues it, the
    next RM starts from the base model and is cross-validated: a small group does not wait for
    held-out pairs."""
    seed(store, tiny_model_dir, prompts_on_side(True, 1) + prompts_on_side(False, 10), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir, min_holdout_pairs=12,
                   reward_accuracy_floor=0.55,
                   reward=RewardConfig(epochs=4, batch_size=4, lr=1e-3))
    _rm_in_service(ctx, store, tiny_model_dir)
    result = run_cycle(ctx, run_id=1)
    assert result.metrics["reward/holdout_pairs"] < 12, result.metrics.get("cycle/skip_reason")
    assert result.metrics.get("reward/warm_start") == 0.0, (result.status, result.metrics)
    assert result.metrics["reward/cross_validated_pairs"] > 0
    assert result.reward_model_id == "rm-2", result.metrics.get("cycle/skip_reason")
    assert store.latest_reward_model()["parent"] is None


def test_no_held_out_prompts_skips(tmp_path: Path, store: Store, tiny_model_dir: Path) -> None:
    seed(store, tiny_model_dir, prompts_on_side(False, 3), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir)
    result = run_cycle(ctx, run_id=1)
    assert result.status == "skipped"
    assert result.metrics["cycle/skip_reason"].startswith(
        "waiting for the first rated answers to held-out prompts")
    assert not reward_root(ctx).exists()


def test_the_kl_controller_starts_where_the_last_one_ended(tmp_path: Path, store: Store,
                                                           tiny_model_dir: Path) -> None:
    ctx = make_ctx(tmp_path, store, tiny_model_dir)
    assert _carried_kl_coef(ctx) == ctx.settings.ppo.kl_coef  # none ended yet: configured
    store.add_policy(id="policy-1", parent="policy-0", path=None, sha256=None, kl_coef=0.3)
    store.add_policy(id="policy-2", parent="policy-1", path=None, sha256=None)  # a fixed one
    assert _carried_kl_coef(ctx) == 0.3


def test_gate_waits_without_held_out_prompts(tmp_path: Path, store: Store,
                                             tiny_model_dir: Path) -> None:
    """The gate never decides on no held-out answers (nor on training prompts instead)."""
    seed(store, tiny_model_dir, prompts_on_side(False, 2), rounds=1)
    ctx = make_ctx(tmp_path, store, tiny_model_dir)
    active = store.active_policy()
    with pytest.raises(Skip, match="no held-out prompts yet"):
        gate(ctx, tiny_model_dir, active, tmp_path / "no-rm", run_id=1)


@pytest.mark.slow
def test_reward_floor_skips_and_keeps_the_previous_rm(tmp_path: Path, store: Store,
                                                      tiny_model_dir: Path) -> None:
    seed(store, tiny_model_dir, prompts_on_side(True, 2) + prompts_on_side(False, 2), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir, reward_accuracy_floor=1.0)
    previous_dir = reward_root(ctx) / "rm-1"
    RewardModel.from_base(tiny_model_dir).save_pretrained(previous_dir)
    manifest = seal(previous_dir, "rm-1", parent=None)
    store.add_reward_model(id="rm-1", parent=None, path=str(previous_dir),
                           sha256=manifest.sha256, metrics={"reward/accuracy": 0.9})
    result = run_cycle(ctx, run_id=1)
    assert result.status == "skipped" and result.policy_id is None
    assert "floor 1" in result.metrics["cycle/skip_reason"]
    # Judged on every held-out pair; each round's up/down pair repeats its ranking: counted once.
    assert result.metrics["reward/holdout_pairs"] == 4
    assert result.reward_model_id == "rm-1"  # the previous RM stays in service
    assert store.latest_reward_model()["id"] == "rm-1"
    assert sorted(p.name for p in reward_root(ctx).iterdir()) == ["rm-1"]  # nothing else kept
    assert [p["id"] for p in store.list_policies()] == ["policy-0"]


@pytest.mark.slow
def test_gate_pairs_many_answers_from_few_prompts(tmp_path: Path, store: Store,
                                                  tiny_model_dir: Path) -> None:
    """Two held-out prompts, 128 answers per policy: 64 paired samples of each prompt."""
    seed(store, tiny_model_dir, prompts_on_side(True, 2) + prompts_on_side(False, 2), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir, min_improvement=-1e9, kl_budget=1e9,
                   max_length_drift=1e9, max_eos_drift=1e9)
    result = run_cycle(ctx, run_id=1)
    m = result.metrics
    assert result.status == "succeeded", m
    assert m["gate/samples"] == 128 and m["gate/prompts"] == 2
    assert m["gate/samples_per_prompt"] == 64
    assert m["gate/score_gain_low"] <= m["gate/score_gain"] <= m["gate/score_gain_high"]
    assert m["gate/reasons"] == []
    assert m["reward/holdout_pairs"] == 4 and m["reward/pairs"] == 4
    assert m["reward/trained_on_train_split"] == 1.0 and m["ppo/kl_limit"] > 0
    json.dumps(m)
    state = store.latest_reward_model_state()  # where the next cycle starts: in columns
    assert state is not None and state.id == "rm-1" and state.trained_on_train_split
    assert state.watermark == {"feedback": m["reward/feedback_watermark"],
                               "rankings": m["reward/rankings_watermark"],
                               "implicit": m["reward/implicit_watermark"]}
    assert store.latest_kl_coef() == m["ppo/kl_coef"]  # the budget controller's last
    # Stored for release, not released: publication is the worker's.
    assert store.get_policy(result.policy_id)["status"] == "candidate"
    assert store.active_policy()["id"] == "policy-0"
    assert store.latest_reward_model()["id"] == result.reward_model_id == "rm-1"

    strict = make_ctx(tmp_path / "strict", store, tiny_model_dir, min_improvement=1e9,
                      kl_budget=-1.0)
    rejected = run_cycle(strict, run_id=2)
    assert rejected.status == "rejected"
    reasons = rejected.metrics["gate/reasons"]
    assert any(r.startswith("score gain not shown") for r in reasons)
    assert any(r.startswith("KL to the base") for r in reasons)
    assert store.get_policy(rejected.policy_id)["status"] == "rejected"
    assert m["reward/warm_start"] == 0.0
    assert rejected.metrics["reward/warm_start"] == 1.0  # continued from rm-1
