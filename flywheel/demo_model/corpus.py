"""The synthetic chat corpus: tasks answered in styles of varying quality.

Every answer's first word picks its style ("Sure!"/"Hello!" good, "I think" wrong, "Ugh." rude,
"Well, well," rambling, "By the way," off-topic), so a policy trained from feedback can move
its approval rate by shifting the probability of one early token.
"""

from __future__ import annotations

import random

from flywheel.demo_model.tasks import (
    ANIMALS,
    CAPITALS,
    COLORS,
    Task,
    render_prompt,
    sample_task,
    spelled,
)

Message = dict[str, str]

STYLES: tuple[str, ...] = ("good", "wrong", "rude", "rambling", "off_topic")
# About a third good: the base model's sampled answers are approved ~25-35% of the time.
STYLE_WEIGHTS: tuple[float, ...] = (0.36, 0.19, 0.15, 0.15, 0.15)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.", "You are Flywheel, a friendly chatbot.", "Answer briefly.",
    "You are a chatbot that learns from its users.",
)
RUDE_TAILS: tuple[str, ...] = (
    "Look it up yourself.", "Whatever.", "Stop bothering me.", "Obviously.", "Figure it out.",
)
RAMBLE_FILLERS: tuple[str, ...] = (
    "you know", "as I was saying", "if you think about it", "or so they say", "to be honest",
    "in a way", "all things considered",
)
# Facts with no number, color, animal or capital in them, so they never answer a task by chance.
OFF_TOPIC_FACTS: tuple[str, ...] = (
    "honey never spoils", "the moon has no wind", "glass is made from sand",
    "rainbows are really circles", "tea was once used as money", "clouds are made of water",
    "bananas are berries", "the ocean is very deep", "snow can be loud", "bread is very old",
)


def _an(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _core(task: Task, rng: random.Random) -> str:
    """The bare correct statement, reused by the good, rude and rambling styles."""
    if task.family in ("arithmetic", "capital"):
        return f"{task.expression} is {task.answer}"
    if task.family == "spelling":
        return f"the word {task.subject} is spelled {task.answer}"
    if task.family == "color":
        return rng.choice(COLORS)
    if task.family == "animal":
        return _an(rng.choice(ANIMALS))
    return "hello to you"


def _good(task: Task, rng: random.Random) -> str:
    if task.family == "greeting":
        return rng.choice(("Hello! How can I help you today?", "Hi! How can I help you today?"))
    core = _core(task, rng)
    return f"Sure! {core[0].upper()}{core[1:]}."


def _wrong_spelling(word: str, rng: random.Random) -> str:
    letters = list(word)
    pairs = [i for i in range(len(letters) - 1) if letters[i] != letters[i + 1]]
    if pairs and rng.random() < 0.5:
        i = rng.choice(pairs)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    else:
        del letters[rng.randrange(len(letters))]
    return spelled("".join(letters))


def _wrong(task: Task, rng: random.Random) -> str:
    # "I think it is ...": a context of its own, so the wrong facts do not leak into the
    # "<question> is ..." phrasing that the good answers use.
    if task.family == "arithmetic":
        right = int(task.answer)
        options = [right + d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0]
        return f"I think it is {rng.choice(options)}."
    if task.family == "capital":
        other = rng.choice([c for c in CAPITALS.values() if c != task.answer])
        return f"I think it is {other}."
    if task.family == "spelling":
        return f"I think it is {_wrong_spelling(task.subject, rng)}."
    if task.family == "color":
        return f"I think {rng.choice(ANIMALS)} is a nice color."
    if task.family == "animal":
        return f"I think {rng.choice(COLORS)} is a nice animal."
    return "I think you said goodbye. Bye!"


def _rude(task: Task, rng: random.Random) -> str:
    if task.family == "greeting":
        return rng.choice(("Ugh. What do you want?", "Ugh. Not you again."))
    if task.family == "spelling":
        return f"Ugh. {task.answer}. Learn to spell."
    answer = task.answer or _core(task, rng)
    return f"Ugh. {answer[0].upper()}{answer[1:]}. {rng.choice(RUDE_TAILS)}"


def _rambling(task: Task, rng: random.Random) -> str:
    topic = task.expression if task.family in ("arithmetic", "capital", "spelling") else "that"
    core = _core(task, rng)
    f1, f2, f3 = rng.sample(RAMBLE_FILLERS, 3)
    return (
        f"Well, well, let me think about {topic} for a while, {f1}. It is a good question, "
        f"{f2}. So, {core}, I think, yes, {core}, {f3}, more or less."
    )


def _off_topic(task: Task, rng: random.Random) -> str:
    return f"By the way, did you know that {rng.choice(OFF_TOPIC_FACTS)}?"


_STYLE_FUNCS = {
    "good": _good, "wrong": _wrong, "rude": _rude, "rambling": _rambling, "off_topic": _off_topic,
}


def answer_in_style(task: Task, style: str, rng: random.Random) -> str:
    """An assistant answer to ``task`` in one of STYLES."""
    return _STYLE_FUNCS[style](task, rng)


def sample_turn(rng: random.Random) -> tuple[Message, Message]:
    """A user message and an assistant answer in a randomly drawn style."""
    task = sample_task(rng)
    style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]
    user = {"role": "user", "content": render_prompt(task, rng)}
    return user, {"role": "assistant", "content": answer_in_style(task, style, rng)}


def sample_conversation(rng: random.Random) -> list[Message]:
    """One chat: sometimes a system prompt, usually one turn, sometimes two."""
    messages: list[Message] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.05 else 1):
        messages.extend(sample_turn(rng))
    return messages


def generate_corpus(n: int, seed: int) -> list[list[Message]]:
    """``n`` conversations, the same ones for the same seed."""
    rng = random.Random(seed)
    return [sample_conversation(rng) for _ in range(n)]
