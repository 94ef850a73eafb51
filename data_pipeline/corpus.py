"""The default corpus, made locally with no network.

Where the text comes from (recorded in every record's `source` field):
- natural languages: sentences drawn from the per-locale word lists that the `faker` package ships
  (its `lorem` providers): real words in real scripts, without grammar. Enough for a tiny model to
  learn scripts, word shapes and frequencies per family; replace with real corpora for real runs.
- code: function definitions cut with `ast` from the Python standard library of the running
  interpreter.
- synthetic: math word problems with checked step-by-step solutions (`synthetic.math_problems`),
  arithmetic and algebra drills and textbook-style passages (`synthetic.drills`). Each record keeps
  its generator, seed and verified answer.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
from pathlib import Path

from faker import Faker
from tqdm import tqdm

from data_pipeline.synthetic.drills import GENERATORS, generate_exercises
from data_pipeline.synthetic.math_problems import generate_problems

# ISO code -> faker locale. 12 languages, 11 families, 9 scripts.
LOCALES = {
    "en": "en_US",
    "de": "de_DE",  # Germanic, Latin
    "fr": "fr_FR",
    "es": "es_ES",  # Romance, Latin
    "ru": "ru_RU",
    "pl": "pl_PL",  # Slavic, Cyrillic / Latin
    "bn": "bn_BD",  # Indo-Aryan, Bengali
    "zh": "zh_CN",  # Sino-Tibetan, Han
    "ja": "ja_JP",  # Japonic, kana + kanji
    "ar": "ar_AA",
    "he": "he_IL",  # Semitic, Arabic / Hebrew
    "az": "az_AZ",  # Turkic, Latin
    "el": "el_GR",  # Hellenic, Greek
    "th": "th_TH",  # Kra-Dai, Thai
}

STDLIB_MODULES = [
    "textwrap",
    "heapq",
    "bisect",
    "functools",
    "statistics",
    "fractions",
    "difflib",
    "shlex",
    "string",
    "colorsys",
    "calendar",
    "json.encoder",
    "json.decoder",
    "ipaddress",
    "argparse",
    "configparser",
    "csv",
    "dataclasses",
    "pathlib",
    "random",
]


def natural_documents(lang: str, count: int, seed: int) -> list[dict]:
    fake = Faker(LOCALES[lang])
    fake.seed_instance(seed)
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        paragraphs = [fake.paragraph(nb_sentences=rng.randint(2, 6)) for _ in range(rng.randint(1, 3))]
        docs.append({"text": "\n".join(paragraphs), "lang": lang, "source": f"faker.lorem:{LOCALES[lang]}"})
    return docs


def code_documents(count: int) -> list[dict]:
    import importlib

    docs = []
    for name in STDLIB_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                text = ast.get_source_segment(source, node)
                if text and 80 <= len(text) <= 4000:
                    docs.append({"text": text, "lang": "code", "source": f"python-stdlib:{name}"})
    return docs[:count]


def math_documents(count: int, seed: int) -> list[dict]:
    """Word problems, and a quarter as many of each drill / textbook generator."""
    docs = [
        {"text": p.text, "lang": "math", "generator": "math_problems", "seed": p.seed, "answer": p.answer}
        for p in generate_problems(count, seed)
    ]
    for kind in GENERATORS:
        docs += [
            {"text": e.text, "lang": "math", "generator": e.generator, "seed": e.seed, "answer": e.answer}
            for e in generate_exercises(kind, count // 4, seed)
        ]
    return docs


def write_default_corpus(out_dir: str | Path, docs_per_language: int = 600, seed: int = 0) -> list[Path]:
    """Write one JSONL file per language; each file is written to a temp name, then renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = {lang: (lambda lang=lang: natural_documents(lang, docs_per_language, seed)) for lang in LOCALES}
    jobs["code"] = lambda: code_documents(docs_per_language)
    jobs["math"] = lambda: math_documents(docs_per_language * 2, seed)
    paths = []
    for lang, make in tqdm(jobs.items(), desc="default corpus", unit="lang"):
        path = out_dir / f"{lang}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in make():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths
