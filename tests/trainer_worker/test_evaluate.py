"""Sampling (shared by rollouts and the gate) and the evaluation gate's measurements."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flywheel.settings import TrainSettings
from trainer_worker.evaluate import (
    PolicySamples,
    compare_policies,
    evaluate_policy,
    gate_reasons,
    paired_interval,
    sample_policy,
)
from trainer_worker.ppo.causal_lm import load_causal_lm, resolve_eos_token_ids
from trainer_worker.ppo.rollout import (
    answer_logprobs,
    answer_scores,
    answer_values,
    make_rollout,
    pad_left,
    sample_answers,
)
from trainer_worker.reward import RewardModel
from trainer_worker.reward.data import pad_right, strip_eos

PROMPTS = [[3, 100, 101, 102, 1, 4], [3, 120, 1, 4], [3, 130, 131, 132, 133, 134, 1, 4]]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reward") / "rm"
    model = RewardModel.from_base(tiny_model_dir, seed=1)
    model.score_mean, model.score_std = 0.3, 2.0
    model.save_pretrained(out)
    return out


def test_greedy_sampling_matches_generate(tiny_model_dir: Path) -> None:
    policy = load_causal_lm(tiny_model_dir, "cpu")
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    ids, mask = pad_left(PROMPTS, 0, "cpu")
    answers, answer_mask, has_eos = sample_answers(
        policy, ids, mask, max_new_tokens=12, temperature=0.0, eos_token_ids=eos, pad_token_id=0)
    with torch.no_grad():
        expected = policy.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for row in range(len(PROMPTS)):
        ours = answers[row][answer_mask[row].bool()].tolist()
        theirs = expected[row, ids.shape[1]:].tolist()[: len(ours)]
        assert ours == theirs
        assert has_eos[row].item() == (ours[-1] in eos)


def test_sampling_masks_after_the_first_eos(tiny_model_dir: Path) -> None:
    policy = load_causal_lm(tiny_model_dir, "cpu")
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    prompts = PROMPTS * 8
    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "eos_token_ids": eos, "pad_token_id": 0,
              "device": "cpu"}
    rollout = make_rollout(policy, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    again = make_rollout(policy, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(rollout.input_ids, again.input_ids)
    answers = rollout.input_ids[:, rollout.prompt_width:]
    for row in range(len(prompts)):
        n = int(rollout.answer_mask[row].sum())
        assert rollout.answer_mask[row, :n].all() and not rollout.answer_mask[row, n:].any()
        real = answers[row, :n].tolist()
        assert all(t not in eos for t in real[:-1])
        assert rollout.has_eos[row].item() == (real[-1] in eos)
        assert rollout.has_eos[row] or n == 10


def test_rollout_scores_match_reward_training_readout(tiny_model_dir: Path,
                                                      reward_dir: Path) -> None:
    """PPO reads the RM where RM training reads it: the last content token, EOS excluded."""
    policy = load_causal_lm(tiny_model_dir, "cpu")
    reward = RewardModel.from_pretrained(reward_dir)
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    rollout = make_rollout(policy, PROMPTS * 4, max_new_tokens=10, temperature=1.0,
                           eos_token_ids=eos, pad_token_id=0, device="cpu",
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = answer_scores(reward, rollout)
        answers = rollout.input_ids[:, rollout.prompt_width:]
        sequences = [p + strip_eos(a[m.bool()].tolist(), eos) for p, a, m in
                     zip(PROMPTS * 4, answers, rollout.answer_mask, strict=True)]
        expected = reward.normalize(reward(*pad_right(sequences)))
    assert rollout.has_eos.any()
    assert torch.allclose(scores, expected, atol=1e-4)


def test_answer_logprobs_match_sampling_distribution(tiny_model_dir: Path) -> None:
    """Logprobs recomputed on the padded batch equal a one-sequence-at-a-time forward."""
    policy = load_causal_lm(tiny_model_dir, "cpu")
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    rollout = make_rollout(policy, PROMPTS, max_new_tokens=8, temperature=0.7, eos_token_ids=eos,
                           pad_token_id=0, device="cpu", generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logprobs = answer_logprobs(policy, rollout, 0.7)
        answers = rollout.input_ids[:, rollout.prompt_width:]
        for row, prompt in enumerate(PROMPTS):
            answer = answers[row][rollout.answer_mask[row].bool()]
            full = torch.tensor([prompt + answer.tolist()])
            logits = policy(full).logits[0, len(prompt) - 1 : -1] / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, answer[:, None]).squeeze(-1)
            assert torch.allclose(logprobs[row, : len(answer)], expected, atol=1e-4)


def test_evaluate_policy_against_itself(tiny_model_dir: Path, reward_dir: Path) -> None:
    kwargs = {"max_new_tokens": 10, "seed": 3, "samples_per_prompt": 2}
    metrics = evaluate_policy(tiny_model_dir, tiny_model_dir, reward_dir, PROMPTS, **kwargs)
    assert set(metrics) >= {"eval/score_mean", "eval/kl_ref", "eval/length_mean", "eval/eos_rate"}
    assert metrics["eval/kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= metrics["eval/eos_rate"] <= 1.0
    assert 1.0 <= metrics["eval/length_mean"] <= 10.0
    assert metrics["eval/samples"] == 6
    assert all(math.isfinite(v) for v in metrics.values())
    again = evaluate_policy(tiny_model_dir, tiny_model_dir, reward_dir, PROMPTS, **kwargs)
    assert again == metrics


def test_trimmed_minibatch_gives_the_same_logprobs_and_values(tiny_model_dir: Path,
                                                               reward_dir: Path) -> None:
    """PPO trims all-padding columns from minibatches; that must not change any number."""
    policy = load_causal_lm(tiny_model_dir, "cpu")
    critic = RewardModel.from_pretrained(reward_dir)
    eos = resolve_eos_token_ids(tiny_model_dir, None)
    rollout = make_rollout(policy, PROMPTS * 3, max_new_tokens=12, temperature=1.0,
                           eos_token_ids=eos, pad_token_id=0, device="cpu",
                           generator=torch.Generator().manual_seed(4))
    short_prompt_rows = torch.tensor([1, 4, 7])  # PROMPTS[1], the shortest prompt
    lengths = rollout.answer_mask.sum(-1)[short_prompt_rows]
    mb = rollout.rows(short_prompt_rows[lengths.argsort()[:2]])  # its two shortest answers
    small = mb.trimmed()
    width = small.answer_mask.shape[1]
    assert small.prompt_width == len(PROMPTS[1]) < mb.prompt_width
    assert width == int(mb.answer_mask.sum(-1).max())
    assert torch.equal(small.answer_mask, mb.answer_mask[:, :width])
    with torch.no_grad():
        full_lp, small_lp = answer_logprobs(policy, mb, 1.0), answer_logprobs(policy, small, 1.0)
        full_v, small_v = answer_values(critic, mb), answer_values(critic, small)
    mask = small.answer_mask.bool()
    assert torch.allclose(full_lp[:, :width][mask], small_lp[mask], atol=1e-4)
    assert torch.allclose(full_v[:, :width][mask], small_v[mask], atol=1e-4)


def test_paired_interval_matches_naive_formula() -> None:
    diffs = torch.tensor([0.5, -0.25, 1.0, 0.0, 0.75, 0.25])
    xs = diffs.tolist()
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    got = paired_interval(diffs)
    assert got[0] == pytest.approx(mean)
    assert got[1] == pytest.approx(mean - 1.959964 * sd / math.sqrt(len(xs)), rel=1e-5)
    assert got[2] == pytest.approx(mean + 1.959964 * sd / math.sqrt(len(xs)), rel=1e-5)
    with pytest.raises(ValueError):
        paired_interval(torch.tensor([1.0]))


def samples(scores: list[float], kl: float, length: float, eos: float) -> PolicySamples:
    n = len(scores)
    return PolicySamples(torch.tensor(scores), torch.full((n,), kl), torch.full((n,), length),
                         torch.full((n,), eos))


def test_gate_judges_the_paired_gain_kl_and_drift() -> None:
    """Pairing removes what both answers to one prompt share: a small, steady gain shows."""
    prompt_effect = [float(i % 7) * 3 for i in range(128)]  # large spread across prompts
    old = samples(prompt_effect, kl=2.0, length=10.0, eos=0.9)
    new = samples([x + 0.1 for x in prompt_effect], kl=4.0, length=12.0, eos=0.8)
    m = compare_policies(new, old)
    assert m["gate/samples"] == 128
    assert m["gate/score_gain"] == pytest.approx(0.1, abs=1e-5)
    assert m["gate/score_gain_low"] == pytest.approx(0.1, abs=1e-4)  # every pair gained 0.1
    assert m["gate/length_drift"] == pytest.approx(0.2)
    assert m["gate/eos_drift"] == pytest.approx(-0.1)
    train = TrainSettings(kl_budget=10.0, min_improvement=0.0, max_length_drift=0.5,
                          max_eos_drift=0.2)
    assert gate_reasons(m, train) == []
    strict = train.model_copy(update={"kl_budget": 3.0, "max_length_drift": 0.1,
                                      "max_eos_drift": 0.05, "min_improvement": 0.5})
    reasons = gate_reasons(m, strict)
    assert [r.split()[0] for r in reasons] == ["score", "KL", "answer", "EOS"]
    noisy = samples([x + (1.0 if i % 2 else -0.9) for i, x in enumerate(prompt_effect)],
                    kl=2.0, length=10.0, eos=0.9)
    m = compare_policies(noisy, old)  # mean gain 0.05, but pairs disagree: not shown
    assert m["gate/score_gain"] > 0 > m["gate/score_gain_low"]
    assert gate_reasons(m, train)[0].startswith("score gain not shown")


def test_sample_policy_pairs_answers_by_prompt(tiny_model_dir: Path, reward_dir: Path) -> None:
    """Answer i of two policies answers the same prompt with the same noise; the same policy
    twice gives identical pairs, so a zero gain with a zero-width interval."""
    kwargs = {"max_new_tokens": 6, "seed": 5, "samples_per_prompt": 3}
    a = sample_policy(tiny_model_dir, tiny_model_dir, reward_dir, PROMPTS[:2], **kwargs)
    b = sample_policy(tiny_model_dir, tiny_model_dir, reward_dir, PROMPTS[:2], **kwargs)
    assert a.scores.shape == (6,)
    m = compare_policies(a, b)
    assert m["gate/score_gain"] == m["gate/score_gain_low"] == m["gate/score_gain_high"] == 0.0
