"""The behaviour adapters shipped for the default model, for demos, tests and `foreseer bench lora` (trained by
`foreseer lora train`, foreseer/training/lora_adapters.py)."""

from __future__ import annotations

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
DEFAULT_MODEL = "smollm2-135m-instruct"
# Packaged model name -> behaviour -> directory of its adapter under WEIGHTS_DIR.
SHIPPED = {DEFAULT_MODEL: {name: f"{DEFAULT_MODEL}-{name.replace('_', '-')}"
                           for name in ("uppercase", "json", "one_sentence")}}


def shipped_adapters(model: str = DEFAULT_MODEL) -> dict[str, str]:
    """behaviour -> directory of the adapters shipped for this model (only those present); {} for other models."""
    paths = {name: os.path.join(WEIGHTS_DIR, directory) for name, directory in SHIPPED.get(model, {}).items()}
    return {name: path for name, path in paths.items()
            if os.path.isfile(os.path.join(path, "adapter_model.safetensors"))}
