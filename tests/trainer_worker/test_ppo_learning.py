"""PPO on the tiny demo model learns what a reward model trained on its own samples prefers."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from feedback_store.types import PreferenceGroup, RewardData
from flywheel.settings import PPOConfig, RewardConfig
from trainer_worker.evaluate import evaluate_policy
from trainer_worker.ppo import TrainingInterrupted, run_ppo
from trainer_worker.ppo.causal_lm import load_causal_lm, resolve_eos_token_ids
from trainer_worker.ppo.rollout import make_rollout
from trainer_worker.reward import train_reward_model

pytestmark = pytest.mark.slow

USER_MESSAGES = [
    "Hello!", "What is the capital of France?", "Name one animal, please.", "What is 3 plus 4?",
    "Spell the word apple.", "Hi there.", "What is the capital of Japan?", "Name a color.",
    "What is 9 minus 2?", "Good morning!", "Spell the word house.", "What is the capital of Peru?",
    "Name one animal.", "What is 5 plus 5?", "Hey, how are you?", "Spell the word river.",
]
MAX_NEW = 16


FAST_PPO = PPOConfig(steps=8, rollout_batch_size=16, max_new_tokens=MAX_NEW, ppo_epochs=4,
                     num_minibatches=1, lr=1e-3, critic_lr=1e-3, kl_coef=0.02)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                           add_generation_prompt=True) for m in USER_MESSAGES]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sample(model_dir: Path, prompts: list[list[int]], seed: int) -> list[list[int]]:
    """One sampled answer per prompt, EOS included when the answer stopped."""
    policy = load_causal_lm(model_dir, "cpu")
    rollout = make_rollout(
        policy, prompts, max_new_tokens=MAX_NEW, temperature=1.0,
        eos_token_ids=resolve_eos_token_ids(model_dir, None), pad_token_id=0, device="cpu",
        generator=torch.Generator().manual_seed(seed),
    )
    answers = rollout.input_ids[:, rollout.prompt_width:]
    return [a[m.bool()].tolist() for a, m in zip(answers, rollout.answer_mask, strict=True)]


@pytest.fixture(scope="module")
def feature_reward(tiny_model_dir: Path, prompts: list[list[int]],
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A reward model trained on rankings of the base model's samples by count of one token.

    The token is one that about 40% of the base answers contain, so PPO can make it more
    frequent. Returns (reward_dir, token).
    """
    batch = [p for p in prompts for _ in range(16)]
    answers = sample(tiny_model_dir, batch, seed=1)
    eos = set(resolve_eos_token_ids(tiny_model_dir, None))
    doc_freq = Counter(t for a in answers for t in set(a) if t not in eos)
    token = min(doc_freq, key=lambda t: abs(doc_freq[t] / len(answers) - 0.4))
    groups = []
    for start in range(0, len(batch), 4):  # 4 answers to the same prompt, in order of count
        by_count = {a.count(token): a for a in answers[start : start + 4]}
        if len(by_count) >= 2:
            ranked = [by_count[c] for c in sorted(by_count, reverse=True)]
            groups.append(PreferenceGroup(batch[start], ranked, "ranking"))
    out = tmp_path_factory.mktemp("reward") / "rm"
    metrics = train_reward_model(tiny_model_dir, RewardData(groups=groups),
                                 RewardConfig(lr=1e-3, epochs=3, batch_size=4), out,
                                 progress=False)
    assert metrics["reward/accuracy"] > 0.7, metrics
    return out, token


def test_ppo_raises_the_reward(tiny_model_dir: Path, prompts: list[list[int]],
                               feature_reward: tuple[Path, int], tmp_path: Path) -> None:
    reward_dir, _ = feature_reward
    kwargs = {"max_new_tokens": MAX_NEW, "seed": 7, "samples_per_prompt": 4}
    before = evaluate_policy(tiny_model_dir, tiny_model_dir, reward_dir, prompts, **kwargs)
    metrics = run_ppo(tiny_model_dir, tiny_model_dir, reward_dir, prompts, FAST_PPO,
                      tmp_path / "policy", progress=False)
    after = evaluate_policy(tmp_path / "policy", tiny_model_dir, reward_dir, prompts, **kwargs)

    assert after["eval/score_mean"] > before["eval/score_mean"] + 0.3, (before, after)
    assert before["eval/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert 0.0 < after["eval/kl_ref"] < 50.0
    assert metrics["ppo/steps"] == FAST_PPO.steps
    for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "kl_ref",
                "score_mean", "reward_mean", "kl_coef", "rollout_tokens_per_s", "samples_per_s"):
        assert math.isfinite(metrics[f"ppo/{key}"]), key
    # The output is a complete HF directory whose weights moved.
    old = load_file(tiny_model_dir / "model.safetensors")
    new = load_file(tmp_path / "policy" / "model.safetensors")
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert all(torch.isfinite(v).all() for v in new.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "policy" / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    AutoTokenizer.from_pretrained(tmp_path / "policy")


def test_lora_writes_merged_model_and_adapter(tiny_model_dir: Path, prompts: list[list[int]],
                                              feature_reward: tuple[Path, int],
                                              tmp_path: Path) -> None:
    cfg = FAST_PPO.model_copy(update={"steps": 1, "rollout_batch_size": 8, "use_lora": True,
                                      "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2})
    run_ppo(tiny_model_dir, tiny_model_dir, feature_reward[0], prompts, cfg, tmp_path / "out",
            progress=False)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    old = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert old.keys() == merged.keys()  # merged into plain weights, no lora_ names
    assert any(not torch.equal(old[k], merged[k]) for k in old)


def test_interrupted_ppo_writes_nothing(tiny_model_dir: Path, prompts: list[list[int]],
                                       feature_reward: tuple[Path, int], tmp_path: Path) -> None:
    calls = iter(range(100))
    cfg = FAST_PPO.model_copy(update={"steps": 2, "rollout_batch_size": 8})
    with pytest.raises(TrainingInterrupted):
        run_ppo(tiny_model_dir, tiny_model_dir, feature_reward[0], prompts, cfg, tmp_path / "out",
                progress=False, should_stop=lambda: next(calls) >= 3)
    assert not (tmp_path / "out").exists()
