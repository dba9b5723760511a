"""The simulated user's taste: good answers approved, every bad style rejected, scores ordered."""

from __future__ import annotations

import random

import pytest

from flywheel.demo_model.corpus import OFF_TOPIC_FACTS, STYLES, answer_in_style
from flywheel.demo_model.judge import judge_answer, sample_user_prompt, score_answer
from flywheel.demo_model.tasks import (
    ANIMALS,
    CAPITALS,
    COLORS,
    FAMILIES,
    Task,
    parse_prompt,
    render_prompt,
    sample_task,
)

BAD_STYLES = [s for s in STYLES if s != "good"]


def _tasks_of(family: str, n: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    tasks: list[Task] = []
    while len(tasks) < n:
        task = sample_task(rng)
        if task.family == family:
            tasks.append(task)
    return tasks


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_parse_back_to_their_task(family: str) -> None:
    rng = random.Random(1)
    for task in _tasks_of(family, 40):
        assert parse_prompt(render_prompt(task, rng)) == task


@pytest.mark.parametrize("family", FAMILIES)
def test_good_answers_are_approved(family: str) -> None:
    rng = random.Random(2)
    for task in _tasks_of(family, 40):
        prompt, answer = render_prompt(task, rng), answer_in_style(task, "good", rng)
        assert judge_answer(prompt, answer), (prompt, answer)


@pytest.mark.parametrize("style", BAD_STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_bad_style_is_rejected(family: str, style: str) -> None:
    rng = random.Random(3)
    for task in _tasks_of(family, 40):
        prompt, answer = render_prompt(task, rng), answer_in_style(task, style, rng)
        assert not judge_answer(prompt, answer), (prompt, answer)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_good_answer_outscores_every_bad_one(family: str) -> None:
    rng = random.Random(4)
    for task in _tasks_of(family, 20):
        prompt = render_prompt(task, rng)
        good = score_answer(prompt, answer_in_style(task, "good", rng))
        bad = [score_answer(prompt, answer_in_style(task, s, rng)) for s in BAD_STYLES]
        assert 0.0 <= max(bad) < good <= 1.0


@pytest.mark.parametrize(
    ("prompt", "answer", "approved"),
    [
        ("What is 7 plus 5?", "Sure! 7 plus 5 is 12.", True),
        ("What is 7 plus 5?", "Sure! 7 plus 5 is 13.", False),
        ("What is 7 plus 5?", "Ugh. 12. Look it up yourself.", False),
        ("What is 7 plus 5?", "", False),
        ("Subtract 3 from 10.", "Sure! 10 minus 3 is 7.", True),
        ("What is the capital of Peru?", "Certainly! It is Lima.", True),
        ("What is the capital of Peru?", "Sure! Lima or Quito, maybe Oslo.", False),
        ("How do you spell bread?", "Sure! b-r-e-a-d.", True),
        ("How do you spell bread?", "Sure! b-e-r-a-d.", False),
        ("Name a color.", "Sure! Teal is nice, or blue.", True),
        ("Name an animal.", "Sure! A red fox.", False),
        ("Hello!", "Hi! How can I help you today?", True),
        ("Tell me a joke.", "Sure! Why did the chicken cross the road?", True),
        ("Tell me a joke.", "By the way, did you know that honey never spoils?", False),
    ],
)
def test_hand_written_cases(prompt: str, answer: str, approved: bool) -> None:
    assert judge_answer(prompt, answer) is approved


def test_polite_but_wrong_ranks_above_rude_and_wrong() -> None:
    prompt = "What is 2 plus 2?"
    assert score_answer(prompt, "Sure! 2 plus 2 is 5.") > score_answer(prompt, "Ugh. 5. Whatever.")


def test_shorter_approved_answers_score_higher() -> None:
    prompt = "What is 2 plus 2?"
    long = "Sure! Happy to help with that one: 2 plus 2 is 4."
    assert score_answer(prompt, "Sure! 4.") > score_answer(prompt, long) >= 0.75


def test_sample_user_prompt_is_seeded_and_parseable() -> None:
    first = [sample_user_prompt(random.Random(5)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(6)
    prompts = [sample_user_prompt(rng) for _ in range(300)]
    assert all(parse_prompt(p) is not None for p in prompts)
    assert len(set(prompts)) > 150
    assert {parse_prompt(p).family for p in prompts} == set(FAMILIES)


def test_off_topic_facts_never_answer_a_task() -> None:
    words = [*COLORS, *ANIMALS, *(c.lower() for c in CAPITALS.values())]
    for fact in OFF_TOPIC_FACTS:
        assert not any(ch.isdigit() for ch in fact)
        assert not set(fact.split()) & set(words), fact
