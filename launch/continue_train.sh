#!/usr/bin/env bash
# Continue-train a reasoning variant of a base model, stage by stage, with checkpoints between stages:
#   base -> (1) CoT mid-training with replay -> (2) SFT -> rollouts scored by the verifier -> (3) LN-DPO
#   -> (4) RL with verifier rewards (GRPO, on-policy rollouts),
# evaluating verifier accuracy on held-out generated problems after each stage.
#
#   launch/continue_train.sh [BASE]
#
# BASE: the base model, a checkpoint or a run's checkpoints/ folder (default runs/tiny/checkpoints,
# what `make pretrain` writes), or an HF Phi3 folder: then the base corpus is tokenized with the
# folder's own tokenizer (BASE_DATA_CONFIG, default configs/data/default.yaml) and every stage's
# conversations, evaluation prompts and rollouts are written in the folder's own chat template.
# Environment:
#   LAUNCH      how a training stage starts (default: deepspeed --num_gpus $NPROC launch/pretrain.sh)
#   NPROC       ranks for the default LAUNCH (4: the stage configs use TP=2 x PP=2)
#   OVERRIDES   dotted overrides for every training stage, e.g. "parallel.tp=1 parallel.pp=1"
#   EVAL_COUNT  held-out problems per evaluation (200)
#   EVAL_SEEDS  held-out problem sets, each evaluated and pooled in the report with 95% intervals (99)
#   ROLLOUTS    problems sampled for DPO pairs (2000, 4 samples each)
#   OUT         where evaluations, rollouts and the report go (runs/reasoning)
#   DATA        where the stage datasets go (data/reasoning; $OUT/data for an HF folder)
#   DATA_OVERRIDES  dotted overrides for every stage's data build, e.g. "generated.count=500"
#   ROLLOUT_FLAGS   extra flags for the rollouts, e.g. --gold-fallback
# Run again, the script skips what is complete: a dataset newer than its config and inputs, a
# stage whose latest checkpoint is its final step and newer than its config, data and starting
# model, an evaluation or the rollouts newer than the model they used; an unfinished stage resumes
# from its own latest checkpoint. Delete an output to redo it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE=${1:-runs/tiny/checkpoints}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-deepspeed --num_gpus ${NPROC:-4} launch/pretrain.sh}
read -r -a overrides <<< "${OVERRIDES:-}"
EVAL_COUNT=${EVAL_COUNT:-200}
OUT=${OUT:-runs/reasoning}
mkdir -p "$OUT"
read -r -a data_overrides <<< "${DATA_OVERRIDES:-}"
if [[ -f "$BASE/config.json" ]]; then  # an HF folder: its tokenizer and chat template throughout
    DATA=${DATA:-$OUT/data}
    if [[ ! -f "$DATA/base/manifest.json" ]]; then
        $PYTHON -m data_pipeline build "${BASE_DATA_CONFIG:-configs/data/default.yaml}" \
            "output_dir=$DATA/base" "tokenizer.path=$BASE"
    fi
    data_overrides+=("base_data=$DATA/base" "chat_template=$BASE")
fi
DATA=${DATA:-data/reasoning}

