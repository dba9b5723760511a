"""Rollouts: sample answers from the policy, then score them with every model PPO needs.

Layout: prompts left-padded to width P, answers right-padded to width A, so answer token ``t`` of
every row sits at column ``P + t`` and is predicted by the logits at column ``P + t - 1`` (N+
``ppo_left_padding.py``). Masks, not token values, say what is padding, so EOS and PAD never mix.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from flywheel.hf_compat import cache_keyword, output_cache
from trainer_worker.ppo.core import logprobs_from_logits
from trainer_worker.reward.model import RewardModel, position_ids_from_mask


@dataclass
class Rollout:
    """One batch of sampled answers and everything scored on them."""

    input_ids: Tensor  # (B, P + A) prompt (left-padded) + answer (right-padded)
    attention_mask: Tensor  # (B, P + A) 1 on prompt and answer tokens up to the first EOS
    answer_mask: Tensor  # (B, A) 1 on answer tokens up to and including the first EOS
    has_eos: Tensor  # (B,) bool: the answer stopped by itself
    prompt_width: int  # P
    logprobs: Tensor | None = None  # (B, A) policy, temperature-scaled
    ref_logprobs: Tensor | None = None  # (B, A) reference, same temperature
    values: Tensor | None = None  # (B, A) critic
    scores: Tensor | None = None  # (B,) normalised RM score of the answer content
    advantages: Tensor | None = None  # (B, A) whitened GAE advantages
    returns: Tensor | None = None  # (B, A) value targets
    rollout_logprobs: Tensor | None = None  # (B, A) the sampler's own, when not the trainer (vLLM)
    tis_weights: Tensor | None = None  # (B, A) truncated importance weights (core.py)

    def rows(self, index: Tensor) -> Rollout:
        """The rollout restricted to some rows (a minibatch or a chunk)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: v[index] if isinstance(v, Tensor) else v for k, v in values.items()})

    def trimmed(self) -> Rollout:
        """Drop the columns that are padding in every row (a minibatch's shorter rows)."""
        prompt_real = self.attention_mask[:, : self.prompt_width].any(0)  # (P,)
        left = min(int(prompt_real.long().argmax()), self.prompt_width - 1)
        width = max(1, int(self.answer_mask.sum(-1).max()))
        out: dict[str, object] = {"prompt_width": self.prompt_width - left}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, left : self.prompt_width + width]
            elif isinstance(value, Tensor) and value.dim() == 2:
                value = value[:, :width]
            out.setdefault(f.name, value)
        return Rollout(**out)  # type: ignore[arg-type]


