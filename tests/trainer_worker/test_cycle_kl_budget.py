"""The KL budget across cycles: PPO from the active policy stays within the budget to the base."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from feedback_store.types import PreferenceGroup, RewardData
from flywheel.settings import PPOConfig, RewardConfig
from trainer_worker.cycle import KL_LIMIT_SHARE
from trainer_worker.evaluate import evaluate_policy
from trainer_worker.ppo import run_ppo
from trainer_worker.ppo.causal_lm import load_causal_lm, resolve_eos_token_ids
from trainer_worker.ppo.core import kl_budget_controller
from trainer_worker.ppo.rollout import make_rollout
from trainer_worker.reward import train_reward_model

pytestmark = pytest.mark.slow

MESSAGES = ["Hello!", "What is the capital of France?", "Name one animal, please.",
            "What is 3 plus 4?", "Spell the word apple.", "Hi there.", "Name a color.",
            "What is 9 minus 2?"]
MAX_NEW = 16
BUDGET = 2.0  # nats per answer: tight for this learning rate
# Large steps, so that a fixed coefficient walks far from the base within one short cycle.
PPO = PPOConfig(steps=8, rollout_batch_size=16, max_new_tokens=MAX_NEW, ppo_epochs=4,
                num_minibatches=1, lr=1e-3, critic_lr=1e-3, kl_coef=0.02)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                     add_generation_prompt=True) for m in MESSAGES]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir: Path, prompts: list[list[int]],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RM preferring more of a token that ~40% of the base answers hold: PPO can chase it."""
    policy = load_causal_lm(tiny_model_dir, "cpu")
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    batch = [p for p in prompts for _ in range(16)]
    rollout = make_rollout(policy, batch, max_new_tokens=MAX_NEW, temperature=1.0,
                           eos_token_ids=eos, pad_token_id=0, device="cpu",
                           generator=torch.Generator().manual_seed(1))
    answers = [a[m.bool()].tolist() for a, m in
               zip(rollout.input_ids[:, rollout.prompt_width:], rollout.answer_mask, strict=True)]
    doc_freq = Counter(t for a in answers for t in set(a) if t not in eos)
    token = min(doc_freq, key=lambda t: abs(doc_freq[t] / len(answers) - 0.4))
    groups = []
    for start in range(0, len(batch), 4):
        by_count = {a.count(token): a for a in answers[start : start + 4]}
        if len(by_count) >= 2:
            ranked = [by_count[c] for c in sorted(by_count, reverse=True)]
            groups.append(PreferenceGroup(batch[start], ranked, "ranking"))
    out = tmp_path_factory.mktemp("reward") / "rm"
    train_reward_model(tiny_model_dir, RewardData(groups=groups),
                       RewardConfig(lr=1e-3, epochs=3, batch_size=4), out, progress=False)
    return out


def kl_to_base(policy_dir: Path, base: Path, reward_dir: Path,
               prompts: list[list[int]]) -> dict[str, float]:
    """As the gate measures it: 128 answers at the serving temperature."""
    return evaluate_policy(policy_dir, base, reward_dir, prompts, max_new_tokens=MAX_NEW,
                           seed=7, samples_per_prompt=16, temperature=1.0)


def test_budget_controller_keeps_the_candidate_within_budget_across_cycles(
        tiny_model_dir: Path, prompts: list[list[int]], reward_dir: Path,
        tmp_path: Path) -> None:
    base = tiny_model_dir
    fixed = run_ppo(base, base, reward_dir, prompts, PPO, tmp_path / "fixed", progress=False)
    fixed_eval = kl_to_base(tmp_path / "fixed", base, reward_dir, prompts)
    assert fixed_eval["eval/kl_ref"] > BUDGET, (fixed, fixed_eval)  # the fixed coefficient

    # Cycle 1 from the base, cycle 2 from cycle 1's candidate: KL is measured to the base.
    active, coef = base, PPO.kl_coef
    for cycle in (1, 2):
        out = tmp_path / f"cycle{cycle}"
        metrics = run_ppo(active, base, reward_dir, prompts, PPO.model_copy(update={"seed": cycle}),
                          out, progress=False,
                          kl_ctl=kl_budget_controller(BUDGET, coef, PPO.rollout_batch_size),
                          kl_limit=KL_LIMIT_SHARE * BUDGET)
        measured = kl_to_base(out, base, reward_dir, prompts)
        assert measured["eval/kl_ref"] < BUDGET, (cycle, metrics, measured)
        assert metrics["ppo/kl_target"] == pytest.approx(0.8 * BUDGET)
        assert metrics["ppo/kl_ref_final"] <= KL_LIMIT_SHARE * BUDGET
        active, coef = out, metrics["ppo/kl_coef"]
    assert measured["eval/kl_ref"] > 0.0  # it moved: the budget is spent, not refused
