"""PPO maths against naive Python loops on tiny random tensors (cleanrl's GAE test style)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_worker.ppo.core import (
    MIN_KL_COEF,
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    kl_budget_controller,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)

B, T, V = 3, 6, 5


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def random_mask(gen: torch.Generator, layout: str = "right") -> torch.Tensor:
    """Rows of 6, 3 and 1 real tokens: right-padded, left-padded or with random holes."""
    if layout == "holes":
        mask = (torch.rand(B, T, generator=gen) > 0.4).float()
        mask[:, 1] = 1  # never empty
        return mask
    mask = torch.zeros(B, T)
    for i, n in enumerate([T, 3, 1]):
        if layout == "left":
            mask[i, T - n :] = 1
        else:
            mask[i, :n] = 1
    return mask


def real(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]


def test_masked_statistics(gen: torch.Generator) -> None:
    x = torch.randn(B, T, generator=gen)
    mask = random_mask(gen)
    xs = real(x, mask)
    mean = sum(xs) / len(xs)
    var = sum((v - mean) ** 2 for v in xs) / (len(xs) - 1)
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-5)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-5)
    for i in range(B):
        row = real(x[i], mask[i])
        assert masked_mean(x, mask, dim=1)[i].item() == pytest.approx(sum(row) / len(row), 1e-5)
    white = masked_whiten(x, mask)
    for got, v in zip(real(white, mask), xs, strict=True):
        assert got == pytest.approx((v - mean) / math.sqrt(var + 1e-8), rel=1e-4)
    assert real(white, 1 - mask) == [0.0] * int((1 - mask).sum())
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(unshifted, mask).item() == pytest.approx(mean, abs=1e-5)


def test_logprobs_and_entropy(gen: torch.Generator) -> None:
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    logp = logprobs_from_logits(logits, labels)
    entropy = entropy_from_logits(logits)
    for b in range(B):
        for t in range(T):
            row = logits[b, t].tolist()
            z = sum(math.exp(v) for v in row)
            probs = [math.exp(v) / z for v in row]
            assert logp[b, t].item() == pytest.approx(math.log(probs[labels[b, t]]), rel=1e-5)
            h = -sum(p * math.log(p) for p in probs)
            assert entropy[b, t].item() == pytest.approx(h, rel=1e-5)


def test_kl_estimators(gen: torch.Generator) -> None:
    logp, ref = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    for b in range(B):
        for t in range(T):
            d = logp[b, t].item() - ref[b, t].item()
            assert kl_penalty(logp, ref, "k1")[b, t].item() == pytest.approx(d, rel=1e-5)
            assert kl_penalty(logp, ref, "k2")[b, t].item() == pytest.approx(d * d / 2, rel=1e-5)
            k3 = math.exp(-d) - 1 + d
            assert kl_penalty(logp, ref, "k3")[b, t].item() == pytest.approx(k3, rel=1e-4)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")  # type: ignore[arg-type]


def test_compute_rewards(gen: torch.Generator) -> None:
    logp, ref = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    mask = random_mask(gen)
    scores = torch.randn(B, generator=gen)
    has_eos = torch.tensor([False, True, True])
    rewards, kl = compute_rewards(scores, logp, ref, mask, has_eos, kl_coef=0.1,
                                  missing_eos_penalty=1.0)
    for b in range(B):
        last = max(t for t in range(T) if mask[b, t])
        for t in range(T):
            expected = 0.0
            if mask[b, t]:
                expected = -0.1 * (logp[b, t] - ref[b, t]).item()
                if t == last:
                    expected += scores[b].item() - (0.0 if has_eos[b] else 1.0)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
            expected_kl = mask[b, t].item() * (logp[b, t] - ref[b, t]).item()
            assert kl[b, t].item() == pytest.approx(expected_kl, abs=1e-6)


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float
              ) -> list[float]:
    """cleanrl's loop over one episode's real steps; the value after the last step is 0."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_compute_gae(gen: torch.Generator, layout: str, gamma: float, lam: float) -> None:
    rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    mask = random_mask(gen, layout)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        expected = naive_gae(real(rewards[b], mask[b]), real(values[b], mask[b]), gamma, lam)
        assert real(advantages[b], mask[b]) == pytest.approx(expected, abs=1e-5)
        expected_returns = [a + v for a, v in zip(expected, real(values[b], mask[b]), strict=True)]
        assert real(returns[b], mask[b]) == pytest.approx(expected_returns, abs=1e-5)
    assert (advantages * (1 - mask)).abs().sum() == 0
    assert (returns * (1 - mask)).abs().sum() == 0


def test_ppo_policy_loss(gen: torch.Generator) -> None:
    old = torch.randn(B, T, generator=gen)
    new = old + 0.5 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    mask = random_mask(gen)
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    losses, clipped, kls = [], [], []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            unclipped_loss, clipped_loss = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            losses.append(max(unclipped_loss, clipped_loss))
            clipped.append(float(clipped_loss > unclipped_loss))
            kls.append(ratio - 1 - math.log(ratio))
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-4)


def test_ppo_policy_loss_gradient_vanishes_when_clipped() -> None:
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, 0.5]], requires_grad=True)  # ratio e^0.5 > 1.2
    adv = torch.ones(1, 2)
    loss, clipfrac, _ = ppo_policy_loss(new, old, adv, torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    assert clipfrac.item() == 1.0
    assert new.grad is not None and new.grad.abs().sum() == 0


def test_value_loss(gen: torch.Generator) -> None:
    old = torch.randn(B, T, generator=gen)
    new = old + torch.randn(B, T, generator=gen)
    returns = torch.randn(B, T, generator=gen)
    mask = random_mask(gen)
    loss, clipfrac = value_loss(new, old, returns, mask, cliprange_value=0.2)
    losses, clipped = [], []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            v, v_old, r = new[b, t].item(), old[b, t].item(), returns[b, t].item()
            v_clip = v_old + min(max(v - v_old, -0.2), 0.2)
            losses.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
            clipped.append(float((v_clip - r) ** 2 > (v - r) ** 2))
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(12.0, 64)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))
    adaptive.update(float("nan"), 100)
    assert math.isfinite(adaptive.value)


def test_kl_budget_controller() -> None:
    """Aimed at 0.8 x budget, reacting within a few steps, never below its floor."""
    ctl = kl_budget_controller(10.0, 0.05, batch_size=32)
    assert ctl.target == pytest.approx(8.0)
    ctl.update(16.0, 32)  # twice the target: the coefficient doubles in one step
    assert ctl.value == pytest.approx(0.1)
    ctl.update(40.0, 32)  # error clipped to +1
    assert ctl.value == pytest.approx(0.2)
    ctl.update(0.0, 32)  # far under the target: halves, no faster
    assert ctl.value == pytest.approx(0.1)
    for _ in range(50):
        ctl.update(0.0, 32)
    assert ctl.value == pytest.approx(MIN_KL_COEF)
    assert kl_budget_controller(10.0, 0.0, 32).value == MIN_KL_COEF  # a carried 0 restarts
    with pytest.raises(ValueError):
        kl_budget_controller(0.0, 0.05, 32)
