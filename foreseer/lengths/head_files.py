"""How a length head is stored: its config as JSON and its weights as fp32 safetensors, in one directory."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

import torch
from torch import nn

Config = TypeVar("Config")


def save_head(head: nn.Module, config: Any, directory: str, config_file: str, weights_file: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, config_file), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
        f.write("\n")
    path = os.path.join(directory, weights_file)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, path)
    os.chmod(path, 0o644)  # safetensors creates it owner-only; shipped weights must be readable by every user


def load_head_files(directory: str, config_class: type[Config], config_file: str, weights_file: str, what: str,
                    hidden_size: int | None) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and weights saved by save_head; ValueError naming the problem if they are missing, have fields
    the config does not know, or (with hidden_size) do not fit the base model."""
    from safetensors.torch import load_file

    for name in (config_file, weights_file):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{what} directory {directory!r} has no {name}")
    with open(os.path.join(directory, config_file)) as f:
        raw = json.load(f)
    unknown = set(raw) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ValueError(f"{config_file} in {directory!r} has unknown fields {sorted(unknown)}")
    config = config_class(**raw)
    if hidden_size is not None and config.hidden_size != hidden_size:
        raise ValueError(f"{what} in {directory!r} is for hidden size {config.hidden_size}, the model has "
                         f"{hidden_size}")
    return config, load_file(os.path.join(directory, weights_file))
