"""Our top-level `kernels` package shares its name with an unrelated PyPI package that transformers
looks for; transformers must still import and build a model with ours installed."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import kernels, kernels.attention
import torch
from transformers import Phi3Config, Phi3ForCausalLM
config = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
model = Phi3ForCausalLM(config)
logits = model(torch.randint(0, 128, (1, 8))).logits
assert logits.shape == (1, 8, 128), logits.shape
print("ok", kernels.__file__)
"""


def test_transformers_builds_a_model_next_to_our_kernels_package():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout and "kernels/__init__.py" in result.stdout


def test_packages_import_from_the_installed_distribution():
    from importlib.metadata import distribution

    dist = distribution("polyglot-train")
    assert {"torch", "deepspeed", "pyarrow", "tokenizers"} <= {
        r.split()[0].split(">")[0].split("=")[0] for r in dist.requires or []
    }
