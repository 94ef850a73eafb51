"""python -m training.posttrain {data,rollouts,eval,report} ...

  data CONFIG [key=value ...]     build a stage's dataset (configs/reasoning/data_*.yaml)
  rollouts CHECKPOINT --out F     sample chat completions, verify them, write DPO pairs (JSONL)
  eval CHECKPOINT --out F         greedy math accuracy on held-out generated problems (JSON)
  report EVAL.json ... --out P    accuracy per stage with 95% intervals and paired gains; table, plot, JSON

Training itself is `python -m training.pretrain configs/reasoning/<stage>.yaml` (or through
`launch/pretrain.sh` / `launch/continue_train.sh`), so every stage runs under any TP/PP/DP layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import print_error
from common.config import ConfigError, load_config

EVAL_SEED = 99  # held-out problems: the stages' generated data use other seeds


def cmd_data(args) -> int:
    from training.posttrain.data import ReasoningDataConfig, build_reasoning_data

    manifest = build_reasoning_data(load_config(ReasoningDataConfig, args.config, args.overrides))
    sizes = {split: sum(e["sequences"] for e in entries) for split, entries in manifest["splits"].items()}
    print(f"wrote {manifest['config']['output_dir']}: sequences {sizes}, {manifest['reasoning_stats']}")
    return 0


def cmd_rollouts(args) -> int:
    from training.posttrain.evaluate import load_policy, rollout_pairs, write_jsonl

    policy = load_policy(args.checkpoint, args.tokenizer, args.chat_template)
    pairs, stats = rollout_pairs(policy, args.count, args.samples, args.temperature, args.seed, args.gold_fallback)
    if not pairs:
        print_error(f"no pairs: the policy solved every sampled problem or none was wrong ({stats})")
        return 1
    write_jsonl(args.out, pairs)
    print(f"wrote {len(pairs)} pairs to {args.out}: {stats}")
    return 0


def cmd_eval(args) -> int:
    from common.files import atomic_write_text
    from training.posttrain.evaluate import load_policy, math_accuracy, training_fingerprints

    policy = load_policy(args.checkpoint, args.tokenizer, args.chat_template)
    result = {"checkpoint": args.checkpoint, "stage": args.stage or Path(args.checkpoint).parent.name}
    data = [*args.training_data, *([policy.data_path] if policy.data_path else [])]
    result.update(math_accuracy(policy, args.count, args.format, args.seed, training=training_fingerprints(data)))
    print(f"{result['stage']}: accuracy {result['accuracy']:.3f} ({args.format} prompts, {args.count} problems)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def cmd_report(args) -> int:
    """Accuracy per stage with 95% intervals (evaluations of one stage at several problem seeds are
    pooled), and each stage's paired gain over the one before on the same problems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.files import atomic_write_text
    from training.posttrain.evaluate import stage_summary

    rows = stage_summary([json.loads(Path(f).read_text()) for f in args.results])
    header = f"{'stage':<16} {'format':<7} {'problems':>8} {'accuracy':>9} {'95% interval':>15}"
    print(f"{header} {'gain over previous':>26}")
    table = ["| stage | prompts | problems | verifier accuracy [95%] | gain over the stage before [95%, paired] |",
             "|---|---|---:|---|---|"]  # fmt: skip
    for r in rows:
        gain = ""
        if "gain" in r:
            no_variation = r["gain_low"] is None
            interval = "no variation" if no_variation else f"[{r['gain_low']:+.3f}, {r['gain_high']:+.3f}]"
            gain = f"{r['gain']:+.3f} {interval}"
        print(f"{r['stage']:<16} {r['format']:<7} {r['problems']:>8} {r['accuracy']:>9.3f} "
              f"[{r['low']:.3f}, {r['high']:.3f}] {gain:>26}")  # fmt: skip
        table.append(f"| {r['stage']} | {r['format']} | {r['problems']} | {r['accuracy']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {gain} |")  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    errors = [[max(r["accuracy"] - r["low"], 0) for r in rows], [max(r["high"] - r["accuracy"], 0) for r in rows]]
    ax.bar([f"{r['stage']}\n({r['format']})" for r in rows], [r["accuracy"] for r in rows], color="tab:blue",
           yerr=errors, capsize=4)  # fmt: skip
    ax.set_ylabel("verifier accuracy (greedy), 95% interval")
    ax.set_title(f"held-out math problems (n={rows[0]['problems']} per stage)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(table) + "\n")
    print(f"wrote {args.out} and the table as {Path(args.out).with_suffix('.json')} and .md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.posttrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="build a stage's dataset")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run=cmd_data)
    for name, run in (("rollouts", cmd_rollouts), ("eval", cmd_eval)):
        p = sub.add_parser(name)
        p.add_argument("checkpoint", help="a checkpoint folder, or a run's checkpoints/ (its latest)")
        p.add_argument("--tokenizer", help="default: the tokenizer of the dataset the run trained on")
        p.add_argument("--chat-template", help="an HF folder whose chat template writes chat prompts (default: the "
                       "one the model was trained with)")  # fmt: skip
        p.add_argument("--count", type=int, default=200, help="problems")
        p.add_argument("--out", required=name == "rollouts")
        p.set_defaults(run=run)
        if name == "rollouts":
            p.add_argument("--samples", type=int, default=4, help="completions per problem")
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--seed", type=int, default=13)
            p.add_argument("--gold-fallback", action="store_true", help="pair unsolved problems' reference solution")
        else:
            p.add_argument("--format", choices=["plain", "chat"], default="chat")
            p.add_argument("--seed", type=int, default=EVAL_SEED, help="problem set (stages train on other seeds)")
            p.add_argument("--stage", help="label in reports (default: the run's name)")
            p.add_argument("--training-data", nargs="*", default=[], help="datasets whose problems must not be "
                           "evaluated on (besides the one the model trained on): refused if any is")  # fmt: skip
    p = sub.add_parser("report", help="compare eval results")
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default="accuracy.png")
    p.set_defaults(run=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print_error(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
