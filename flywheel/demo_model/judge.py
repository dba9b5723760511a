"""The simulated user's taste: approve answers that are correct, polite, concise and on topic.

Used by the learning benchmark and the tests to give thumbs and rankings without a human.
The prompt passed in is the user's message text; known task families are checked for
correctness, anything else only for tone, length and topic.
"""

from __future__ import annotations

import random
import re

from flywheel.demo_model.tasks import (
    ANIMALS,
    CAPITALS,
    COLORS,
    Task,
    parse_prompt,
    render_prompt,
    sample_task,
)

MAX_WORDS = 20  # a good demo answer has 3-10 words; rambling ones have 30+
POLITE_MARKERS = (
    "sure", "certainly", "of course", "hello", "hi", "hey", "happy to", "glad", "absolutely",
    "please", "thanks", "thank you",
)
RUDE_MARKERS = (
    "ugh", "yourself", "whatever", "obviously", "stop bothering", "figure it out", "learn to",
    "what do you want", "not you again", "duh", "stupid", "shut up",
)
RAMBLE_MARKERS = (
    "well, well", "let me think", "as i was saying", "you know", "if you think about it",
    "or so they say", "more or less", "all things considered", "to be honest", "in a way",
)
OFF_TOPIC_MARKERS = ("by the way", "did you know")
GREETING_WORDS = ("hello", "hi", "hey", "good morning", "good evening", "welcome", "help")
FAREWELL_WORDS = ("bye", "goodbye")
# Weights of the checks in a rejected answer's partial score (they sum to 1).
CHECK_WEIGHTS: dict[str, float] = {
    "correct": 0.35, "not_rude": 0.2, "polite": 0.15, "concise": 0.15, "on_topic": 0.15,
}


def _has_any(text: str, phrases: tuple[str, ...] | list[str]) -> bool:
    """Whether ``text`` (lower case) contains one of ``phrases`` as whole words."""
    return any(re.search(rf"(?<![a-z]){re.escape(p)}(?![a-z])", text) for p in phrases)


def _mentions(text: str, words: tuple[str, ...] | list[str]) -> set[str]:
    """The words of ``words`` (or their plurals) that ``text`` (lower case) mentions."""
    return {w for w in words if re.search(rf"(?<![a-z]){re.escape(w.lower())}s?(?![a-z])", text)}


def _correct(task: Task | None, text: str) -> bool:
    """Whether the lower-cased answer gives the task's right answer and no wrong one."""
    if task is None:
        return True
    if task.family == "arithmetic":
        numbers = [int(n) for n in re.findall(r"-?\d+", text)]
        allowed = {task.a, task.b, int(task.answer)}
        return bool(numbers) and numbers[-1] == int(task.answer) and set(numbers) <= allowed
    if task.family == "capital":
        return _mentions(text, list(CAPITALS.values())) == {task.answer}
    if task.family == "spelling":
        spellings = re.findall(r"(?<![a-z-])[a-z](?:-[a-z])+(?![a-z-])", text)
        return bool(spellings) and set(spellings) == {task.answer}
    if task.family == "color":
        return bool(_mentions(text, COLORS)) and not _mentions(text, ANIMALS)
    if task.family == "animal":
        return bool(_mentions(text, ANIMALS)) and not _mentions(text, COLORS)
    return _has_any(text, GREETING_WORDS) and not _has_any(text, FAREWELL_WORDS)


def _topical(task: Task | None, text: str) -> bool:
    """Whether the answer is about the kind of thing asked, right or wrong."""
    if _has_any(text, OFF_TOPIC_MARKERS):
        return False
    if task is None or task.family == "greeting":
        return True
    if task.family == "arithmetic":
        return bool(re.search(r"\d", text))
    if task.family == "capital":
        return bool(_mentions(text, list(CAPITALS.values())))
    if task.family == "spelling":
        return bool(re.search(r"[a-z]-[a-z]", text))
    return bool(_mentions(text, COLORS) or _mentions(text, ANIMALS))


def _concise(text: str) -> bool:
    words = re.findall(r"[a-z0-9'-]+", text)
    repeated = any(words.count(w) >= 3 for w in set(words) if len(w) > 3)
    return len(words) <= MAX_WORDS and not repeated and not _has_any(text, RAMBLE_MARKERS)


def answer_checks(prompt: str, answer: str) -> dict[str, bool]:
    """Each criterion of the simulated user's taste, by name (the keys of CHECK_WEIGHTS)."""
    text = " ".join(answer.lower().split())
    if not text:
        return dict.fromkeys(CHECK_WEIGHTS, False)
    task = parse_prompt(prompt)
    return {
        "correct": _correct(task, text),
        "not_rude": not _has_any(text, RUDE_MARKERS),
        "polite": _has_any(text, POLITE_MARKERS),
        "concise": _concise(text),
        "on_topic": _topical(task, text),
    }


def judge_answer(prompt: str, answer: str) -> bool:
    """Thumbs up only for a correct, polite, concise, on-topic answer."""
    return all(answer_checks(prompt, answer).values())


def score_answer(prompt: str, answer: str) -> float:
    """A score in [0, 1] for ranking answers: every approved answer beats every rejected one.

    Approved answers score 0.75-1.0 (shorter is better); rejected ones score below 0.6 by the
    weighted share of the checks they pass, so "polite but wrong" ranks above "rude and wrong".
    """
    checks = answer_checks(prompt, answer)
    if all(checks.values()):
        words = len(answer.split())
        return 0.75 + 0.25 * (1.0 - min(words, MAX_WORDS) / MAX_WORDS)
    return 0.6 * sum(CHECK_WEIGHTS[name] for name, ok in checks.items() if ok)


def sample_user_prompt(rng: random.Random) -> str:
    """A user message from the demo task families, in one of their phrasings."""
    return render_prompt(sample_task(rng), rng)