def pad_left(prompts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask, both (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


def _last_logits(model: nn.Module, **inputs: object) -> tuple[Tensor, object]:
    """Logits of the last position (B, V) and the KV cache, keeping only one row of logits."""
    if _accepts_logits_to_keep(model):
        inputs["logits_to_keep"] = 1
    out = model(**inputs, use_cache=True)
    return out.logits[:, -1, :].float(), output_cache(out)


@torch.no_grad()
def sample_answers(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
    temperature: float, eos_token_ids: Sequence[int], pad_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample from ``softmax(logits / temperature)`` with a KV cache (greedy when T <= 0).

    Returns answers (B, A), answer_mask (B, A) covering tokens up to and including the first
    EOS, and has_eos (B,).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    eos = torch.tensor(list(eos_token_ids), device=device)
    mask = prompt_mask
    positions = position_ids_from_mask(mask)  # (B, P)
    logits, cache = _last_logits(model, input_ids=prompt_ids, attention_mask=mask,
                                 position_ids=positions)
    next_position = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, alive = [], []
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        alive.append(~finished)
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits, cache = _last_logits(model, input_ids=token[:, None], attention_mask=mask,
                                     position_ids=next_position,
                                     **{cache_keyword(type(_base(model))): cache})
        next_position = next_position + 1
    answers = torch.stack(tokens, dim=1)  # (B, A)
    answer_mask = torch.stack(alive, dim=1).long()  # (B, A)
    return answers, answer_mask, finished


def answer_logits(model: nn.Module, rollout: Rollout, temperature: float) -> Tensor:
    """Logits predicting each answer token, divided by the temperature: (B, A, V)."""
    width = rollout.answer_mask.shape[1]
    inputs: dict[str, object] = {
        "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
        "position_ids": position_ids_from_mask(rollout.attention_mask), "use_cache": False,
    }
    if _accepts_logits_to_keep(model):
        inputs["logits_to_keep"] = width + 1
    logits = model(**inputs).logits[:, -(width + 1):-1, :]  # (B, A, V)
    return logits.float() / (temperature if temperature > 0 else 1.0)


def answer_logprobs(model: nn.Module, rollout: Rollout, temperature: float) -> Tensor:
    """Logprobs of the sampled answer tokens: (B, A)."""
    logits = answer_logits(model, rollout, temperature)  # (B, A, V)
    answers = rollout.input_ids[:, rollout.prompt_width:]  # (B, A)
    return logprobs_from_logits(logits, answers)


def answer_values(critic: RewardModel, rollout: Rollout) -> Tensor:
    """Critic value of the state before each answer token: (B, A)."""
    width = rollout.answer_mask.shape[1]
    values = critic.token_scores(rollout.input_ids, rollout.attention_mask)  # (B, P + A)
    return values[:, -(width + 1):-1]


def answer_scores(reward_model: RewardModel, rollout: Rollout) -> Tensor:
    """Normalised RM score read at the last content token (EOS excluded, as in RM training)."""
    content = rollout.answer_mask.sum(-1) - rollout.has_eos.long()  # (B,)
    last = rollout.prompt_width - 1 + content  # (B,)
    token_scores = reward_model.token_scores(rollout.input_ids, rollout.attention_mask)
    raw = token_scores.gather(1, last.unsqueeze(-1)).squeeze(-1)  # (B,)
    return reward_model.normalize(raw.float())


def make_rollout(policy: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, eos_token_ids: Sequence[int], pad_token_id: int,
                 device: torch.device | str, generator: torch.Generator | None) -> Rollout:
    """Sample one answer per prompt and assemble the padded batch (nothing scored yet)."""
    prompt_ids, prompt_mask = pad_left(prompts, pad_token_id, device)  # (B, P)
    answers, answer_mask, has_eos = sample_answers(
        policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
        temperature=temperature, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        generator=generator,
    )
    return Rollout(
        input_ids=torch.cat([prompt_ids, answers], dim=1),
        attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
        answer_mask=answer_mask, has_eos=has_eos, prompt_width=prompt_ids.shape[1],
    )


def assemble_rollout(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     logprobs: Sequence[Sequence[float]], *, eos_token_ids: Sequence[int],
                     pad_token_id: int, device: torch.device | str) -> Rollout:
    """The padded batch of answers another engine sampled (vLLM), with its logprobs.

    An answer ends at its first EOS, included, as ``sample_answers`` masks it; tokens after it
    (there are none from vLLM, which stops there) would be dropped.
    """
    prompt_ids, prompt_mask = pad_left(prompts, pad_token_id, device)  # (B, P)
    eos = set(eos_token_ids)
    kept = []
    for answer, answer_logprobs in zip(answers, logprobs, strict=True):
        end = next((i + 1 for i, tok in enumerate(answer) if tok in eos), len(answer))
        kept.append((list(answer[:end]), list(answer_logprobs[:end])))
    width = max(1, max(len(tokens) for tokens, _ in kept))
    ids = torch.full((len(kept), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    sampled = torch.zeros((len(kept), width), dtype=torch.float32)
    for i, (tokens, token_logprobs) in enumerate(kept):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
        sampled[i, : len(tokens)] = torch.tensor(token_logprobs, dtype=torch.float32)
    has_eos = torch.tensor([bool(t) and t[-1] in eos for t, _ in kept], dtype=torch.bool)
    answer_mask = mask.to(device)  # (B, A)
    return Rollout(
        input_ids=torch.cat([prompt_ids, ids.to(device)], dim=1),
        attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
        answer_mask=answer_mask, has_eos=has_eos.to(device), prompt_width=prompt_ids.shape[1],
        rollout_logprobs=sampled.to(device),
    )
