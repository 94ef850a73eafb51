#!/usr/bin/env bash
# Continue-train a reasoning variant of a base model, stage by stage, with checkpoints between stages:
#   base -> (1) CoT mid-training with replay -> (2) SFT -> rollouts scored by the verifier -> (3) LN-DPO,
# evaluating verifier accuracy on held-out generated problems after each stage.
#
#   launch/continue_train.sh [BASE]
#
# BASE: the base model, a checkpoint or a run's checkpoints/ folder (default runs/tiny/checkpoints,
# what `make pretrain` writes); for an HF Phi3 folder, build the stage datasets with its tokenizer.
# Environment:
#   LAUNCH      how a training stage starts (default: deepspeed --num_gpus $NPROC launch/pretrain.sh)
#   NPROC       ranks for the default LAUNCH (4: the stage configs use TP=2 x PP=2)
#   OVERRIDES   dotted overrides for every training stage, e.g. "parallel.tp=1 parallel.pp=1"
#   EVAL_COUNT  held-out problems per evaluation (200)
#   ROLLOUTS    problems sampled for DPO pairs (2000, 4 samples each)
#   OUT         where evaluations, rollouts and the report go (runs/reasoning)
# Every stage resumes from its own latest checkpoint when the script is run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE=${1:-runs/tiny/checkpoints}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-deepspeed --num_gpus ${NPROC:-4} launch/pretrain.sh}
read -r -a overrides <<< "${OVERRIDES:-}"
EVAL_COUNT=${EVAL_COUNT:-200}
OUT=${OUT:-runs/reasoning}
mkdir -p "$OUT"

stage() {  # stage NAME INIT_FROM: train configs/reasoning/NAME.yaml from INIT_FROM
    echo "=== stage $1 (from $2)"
    $LAUNCH --config "configs/reasoning/$1.yaml" "init_from=$2" "${overrides[@]}"
}
evaluate() {  # evaluate CHECKPOINTS FORMAT LABEL
    $PYTHON -m training.posttrain eval "$1" --format "$2" --stage "$3" --count "$EVAL_COUNT" --out "$OUT/eval_$3.json"
}
run_dir() {  # where a stage's run writes, after OVERRIDES (out_dir=...)
    local out_dir=runs
    for o in "${overrides[@]}"; do [[ $o == out_dir=* ]] && out_dir=${o#out_dir=}; done
    echo "$out_dir/reasoning-$1/checkpoints"
}

evaluate "$BASE" plain base
$PYTHON -m training.posttrain data configs/reasoning/data_cot.yaml
stage cot "$BASE"
evaluate "$(run_dir cot)" plain cot
$PYTHON -m training.posttrain data configs/reasoning/data_sft.yaml
stage sft "$(run_dir cot)"
evaluate "$(run_dir sft)" chat sft
$PYTHON -m training.posttrain rollouts "$(run_dir sft)" --count "${ROLLOUTS:-2000}" --out "$OUT/rollouts.jsonl"
$PYTHON -m training.posttrain data configs/reasoning/data_dpo.yaml "jsonl=$OUT/rollouts.jsonl"
stage dpo "$(run_dir sft)"
evaluate "$(run_dir dpo)" chat dpo
$PYTHON -m training.posttrain report "$OUT"/eval_{base,cot,sft,dpo}.json --out "$OUT/accuracy.png"
