"""Near-dedup recall and precision: the LSH S-curve, and what is removed on real unspaced text.

    python benchmarks/near_dedup.py [--copies 3]

For the default settings (threshold 0.8, 64 permutations, 5-character shingles for unspaced
scripts) and two choices of bands: the build's (`data_pipeline.dedup.lsh_bands`: a pair at the
threshold is a candidate with probability >= 0.95, then checked exactly) and datasketch's optimum
for the same settings (what the build used before: 5 bands x 11 rows, no check). Every Chinese,
Japanese and Thai document of the real-text fixtures is edited into `--copies` copies per Jaccard
bin (characters replaced at random), and each pair is run through the build's own MinHash, bands
and check. Prints a table, writes benchmarks/results/near_dedup.json and docs/img/near_dedup.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.build_config import NearDedupConfig  # noqa: E402
from data_pipeline.build_tokenize import _minhash  # noqa: E402
from data_pipeline.dedup import candidate_probability, jaccard, lsh_bands, shingles  # noqa: E402
from tests.test_near_dedup import edited_to_similarity, unspaced_documents  # noqa: E402

BINS = [(round(lo, 2), round(lo + 0.05, 2)) for lo in np.arange(0.5, 1.0, 0.05)]


def shares_a_band(a: np.ndarray, b: np.ndarray, bands: list[tuple[int, int]]) -> bool:
    return any(np.array_equal(a[s:e], b[s:e]) for s, e in bands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3, help="edited copies per document and bin")
    args = parser.parse_args()
    near = NearDedupConfig()
    schemes = {
        "build (checked)": (lsh_bands(near.threshold, near.num_perm), True),
        "datasketch optimum (unchecked)": ([(b * 11, (b + 1) * 11) for b in range(5)], False),
    }
    rng = np.random.default_rng(0)
    documents = unspaced_documents()
    rows = []
    for low, high in BINS:
        counts = {name: 0 for name in schemes}
        pairs = 0
        for _, text in documents:
            original = _minhash(text, near)
            for _ in range(args.copies):
                copy, similarity = edited_to_similarity(text, low, high, near.ngram, rng)
                signature = _minhash(copy, near)
                exact = jaccard(shingles(text, near.ngram), shingles(copy, near.ngram))
                for name, (bands, checked) in schemes.items():
                    candidate = shares_a_band(original, signature, bands)
                    counts[name] += candidate and (not checked or exact >= near.threshold)
                pairs += 1
        rows.append({"bin": [low, high], "pairs": pairs, **{n: c / pairs for n, c in counts.items()}})
        print(
            f"J in [{low:.2f}, {high:.2f}): {pairs} pairs, "
            + ", ".join(f"{n}: {c / pairs:.3f}" for n, c in counts.items())
        )
    curves = {}
    for name, (bands, _) in schemes.items():
        b, r = len(bands), bands[0][1] - bands[0][0]
        curves[name] = {"bands": b, "rows": r, "at_threshold": candidate_probability(near.threshold, b, r)}
    print(f"\n{'scheme':32s} {'bands x rows':>12s} {'P(candidate | J=0.8)':>21s}")
    for name, c in curves.items():
        print(f"{name:32s} {c['bands']:>5d} x {c['rows']:<4d} {c['at_threshold']:21.3f}")
    out = ROOT / "benchmarks" / "results" / "near_dedup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(near), "schemes": curves, "measured": rows}, indent=1))
    plot(curves, rows, near.threshold, ROOT / "docs" / "img" / "near_dedup.png")
    print(f"wrote {out}")


def plot(curves: dict, rows: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    s = np.linspace(0, 1, 201)
    mids = [(r["bin"][0] + r["bin"][1]) / 2 for r in rows]
    for (name, c), color in zip(curves.items(), ("C0", "C1"), strict=True):
        ax.plot(s, candidate_probability(s, c["bands"], c["rows"]), color=color, label=f"{name}: S-curve")
        ax.plot(mids, [r[name] for r in rows], "o", color=color, label=f"{name}: removed, real text")
    ax.axvline(threshold, color="k", lw=0.8, ls="--")
    ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("Jaccard similarity of the pair (5-character shingles)")
    ax.set_ylabel("probability")
    ax.set_title("Near-dedup at threshold 0.8, 64 permutations (Chinese, Japanese, Thai)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
