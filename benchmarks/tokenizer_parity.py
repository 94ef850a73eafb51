"""Tokenizer parity on parallel text: the tokens a language needs for the same messages as English.

    python benchmarks/tokenizer_parity.py [--locale-dir /usr/share/locale] [--vocab 4096 16384]

The system's gettext catalogs are parallel text: every translation has its English original (the
msgid). Per language, the messages split in two by a hash of the msgid: the tokenizers are trained
on one half (the translations of every language, and English once), parity is measured on the
other. Premium (Petrov et al., 2023): a language's tokens for the held-out messages over English's
tokens for the same messages (1.0 = parity). Two byte-level BPEs of each vocabulary size:
- `natural`: trained on all the training text as it comes (languages in their own proportions);
- `balanced`: trained on `data_pipeline.tokenizer_sample`'s sample (the build's default).
Also characters per token, the build's own measure. Prints a table, writes
benchmarks/results/tokenizer_parity.json and docs/img/tokenizer_parity.png.
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.tokenizer import train_bpe  # noqa: E402
from data_pipeline.tokenizer_sample import balanced_sample  # noqa: E402

CATALOGS = ("glib20.mo", "gtk20.mo", "gtk20-properties.mo", "gdk-pixbuf.mo", "*-15.mo")
LANGUAGES = {  # the locale folders of the two real-text fixtures: 30 languages, 15 scripts
    "ar": "ar", "bn": "bn", "cs": "cs", "de": "de", "el": "el", "es": "es", "fa": "fa", "fi": "fi", "fr": "fr",
    "he": "he", "hi": "hi", "hu": "hu", "hy": "hy", "id": "id", "it": "it", "ja": "ja", "ka": "ka", "ko": "ko",
    "ml": "ml", "nl": "nl", "pl": "pl", "pt_BR": "pt", "ru": "ru", "sv": "sv", "ta": "ta", "th": "th", "tr": "tr",
    "uk": "uk", "vi": "vi", "zh_CN": "zh"}  # fmt: skip


def pairs(folder: Path) -> dict[str, str]:
    """msgid -> translation, both at least 20 characters, from every catalog of the locale."""
    out = {}
    for catalog in sorted(c for pattern in CATALOGS for c in folder.glob(pattern)):
        with catalog.open("rb") as f:
            for key, text in gettext.GNUTranslations(f)._catalog.items():
                if isinstance(key, str) and isinstance(text, str) and len(key) >= 20 and len(text) >= 20:
                    out[key] = text
    return out


def held_out(key: str) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] % 2 == 1


def measure(tokenizer, corpus: dict[str, dict[str, str]]) -> dict[str, dict[str, float]]:
    def tokens(texts):
        return sum(len(e.ids) for e in tokenizer.encode_batch(texts))

    rows = {}
    for lang, messages in corpus.items():
        test = sorted(k for k in messages if held_out(k))
        translated = [messages[k] for k in test]
        n_lang, n_en = tokens(translated), tokens(test)
        rows[lang] = {"premium": n_lang / n_en, "chars_per_token": sum(map(len, translated)) / n_lang}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locale-dir", default="/usr/share/locale")
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sample-chars", type=int, default=1_000_000)
    args = parser.parse_args()
    corpus = {lang: pairs(Path(args.locale_dir, folder, "LC_MESSAGES")) for folder, lang in LANGUAGES.items()}
    corpus = {lang: messages for lang, messages in corpus.items() if len(messages) >= 100}
    if len(corpus) < 2:
        sys.exit(f"{args.locale_dir}: fewer than two languages with 100 translated messages in {CATALOGS}")
    train = {lang: [v for k, v in m.items() if not held_out(k)] for lang, m in corpus.items()}
    train["en"] = sorted({k for m in corpus.values() for k in m if not held_out(k)})
    rng = np.random.default_rng(0)  # random keys, as the build's sample draws them
    keyed = {lang: sorted((float(rng.random()), t) for t in texts) for lang, texts in sorted(train.items())}
    samples = {
        "natural": [t for texts in train.values() for t in texts],
        "balanced": balanced_sample(keyed, args.sample_chars).texts,
    }
    results = {"languages": {lang: len(m) for lang, m in corpus.items()}, "runs": []}
    for vocab in args.vocab:
        for name, texts in samples.items():
            rows = measure(train_bpe(texts, vocab), corpus)
            premiums = np.array([r["premium"] for r in rows.values()])
            cpt = np.array([r["chars_per_token"] for r in rows.values()])
            summary = {
                "vocab": vocab, "sample": name, "premium_median": float(np.median(premiums)),
                "premium_worst": float(premiums.max()), "worst_language": max(rows, key=lambda k: rows[k]["premium"]),
                "cpt_worst_over_median": float(cpt.min() / np.median(cpt)), "per_language": rows,
            }  # fmt: skip
            results["runs"].append(summary)
    header = f"{'vocab':>6s} {'sample':9s} {'premium median':>14s} {'worst':>6s} {'worst lang':>10s}"
    print(f"{header} {'cpt worst/median':>16s}")
    for r in results["runs"]:
        print(
            f"{r['vocab']:6d} {r['sample']:9s} {r['premium_median']:14.2f} {r['premium_worst']:6.2f} "
            f"{r['worst_language']:>10s} {r['cpt_worst_over_median']:16.2f}"
        )
    out = ROOT / "benchmarks" / "results" / "tokenizer_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, ROOT / "docs" / "img" / "tokenizer_parity.png")
    print(f"wrote {out}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted(results["runs"][0]["per_language"])
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(results["runs"])
    for i, run in enumerate(results["runs"]):
        values = [run["per_language"][lang]["premium"] for lang in langs]
        ax.bar(np.arange(len(langs)) + i * width, values, width, label=f"{run['sample']}, vocab {run['vocab']}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
    ax.set_ylabel("tokens / English tokens (same messages)")
    ax.set_title("Tokenizer premium on held-out gettext messages (1.0 = parity with English)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
