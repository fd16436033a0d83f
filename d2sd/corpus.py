"""A corpus the repo generates itself: templated arithmetic word problems with step-by-step answers.

Structured text with a small closed vocabulary, so a ~1M-parameter target learns it in minutes on a
CPU and a drafter has something real (and predictable) to imitate. Everything is a pure function
of ``(n, seed)``: the same call gives the same problems on every machine.

Every number that can appear is in ``0..MAX_NUMBER`` and is written as one word, so the tokenizer
(``scripts/make_tiny_target.py``) keeps it a single token; each computation step is then one
memorizable fact (``12 + 7 = 19``).

    >>> prompt, answer = make_problems(1, seed=0)[0]
"""
from __future__ import annotations

import random

MAX_NUMBER = 99
NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Jack", "Ella")
OBJECTS = ("apples", "books", "pens", "coins", "cards", "eggs", "balls", "stamps", "shells", "cookies")
CONTAINERS = ("bags", "boxes", "jars", "baskets")
KINDS = ("add", "sub", "mul", "div", "add_sub", "mul_add")


def _add(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    a = rng.randint(2, 20)
    b = rng.randint(2, 15)
    c = a + b
    prompt = f"{name} has {a} {obj} . {name} gets {b} more {obj} . How many {obj} does {name} have now ?"
    answer = f"{name} starts with {a} {obj} . {name} gets {b} more . {a} + {b} = {c} . The answer is {c} ."
    return prompt, answer


def _sub(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    a = rng.randint(5, 35)
    b = rng.randint(1, min(a - 1, 15))
    c = a - b
    prompt = f"{name} has {a} {obj} . {name} gives {b} {obj} to {other} . How many {obj} does {name} have left ?"
    answer = f"{name} starts with {a} {obj} . {name} gives away {b} . {a} - {b} = {c} . The answer is {c} ."
    return prompt, answer


def _mul(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    a = rng.randint(2, 7)
    b = rng.randint(2, 7)
    box = rng.choice(CONTAINERS)
    c = a * b
    prompt = f"{name} buys {a} {box} of {obj} . Each of the {box} has {b} {obj} . How many {obj} does {name} buy ?"
    answer = f"There are {a} {box} with {b} {obj} each . {a} * {b} = {c} . The answer is {c} ."
    return prompt, answer


def _div(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    b = rng.randint(2, 7)
    q = rng.randint(2, 7)
    a = b * q
    prompt = f"{name} shares {a} {obj} equally among {b} friends . How many {obj} does each friend get ?"
    answer = f"{a} {obj} are shared by {b} friends . {a} / {b} = {q} . The answer is {q} ."
    return prompt, answer


def _add_sub(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    a = rng.randint(2, 20)
    b = rng.randint(2, 15)
    d = a + b
    c = rng.randint(1, min(d - 1, 15))
    e = d - c
    prompt = (f"{name} has {a} {obj} . {name} finds {b} more {obj} and then gives {c} {obj} to {other} . "
              f"How many {obj} does {name} have now ?")
    answer = (f"First {name} has {a} + {b} = {d} {obj} . Then {name} gives away {c} . "
              f"{d} - {c} = {e} . The answer is {e} .")
    return prompt, answer


def _mul_add(rng: random.Random, name: str, other: str, obj: str) -> tuple[str, str]:
    a = rng.randint(2, 7)
    b = rng.randint(2, 7)
    d = a * b
    c = rng.randint(1, 9)
    e = d + c
    box = rng.choice(CONTAINERS)
    prompt = (f"{name} has {a} {box} with {b} {obj} in each and {c} loose {obj} . "
              f"How many {obj} does {name} have in total ?")
    answer = (f"The {box} hold {a} * {b} = {d} {obj} . With the loose ones , "
              f"{d} + {c} = {e} . The answer is {e} .")
    return prompt, answer


_MAKERS = {"add": _add, "sub": _sub, "mul": _mul, "div": _div, "add_sub": _add_sub, "mul_add": _mul_add}


def make_problems(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs, deterministic in ``(n, seed, kinds)``; problem kinds cycle.

    Answers end with ``The answer is X .``; :func:`final_answer` reads ``X`` back.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = set(kinds) - set(_MAKERS)
    if unknown or not kinds:
        raise ValueError(f"unknown or empty problem kinds {sorted(unknown)}; choose from {KINDS}")
    rng = random.Random(f"d2sd-corpus-{seed}")
    out = []
    for i in range(n):
        name, other = rng.sample(NAMES, 2)
        obj = rng.choice(OBJECTS)
        out.append(_MAKERS[kinds[i % len(kinds)]](rng, name, other, obj))
    return out


def final_answer(text: str) -> str | None:
    """The ``X`` of the last ``The answer is X`` in ``text`` (None when there is none)."""
    marker = "The answer is "
    pos = text.rfind(marker)
    if pos < 0:
        return None
    words = text[pos + len(marker):].split()
    return words[0] if words else None


def vocabulary_text() -> str:
    """Every word and number the generator can emit, once (so a tokenizer sees all of them)."""
    words = set(NAMES) | set(OBJECTS) | set(CONTAINERS)
    for prompt, answer in make_problems(len(KINDS) * 4, seed=0):
        words.update(prompt.split())
        words.update(answer.split())
    words.update(str(i) for i in range(MAX_NUMBER + 1))
    return " ".join(sorted(words))
