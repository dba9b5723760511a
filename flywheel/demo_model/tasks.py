"""The task families a demo user asks about: prompt phrasings, the facts, and prompt parsing.

Both the corpus (what the demo model learns) and the judge (what the simulated user approves)
read these tables, so a prompt written here can always be checked there.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa",
    "Brazil": "Brasilia", "Peru": "Lima", "Kenya": "Nairobi", "Russia": "Moscow",
    "India": "New Delhi", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Chile": "Santiago", "Ghana": "Accra",
}
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
    "gray",
)
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "lion", "tiger", "rabbit", "elephant", "mouse", "bear", "wolf",
    "fox", "owl", "frog", "whale",
)
SPELL_WORDS: tuple[str, ...] = (
    "sun", "book", "tree", "milk", "door", "road", "rain", "cake", "hand", "ship", "star",
    "moon", "fire", "lamp", "ball", "cup",
)
GREETINGS: tuple[str, ...] = (
    "Hello!", "Hi!", "Hi there.", "Hey, how are you?", "Good morning!", "Hello, anyone there?",
    "Hey there!", "Good evening!", "Hi, how is it going?", "Hello there!",
)
# Operators and operand ranges: small enough for a few-million-parameter model to master.
OPERATORS: dict[str, tuple[int, int]] = {"plus": (0, 6), "minus": (0, 6)}

ARITHMETIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "plus": (
        "What is {a} plus {b}?", "What's {a} plus {b}?", "What is {a} + {b}?",
        "How much is {a} plus {b}?", "Can you add {a} and {b}?", "Please compute {a} + {b}.",
        "Add {a} and {b}.", "What do you get if you add {a} and {b}?",
    ),
    "minus": (
        "What is {a} minus {b}?", "What's {a} - {b}?", "How much is {a} minus {b}?",
        "Subtract {b} from {a}.", "Can you subtract {b} from {a}?", "Please compute {a} - {b}.",
        "What is {a} take away {b}?",
    ),
}
CAPITAL_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {x}?", "What's the capital of {x}?",
    "Which city is the capital of {x}?", "Tell me the capital of {x}.",
    "Do you know the capital of {x}?", "Capital of {x}?", "What city is the capital of {x}?",
)
SPELL_TEMPLATES: tuple[str, ...] = (
    # The word always follows a space, so it is the same token here as in the answer.
    "How do you spell {x}?", "Spell the word {x}.", "Can you spell {x}?", "Spell {x} for me.",
    "How is {x} spelled?", "Please spell the word {x}.",
)
COLOR_TEMPLATES: tuple[str, ...] = (
    "Name a color.", "Can you name a color?", "Tell me a color.", "Give me a color.",
    "Pick a color.", "What is a color you like?", "Name one color, please.",
)
ANIMAL_TEMPLATES: tuple[str, ...] = (
    "Name an animal.", "Can you name an animal?", "Tell me an animal.", "Give me an animal.",
    "Pick an animal.", "What is an animal you like?", "Name one animal, please.",
)
FAMILIES: tuple[str, ...] = ("arithmetic", "capital", "spelling", "color", "animal", "greeting")
# How often each family is asked: arithmetic has the most facts to learn, so it comes most often.
FAMILY_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.07, 0.07, 0.06)


@dataclass(frozen=True)
class Task:
    """One user request: its family, its arguments, and its checkable answer (if any)."""

    family: str
    subject: str = ""
    a: int = 0
    b: int = 0
    op: str = ""

    @property
    def answer(self) -> str:
        """The correct core answer: a number, a capital, a dash spelling; empty when open."""
        if self.family == "arithmetic":
            return str(self.a + self.b if self.op == "plus" else self.a - self.b)
        if self.family == "capital":
            return CAPITALS[self.subject]
        if self.family == "spelling":
            return spelled(self.subject)
        return ""

    @property
    def expression(self) -> str:
        """The question restated in words, e.g. ``7 plus 5`` or ``the capital of Peru``."""
        if self.family == "arithmetic":
            return f"{self.a} {self.op} {self.b}"
        if self.family == "capital":
            return f"the capital of {self.subject}"
        return self.subject


def spelled(word: str) -> str:
    """``apple`` -> ``a-p-p-l-e``."""
    return "-".join(word.lower())


def sample_task(rng: random.Random) -> Task:
    """A random task, families weighted by FAMILY_WEIGHTS."""
    family = rng.choices(FAMILIES, weights=FAMILY_WEIGHTS)[0]
    if family == "arithmetic":
        op = rng.choice(sorted(OPERATORS))
        low, high = OPERATORS[op]
        a, b = rng.randint(low, high), rng.randint(low, high)
        if op == "minus" and b > a:
            a, b = b, a
        return Task("arithmetic", a=a, b=b, op=op)
    if family == "capital":
        return Task("capital", subject=rng.choice(sorted(CAPITALS)))
    if family == "spelling":
        return Task("spelling", subject=rng.choice(SPELL_WORDS))
    return Task(family)


def render_prompt(task: Task, rng: random.Random) -> str:
    """One phrasing of the task as a user would type it."""
    if task.family == "arithmetic":
        return rng.choice(ARITHMETIC_TEMPLATES[task.op]).format(a=task.a, b=task.b)
    if task.family == "capital":
        return rng.choice(CAPITAL_TEMPLATES).format(x=task.subject)
    if task.family == "spelling":
        return rng.choice(SPELL_TEMPLATES).format(x=task.subject)
    if task.family == "color":
        return rng.choice(COLOR_TEMPLATES)
    if task.family == "animal":
        return rng.choice(ANIMAL_TEMPLATES)
    return rng.choice(GREETINGS)


_NUM = r"(-?\d+)"
_ARITHMETIC_PATTERNS: tuple[tuple[str, str, bool], ...] = (
    # (regex, operator, operands swapped)
    (rf"{_NUM}\s*(?:plus|\+)\s*{_NUM}", "plus", False),
    (rf"add\s+{_NUM}\s+(?:and|to)\s+{_NUM}", "plus", False),
    (rf"{_NUM}\s*(?:minus|-|take away)\s*{_NUM}", "minus", False),
    (rf"subtract\s+{_NUM}\s+from\s+{_NUM}", "minus", True),
)
_CAPITAL_RE = re.compile(r"capital of\s+([A-Za-z][A-Za-z ]*?)\s*[?.!]*$", re.IGNORECASE)
_SPELL_RES = (
    re.compile(r"spell(?:\s+the\s+word)?\s+'?([A-Za-z]+)'?", re.IGNORECASE),
    re.compile(r"how is\s+'?([A-Za-z]+)'?\s+spelled", re.IGNORECASE),
)
_GREETING_RE = re.compile(r"^\s*(hello|hi|hey|good (morning|evening|afternoon))\b", re.IGNORECASE)


def _parse_arithmetic(text: str) -> Task | None:
    for pattern, op, swapped in _ARITHMETIC_PATTERNS:
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            x, y = int(match.group(1)), int(match.group(2))
            a, b = (y, x) if swapped else (x, y)
            return Task("arithmetic", a=a, b=b, op=op)
    return None


def _parse_capital(text: str) -> Task | None:
    match = _CAPITAL_RE.search(text.strip())
    if not match:
        return None
    name = match.group(1).strip().lower()
    country = next((c for c in CAPITALS if c.lower() == name), None)
    return Task("capital", subject=country) if country else None


def _parse_spelling(text: str) -> Task | None:
    for pattern in _SPELL_RES:
        match = pattern.search(text)
        if match:
            return Task("spelling", subject=match.group(1).lower())
    return None


def parse_prompt(text: str) -> Task | None:
    """The task a user message asks for, or None when it is none of the known families."""
    for parse in (_parse_arithmetic, _parse_capital, _parse_spelling):
        task = parse(text)
        if task is not None:
            return task
    lowered = text.lower()
    if re.search(r"\bcolou?r\b", lowered):
        return Task("color")
    if re.search(r"\banimal\b", lowered):
        return Task("animal")
    if _GREETING_RE.search(text):
        return Task("greeting")
    return None
