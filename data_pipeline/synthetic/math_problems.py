"""Math word problems with step-by-step solutions whose answers a verifier checks.

A problem is a start quantity and a chain of operations; the solution writes one line per step
(`Step k: a op b = c`) and ends with `Answer: N`. `verify_solution` re-does every step's
arithmetic and compares the final answer with the problem's own computation, so it also scores
model generations (the reasoning stage uses it as its reward).

Held out by construction: the problem space is small (names, items and numbers repeat across
seeds), so sets made with different seeds share problems. Instead, one arithmetic chain in
`HELD_OUT_ONE_IN` (by a hash of the solution, which is the chain) is reserved for evaluation:
`generate_problems` gives training sets (corpus, CoT, SFT, rollouts, GRPO) only the other chains
and evaluation sets (`held_out=True`) only those, so no evaluation question appears in any
training set, neither word for word nor with other names and items over the same arithmetic.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAMES = ["Ana", "Ben", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]

# (verb phrase for the story, symbol) per operation; divisions are generated to be exact.
OPS = {
    "+": ["buys {n} more", "finds {n} more", "receives {n} more"],
    "-": ["gives {n} away", "loses {n}", "sells {n}"],
    "*": ["multiplies the collection by {n}", "ends up with {n} times as many"],
    "/": ["splits them into {n} equal groups and keeps one group"],
}

HELD_OUT_ONE_IN = 8

STEP_RE = re.compile(r"Step \d+: (-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str
    answer: int
    seed: int

    @property
    def text(self) -> str:
        return f"Question: {self.question}\nSolution:\n{self.solution}"


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def generate_problem(seed: int, max_steps: int = 3) -> MathProblem:
    """Deterministic in `seed`: the same seed always gives the same problem."""
    rng = random.Random(seed)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 30)
    story = [f"{name} has {value} {item}."]
    steps = []
    for k in range(1, rng.randint(1, max_steps) + 1):
        op = rng.choice("+-*/")
        if op == "/":
            divisors = [d for d in range(2, 7) if value % d == 0]
            if not divisors:
                op = "+"
        if op == "/":
            n = rng.choice(divisors)
        elif op == "*":
            n = rng.randint(2, 4)
        elif op == "-":
            n = rng.randint(1, max(1, value - 1))
        else:
            n = rng.randint(1, 20)
        result = _apply(value, op, n)
        story.append(f"Then {name} {rng.choice(OPS[op]).format(n=n)}.")
        steps.append(f"Step {k}: {value} {op} {n} = {result}")
        value = result
    story.append(f"How many {item} does {name} have now?")
    solution = "\n".join(steps + [f"Answer: {value}"])
    return MathProblem(question=" ".join(story), solution=solution, answer=value, seed=seed)


def extract_answer(text: str) -> int | None:
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def verify_solution(solution: str, expected: int) -> bool:
    """True when every written step is correct arithmetic and the final answer equals `expected`."""
    for a, op, b, c in STEP_RE.findall(solution):
        if op == "/" and int(b) == 0:
            return False
        if _apply(int(a), op, int(b)) != int(c):
            return False
    return extract_answer(solution) == expected


def is_held_out(problem: MathProblem) -> bool:
    """Whether the problem's arithmetic chain is reserved for evaluation."""
    digest = hashlib.sha256(problem.solution.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_ONE_IN == 0


QUESTION_RE = re.compile(r"Question:\s*(.*?)(?:\nSolution:|$)", re.DOTALL)


def _key(kind: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}:{text}".encode()).digest()[:8], "big")


def question_fingerprints(text: str) -> list[int]:
    """Keys that recognise a problem in any text that states it: its question, case-folded with
    whitespace collapsed ("Question: ..." where the text has one, else the whole text), and its
    arithmetic chain (the `Step k: a op b` sequence, which outlives renamed people and items)."""
    match = QUESTION_RE.search(text)
    question = " ".join((match.group(1) if match else text).casefold().split())
    keys = [_key("question", question)]
    chain = [m.group(1, 2, 3) for m in STEP_RE.finditer(text)]
    if chain:
        keys.append(_key("chain", repr(chain)))
    return keys


def overlap(problems: list[MathProblem], fingerprints) -> list[MathProblem]:
    """The problems that a set of fingerprints (`question_fingerprints` of training texts) holds."""
    seen = {int(k) for k in fingerprints}
    return [p for p in problems if any(k in seen for k in question_fingerprints(p.text))]


def generate_problems(count: int, seed: int, max_steps: int = 3, held_out: bool = False) -> list[MathProblem]:
    """`count` verified problems from seed `seed`: candidates `seed * 1_000_003 + i` for i = 0, 1, ...,
    keeping those on the asked side of the split (training: `held_out=False`; evaluation: True)."""
    problems, i = [], 0
    while len(problems) < count:
        problem = generate_problem(seed * 1_000_003 + i, max_steps)
        i += 1
        if is_held_out(problem) != held_out:
            continue
        if not verify_solution(problem.solution, problem.answer):
            raise AssertionError(f"generator produced an unverifiable problem (seed {problem.seed})")
        problems.append(problem)
    return problems