newer() {  # newer OUTPUT INPUT...: OUTPUT exists and is newer than every INPUT that exists
    local out=$1 input
    shift
    [[ -e $out ]] || return 1
    for input in "$@"; do [[ ! -e $input || $out -nt $input ]] || return 1; done
}
model_file() {  # what changes when a model changes: a checkpoints/ folder's `latest`, else the path itself
    if [[ -f $1/latest ]]; then echo "$1/latest"; else echo "$1"; fi
}
stage() {  # stage NAME INIT_FROM [DATA_NAME]: train configs/reasoning/NAME.yaml from INIT_FROM
    local data=$DATA/${3:-$1}
    if newer "$(run_dir "$1")/latest" "configs/reasoning/$1.yaml" "$data/manifest.json" "$(model_file "$2")" &&
        [[ $(cat "$(run_dir "$1")/latest") == "$(final_step "$1")" ]]; then
        echo "=== stage $1: finished ($(run_dir "$1")/$(cat "$(run_dir "$1")/latest")), skipped"
        return
    fi
    echo "=== stage $1 (from $2)"
    $LAUNCH --config "configs/reasoning/$1.yaml" "init_from=$2" "data.path=$data" "${overrides[@]}"
}
final_step() {  # final_step NAME: the checkpoint folder a finished run of stage NAME ends with
    $PYTHON - "configs/reasoning/$1.yaml" "${overrides[@]}" <<'PY'
import sys
from training.pretrain import load_run_config
print(f"step_{load_run_config(sys.argv[1], sys.argv[2:])[0].steps:08d}")
PY
}
build_data() {  # build_data NAME [key=value ...]: the dataset of stage NAME (kept while newer than its inputs)
    local name=$1 extra=()
    shift
    for kv in "$@"; do [[ $kv == jsonl=* ]] && extra+=("${kv#jsonl=}"); done
    if newer "$DATA/$name/manifest.json" "configs/reasoning/data_$name.yaml" "${extra[@]}"; then
        echo "=== data $name: $DATA/$name is newer than its config and inputs, kept"
        return
    fi
    $PYTHON -m training.posttrain data "configs/reasoning/data_$name.yaml" "output_dir=$DATA/$name" \
        "${data_overrides[@]}" "$@"
}
read -r -a eval_seeds <<< "${EVAL_SEEDS:-99}"
evaluate() {  # evaluate CHECKPOINTS FORMAT LABEL: eval_LABEL.json (first seed), eval_LABEL_sN.json (others)
    local seed first=1 data=() name
    for name in cot sft dpo; do [[ -f $DATA/$name/manifest.json ]] && data+=("$DATA/$name"); done
    for seed in "${eval_seeds[@]}"; do
        local out=$OUT/eval_$3_s$seed.json
        if ((first)); then out=$OUT/eval_$3.json; first=0; fi
        if newer "$out" "$(model_file "$1")"; then
            echo "=== eval $3 seed $seed: $out is newer than the model, kept"
            continue
        fi
        # Refused if a stage dataset built so far holds any of the evaluation problems.
        $PYTHON -m training.posttrain eval "$1" --format "$2" --stage "$3" --count "$EVAL_COUNT" --seed "$seed" \
            --out "$out" --training-data "${data[@]}"
    done
}
run_dir() {  # where a stage's run writes, after OVERRIDES (out_dir=...)
    local out_dir=runs
    for o in "${overrides[@]}"; do [[ $o == out_dir=* ]] && out_dir=${o#out_dir=}; done
    echo "$out_dir/reasoning-$1/checkpoints"
}

evaluate "$BASE" plain base
build_data cot
stage cot "$BASE"
evaluate "$(run_dir cot)" plain cot
build_data sft
stage sft "$(run_dir cot)"
evaluate "$(run_dir sft)" chat sft
read -r -a rollout_flags <<< "${ROLLOUT_FLAGS:-}"
if newer "$OUT/rollouts.jsonl" "$(model_file "$(run_dir sft)")"; then
    echo "=== rollouts: $OUT/rollouts.jsonl is newer than the SFT model, kept"
else
    $PYTHON -m training.posttrain rollouts "$(run_dir sft)" --count "${ROLLOUTS:-2000}" --out "$OUT/rollouts.jsonl" \
        "${rollout_flags[@]}"
fi
build_data dpo "jsonl=$OUT/rollouts.jsonl"
stage dpo "$(run_dir sft)"
evaluate "$(run_dir dpo)" chat dpo
stage rl "$(run_dir dpo)" sft  # samples its own rollouts; the SFT data gives tokenizer and chat template
evaluate "$(run_dir rl)" chat rl
reports=()
shopt -s nullglob
for stage in base cot sft dpo rl; do reports+=("$OUT/eval_$stage.json" "$OUT"/eval_"$stage"_s*.json); done
$PYTHON -m training.posttrain report "${reports[@]}" --out "$OUT/accuracy.png"
