"""python -m training.plan CONFIG --gpus N ...: see training/plan/cost.py for the model."""

import sys

from training.plan.cli import main

sys.exit(main())
