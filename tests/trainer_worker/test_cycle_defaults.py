"""Settings a cycle depends on: PPO rates by model size, precision, bad limits at start-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from flywheel.settings import FeedbackLimits, PPOConfig, Settings
from trainer_worker.ppo.defaults import autocast_dtype, default_rates, learning_rates


def test_rates_by_model_size() -> None:
    assert default_rates(2_000_000, use_lora=False) == default_rates(2_000_000, use_lora=True)
    assert (default_rates(2_000_000, False).policy, default_rates(2_000_000, False).critic) == (
        1e-4, 3e-4)
    mid, large = default_rates(500_000_000, False), default_rates(7_000_000_000, False)
    assert (mid.policy, mid.critic) == (3e-6, 1e-5)
    assert (large.policy, large.critic) == (1e-6, 1e-5)
    assert default_rates(500_000_000, True).policy == pytest.approx(3e-5)


def test_configured_rates_win_and_demo_rates_on_a_large_model_warn(
        caplog: pytest.LogCaptureFixture) -> None:
    large = nn.Linear(10_000, 10_001, device="meta")  # 100M parameters, no memory
    chosen = learning_rates(PPOConfig(), large)
    assert (chosen.policy, chosen.critic) == (3e-6, 1e-5)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        chosen = learning_rates(PPOConfig(lr=1e-4, critic_lr=3e-4), large)
    assert (chosen.policy, chosen.critic) == (1e-4, 3e-4)
    assert "demo" in caplog.text


def test_precision() -> None:
    assert autocast_dtype(PPOConfig(), "cpu") is None
    assert autocast_dtype(PPOConfig(dtype="float32"), "cuda") is None
    assert str(autocast_dtype(PPOConfig(dtype="bfloat16"), "cuda:0")) == "torch.bfloat16"


@pytest.mark.parametrize("bad", [
    {"user_share": 0.0}, {"user_share": 1.5}, {"replay_examples": 30_000},
    {"new_examples": 0}, {"rate_per_minute": -1.0},
])
def test_bad_limits_fail_at_start_up(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        FeedbackLimits(**bad)  # type: ignore[arg-type]


def test_bad_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_FEEDBACK__REPLAY_EXAMPLES", "100000")
    with pytest.raises(ValidationError, match="larger than the cycle's new data"):
        Settings()
    monkeypatch.setenv("FLYWHEEL_FEEDBACK__REPLAY_EXAMPLES", "100")
    monkeypatch.setenv("FLYWHEEL_FEEDBACK__USER_SHARE", "0")
    with pytest.raises(ValidationError, match="user_share"):
        Settings()


def test_lora_continues_one_adapter_on_the_base_and_the_reference_is_no_copy(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Cycle after cycle the adapter stays relative to the base (what vLLM serves on it), and
    the KL reference is the base under the policy with adapters off: no weights of its own."""
    from trainer_worker.ppo.causal_lm import AdaptersOff, load_causal_lm
    from trainer_worker.ppo.trainer import load_models, run_ppo
    from trainer_worker.reward import RewardModel

    RewardModel.from_base(tiny_model_dir).save_pretrained(tmp_path / "rm")
    cfg = PPOConfig(use_lora=True, lora_rank=4, steps=1, rollout_batch_size=2, ppo_epochs=1,
                    num_minibatches=1, max_new_tokens=4)
    first = tmp_path / "policy-1"
    run_ppo(tiny_model_dir, tiny_model_dir, tmp_path / "rm", [[5, 6, 7]], cfg, first,
            progress=False)
    adapter = json.loads((first / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == tiny_model_dir.resolve()
    models = load_models(first, tiny_model_dir, tmp_path / "rm", cfg, "cpu")
    assert isinstance(models.ref, AdaptersOff) and not list(models.ref.parameters())
    assert any(p.requires_grad for p in models.policy.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    base = load_causal_lm(tiny_model_dir, "cpu")
    with torch.no_grad():
        assert torch.allclose(models.ref(input_ids=ids).logits, base(input_ids=ids).logits,
                              atol=1e-5)
        merged = load_causal_lm(first, "cpu")
        assert torch.allclose(models.policy(input_ids=ids).logits,
                              merged(input_ids=ids).logits, atol=1e-4)
