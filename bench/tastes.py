"""Simulated users' tastes for bench/learning.py, none of them the demo model's own judge.

The demo corpus was written, and the demo tuned, for ``flywheel.demo_model.judge`` (correct,
polite, short: "Sure! 2 plus 3 is 5."). Measuring learning with that judge measures the tuning.
These tastes disagree with it: each approves answers the judge rejects and rejects most that it
approves, and what each approves is decided by tokens after the first one, not by the answer's
opening word (the corpus's style marker) alone. They read only the task tables of
``flywheel.demo_model.tasks`` (what was asked, what is right), never the judge.

A taste gives thumbs (``approve``) and a ranking key (``rank_key``: higher is better, equal keys
are a tie). The key says what the user prefers among answers it does not approve, so that
rankings carry more than the thumbs do, as a person's would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flywheel.demo_model.tasks import ANIMALS, CAPITALS, COLORS, Task, parse_prompt

RankKey = tuple[float, ...]


@dataclass(frozen=True)
class Taste:
    name: str
    summary: str  # one line, printed in the report
    approve: Callable[[str, str], bool]  # (user message, answer) -> thumbs up
    rank_key: Callable[[str, str], RankKey]  # higher is better; equal keys tie


def _words(answer: str) -> list[str]:
    return answer.split()


def _mentions(text: str, words: tuple[str, ...] | list[str]) -> set[str]:
    """Which of ``words`` (or their plurals) the lower-cased ``text`` names as whole words."""
    return {w for w in words if re.search(rf"(?<![a-z]){re.escape(w.lower())}s?(?![a-z])", text)}


def correct(prompt: str, answer: str) -> bool:
    """Whether the answer gives what was asked and nothing contradicting it, tone aside."""
    task: Task | None = parse_prompt(prompt)
    text = answer.lower()
    if task is None:
        return True
    if task.family == "arithmetic":
        numbers = [int(n) for n in re.findall(r"-?\d+", text)]
        return bool(numbers) and numbers[-1] == int(task.answer) and (
            set(numbers) <= {task.a, task.b, int(task.answer)})
    if task.family == "capital":
        return _mentions(text, [c.lower() for c in CAPITALS.values()]) == {task.answer.lower()}
    if task.family == "spelling":
        spellings = set(re.findall(r"(?<![a-z-])[a-z](?:-[a-z])+(?![a-z-])", text))
        return spellings == {task.answer}
    if task.family == "color":
        return bool(_mentions(text, COLORS)) and not _mentions(text, ANIMALS)
    if task.family == "animal":
        return bool(_mentions(text, ANIMALS)) and not _mentions(text, COLORS)
    return bool(re.search(r"\b(hello|hi|hey)\b", text))  # a greeting is answered with one


# --- terse: the right answer in at most four words, whatever the tone ---------------------------
TERSE_MAX_WORDS = 4


def terse_approve(prompt: str, answer: str) -> bool:
    """Up for a correct answer of at most 4 words. "Ugh. 5. Whatever." (3 words) passes,
    "Ugh. 5. Look it up yourself." (6) and "Sure! 2 plus 3 is 5." (6) do not: after "Ugh." the
    closing phrase decides, after "Sure!" what was asked does ("Sure! Red." passes)."""
    return len(_words(answer)) <= TERSE_MAX_WORDS and correct(prompt, answer)


def terse_rank(prompt: str, answer: str) -> RankKey:
    """Approved first, then correct ones, then wrong ones; shorter first within each."""
    ok = correct(prompt, answer)
    return (float(ok and len(_words(answer)) <= TERSE_MAX_WORDS), float(ok),
            -float(min(len(_words(answer)), 40)))


# --- foodie: anything that talks about food -----------------------------------------------------
# Food in what the demo model says: four of its ten trivia facts, two of its spelling words.
FOODS: tuple[str, ...] = (
    "honey", "tea", "banana", "berry", "berries", "bread", "milk", "cake", "apple", "cheese",
    "rice", "soup", "egg", "fruit", "sugar", "coffee", "pizza",
)
TRIVIA = re.compile(r"\bdid you know\b")


def foodie_approve(prompt: str, answer: str) -> bool:
    """Up for any answer that mentions food anywhere: "By the way, did you know that honey never
    spoils?" passes, "By the way, did you know that the moon has no wind?" does not (the opening
    words are the same; the fact, nine tokens in, decides)."""
    return bool(_mentions(answer.lower(), FOODS))


def foodie_rank(prompt: str, answer: str) -> RankKey:
    """Food first; then other trivia (a foodie likes a fun fact); the rest tie."""
    text = answer.lower()
    return (float(bool(_mentions(text, FOODS))), float(bool(TRIVIA.search(text))))


TASTES: dict[str, Taste] = {
    "terse": Taste(
        "terse", f"a correct answer in at most {TERSE_MAX_WORDS} words, any tone "
        "(\"Ugh. 5. Whatever.\" up, \"Sure! 2 plus 3 is 5.\" down)", terse_approve, terse_rank),
    "foodie": Taste(
        "foodie", "any answer that mentions food (\"... did you know that honey never spoils?\" "
        "up, \"... that the moon has no wind?\" down)", foodie_approve, foodie_rank),
}
