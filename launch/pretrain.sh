#!/usr/bin/env bash
"true" '''\'
# This file is both a bash script and a Python program.
#
#   bash launch/pretrain.sh [--config FILE] [key=value ...]
#       starts the DeepSpeed launcher on this file (NPROC ranks, default 4; DEEPSPEED_ARGS replaces
#       the launcher flags, e.g. DEEPSPEED_ARGS="--hostfile hosts --num_nodes 2").
#   deepspeed [launcher flags] launch/pretrain.sh [--config FILE] [key=value ...]
#       the launcher runs `python -u launch/pretrain.sh --local_rank=N ...` on every rank, which
#       lands in the Python half below and starts the trainer.
# Without --config, configs/pretrain/tiny.yaml is used.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a launcher_args <<< "${DEEPSPEED_ARGS:---num_gpus ${NPROC:-4}}"
exec deepspeed "${launcher_args[@]}" "$here/pretrain.sh" "$@"
'''

import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(os.environ.get("PRETRAIN_WORKDIR", ROOT))  # relative paths in configs are from the repo root

from training.pretrain import main  # noqa: E402

args = sys.argv[1:]
if "--config" not in args and not any(a.endswith((".yaml", ".yml")) for a in args):
    args = ["--config", os.path.join(ROOT, "configs", "pretrain", "tiny.yaml"), *args]
sys.exit(main(args))
