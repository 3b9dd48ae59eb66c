"""The embedded instruction set: tasks generated from a seed whose answers can be checked exactly.

Four kinds, each a one-line user prompt with a one-line answer:
  arithmetic  "What is 7 + 12?"                             -> "19"
  sorting     "Sort these numbers: 5 2 9"                    -> "2 5 9"
  reversal    "Reverse this word: lamp"                      -> "pmal"
  counting    "How many times does a appear in banana?"      -> "3"
``expected_answer`` reads the answer back from the prompt alone, so ``exact_answer_reward`` is a
plain ``reward(prompt, response)`` function, the form ``moekit dpo --online --reward`` takes.
Every fifth distinct prompt (in generation order) is held out. The preference set pairs each
correct answer (chosen) with a wrong one of the same form (rejected).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from moekit.train.chat_data import Preference

KINDS = ("arithmetic", "sorting", "reversal", "counting")
HELD_OUT_EVERY = 5
DEFAULT_SIZE = 2000
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PATTERNS = {
    "arithmetic": re.compile(r"What is (\d+) ([+*-]) (\d+)\?"),
    "sorting": re.compile(r"Sort these numbers: ([\d ]+)"),
    "reversal": re.compile(r"Reverse this word: ([a-z]+)"),
    "counting": re.compile(r"How many times does ([a-z]) appear in ([a-z]+)\?"),
}


@dataclass(frozen=True)
class Instruction:
    kind: str
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> tuple[dict, ...]:
        user = {"role": "user", "content": self.prompt}
        return (user, {"role": "assistant", "content": self.answer}) if with_answer else (user,)


def _prompt(kind: str, rng: random.Random) -> str:
    if kind == "arithmetic":
        operator = rng.choice(sorted(_OPERATORS))
        a, b = rng.randint(0, 20), rng.randint(0, 20 if operator != "*" else 9)
        a, b = (max(a, b), min(a, b)) if operator == "-" else (a, b)
        return f"What is {a} {operator} {b}?"
    if kind == "sorting":
        return "Sort these numbers: " + " ".join(str(rng.randint(0, 9))
                                                  for _ in range(rng.randint(3, 5)))
    word = "".join(rng.choice(_LETTERS[:8]) for _ in range(rng.randint(3, 6)))
    if kind == "reversal":
        return f"Reverse this word: {word}"
    return f"How many times does {rng.choice(word)} appear in {word}?"


def expected_answer(prompt: str) -> str | None:
    """The exact answer to a prompt of the embedded set, or None for any other prompt."""
    for kind, pattern in _PATTERNS.items():
        match = pattern.fullmatch(prompt.strip())
        if match is None:
            continue
        if kind == "arithmetic":
            a, operator, b = match.groups()
            return str(_OPERATORS[operator](int(a), int(b)))
        if kind == "sorting":
            return " ".join(sorted(match.group(1).split(), key=int))
        if kind == "reversal":
            return match.group(1)[::-1]
        return str(match.group(2).count(match.group(1)))
    return None


def exact_answer_reward(prompt: str, response: str) -> float:
    """1.0 when ``response`` (stripped) is the prompt's exact answer, else 0.0."""
    return float(response.strip() == expected_answer(prompt))


def instruction_set(seed: int = 0, size: int = DEFAULT_SIZE) -> tuple[list[Instruction],
                                                                      list[Instruction]]:
    """(train, held_out): ``size`` distinct instructions of the four kinds in turn."""
    rng, seen, instructions = random.Random(seed), set(), []
    while len(instructions) < size:
        kind = KINDS[len(instructions) % len(KINDS)]
        prompt = _prompt(kind, rng)
        if prompt not in seen:
            seen.add(prompt)
            instructions.append(Instruction(kind, prompt, expected_answer(prompt)))
    held_out = instructions[::HELD_OUT_EVERY]
    train = [x for i, x in enumerate(instructions) if i % HELD_OUT_EVERY]
    return train, held_out


def _wrong_answer(instruction: Instruction, rng: random.Random) -> str:
    answer = instruction.answer
    if instruction.kind in ("arithmetic", "counting"):
        return str(int(answer) + rng.choice([-2, -1, 1, 2]))
    if instruction.kind == "sorting" and len(set(answer.split())) > 1:
        return " ".join(reversed(answer.split())) if rng.random() < 0.5 else \
            " ".join(answer.split()[1:] + answer.split()[:1])
    return answer + rng.choice(_LETTERS[:8])  # a reversal, or numbers all alike, with a letter


def preference_set(instructions: list[Instruction], seed: int = 0) -> list[Preference]:
    """A correct answer (chosen) over a wrong one (rejected) for each instruction."""
    rng, pairs = random.Random(seed + 1), []
    for instruction in instructions:
        wrong = _wrong_answer(instruction, rng)
        while wrong == instruction.answer:
            wrong = _wrong_answer(instruction, rng)
        pairs.append(Preference(instruction.messages(False), instruction.answer, wrong))
    return pairs
