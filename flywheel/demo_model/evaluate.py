"""Measuring a model directory against the simulated user: sampled answers, judged."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.demo_model.judge import judge_answer, sample_user_prompt


@dataclass(frozen=True)
class Evaluation:
    """Approval rate of sampled answers, with the samples for inspection."""

    approval_rate: float
    samples: list[tuple[str, str, bool]]  # (prompt, answer, approved)


def sample_answers(
    model_dir: str | Path, prompts: list[str], max_new_tokens: int = 48, seed: int = 0,
    batch_size: int = 50,
) -> list[str]:
    """One answer per prompt, sampled with the model's generation config (temperature 1)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[start:start + batch_size]]
        enc = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, padding=True, return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens)
        new = out[:, enc["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def evaluate_model(model_dir: str | Path, n: int = 200, seed: int = 0) -> Evaluation:
    """Approval rate (``judge_answer``) over ``n`` simulated-user prompts."""
    rng = random.Random(seed)
    prompts = [sample_user_prompt(rng) for _ in range(n)]
    answers = sample_answers(model_dir, prompts, seed=seed)
    samples = [(p, a, judge_answer(p, a)) for p, a in zip(prompts, answers, strict=True)]
    return Evaluation(sum(ok for *_, ok in samples) / max(1, n), samples)
