"""Loading a PEFT LoRA adapter directory onto the model's (fused) projections."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from foreseer.layers.quantized_linear import QuantizedLinear
from foreseer.lora.ops import LoRAPair, SlotLoRA, slot_lora

# The Hugging Face projections an adapter may target, in a decoder layer's order.
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# adapter_config.json options that change what the adapter computes and that this engine does not implement.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "adapted parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
}

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (the adapter name appears only in memory).
_TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")



@dataclass(frozen=True)
class TargetShape:
    """Where an HF projection's LoRA delta lands here: a shard of one of the model's (maybe fused) projections."""

    module: str  # the projection here: qkv_proj, o_proj, gate_up_proj, down_proj
    shard: int  # which slice of its output (q, k, v; gate, up), in order
    in_features: int
    out_features: int  # of the shard


def base_targets(model: nn.Module) -> dict[str, TargetShape]:
    """The LoRA targets of a Llama-family model, from its fused layout (stacked_params, shard_sizes)."""
    linears = {name.rsplit(".", 1)[-1]: module for name, module in model.model.layers[0].named_modules()
               if isinstance(module, nn.Linear | QuantizedLinear)}
    targets = {}
    for name in SUPPORTED_MODULES:
        fused, shard = model.stacked_params.get(name, (name, 0))
        linear = linears[fused]
        out = model.shard_sizes(fused)[shard] if name in model.stacked_params else linear.out_features
        targets[name] = TargetShape(fused, shard, linear.in_features, out)
    return targets


@dataclass
class LoRAAdapter:
    """An adapter's weights in host memory, per layer and projection here, already laid out as the batched LoRA
    operations read them (foreseer/lora/ops.py): taking a device slot costs no conversion."""

    path: str
    rank: int
    scaling: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora; folded into every B
    target_modules: list[str]  # the HF projections it adapts
    base_model_name_or_path: str | None  # what it was trained on, as its config says (informational)
    layout: dict[tuple[int, str], SlotLoRA]
    num_shards: dict[str, int]  # projection here -> its shards (3 for qkv_proj)

    @property
    def weights(self) -> dict[tuple[int, str], list[LoRAPair | None]]:
        """(A, B) per shard of each adapted projection (views), None where a shard is not adapted."""
        return {key: weights.pairs(self.num_shards[key[1]]) for key, weights in self.layout.items()}

    @property
    def num_bytes(self) -> int:
        return sum(weights.num_bytes for weights in self.layout.values())


def load_adapter(path: str, targets: dict[str, TargetShape], num_layers: int, max_lora_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read a PEFT adapter directory (adapter_config.json and adapter_model.safetensors or .bin) into host memory
    in `dtype`; raises ValueError naming what does not fit the engine or the base model."""
    config = _read_config(path)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json has no valid rank r (got {rank!r})")
    if rank > max_lora_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {rank}, above max_lora_rank {max_lora_rank}; start the "
                         "engine with a larger max_lora_rank")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    base = config.get("base_model_name_or_path")
    mismatch = f"LoRA adapter {path!r} does not fit the base model (it was made for {base!r})"
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in _read_tensors(path).items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or match.group(2) not in targets:
            raise ValueError(f"LoRA adapter {path!r} has weight {name!r}, which is not a LoRA weight of a supported "
                             f"module ({', '.join(SUPPORTED_MODULES)})")
        layer = int(match.group(1))
        if layer >= num_layers:
            raise ValueError(f"{mismatch}: weight {name!r} is for layer {layer}; the base model has {num_layers}")
        pairs.setdefault((layer, match.group(2)), {})[match.group(3)] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r} has no LoRA weights")
    weights: dict[tuple[int, str], list[LoRAPair | None]] = {}
    shards_per_module = Counter(t.module for t in targets.values())
    out_sizes = module_out_sizes(targets)
    for (layer, name), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {name} has lora_{''.join(pair)} without its pair")
        target = targets[name]
        a, b = pair["A"], pair["B"]
        for part, tensor, expected in (("A", a, (rank, target.in_features)), ("B", b, (target.out_features, rank))):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{mismatch}: layer {layer} {name}.lora_{part} has shape {tuple(tensor.shape)}, "
                                 f"expected {expected}")
        shards = weights.setdefault((layer, target.module), [None] * shards_per_module[target.module])
        # Scaled before the cast to the model's dtype: a half-precision B is rounded once.
        shards[target.shard] = (a.to(dtype).contiguous(), (b.float() * scaling).to(dtype).contiguous())
    adapted = sorted({name for _, name in pairs}, key=SUPPORTED_MODULES.index)
    layout = {key: slot_lora(shards, out_sizes[key[1]], torch.device("cpu")) for key, shards in weights.items()}
    return LoRAAdapter(path, rank, scaling, adapted, base, layout, dict(shards_per_module))


def module_out_sizes(targets: dict[str, TargetShape]) -> dict[str, list[int]]:
    """Each projection here -> its shards' output sizes, in shard order."""
    out_sizes: dict[str, list[int]] = {}
    for target in sorted(targets.values(), key=lambda t: t.shard):
        out_sizes.setdefault(target.module, []).append(target.out_features)
    return out_sizes


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter directory {path!r} does not exist")
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json could not be read ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path!r} is a {config['peft_type']} adapter, not LORA")
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise ValueError(f"LoRA adapter {path!r} uses {what}, which is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r} trains biases (bias={config['bias']!r}); only bias='none' is "
                         "supported")
    modules = config.get("target_modules")
    # A string ("all-linear", or a regular expression) leaves it to the weight names to tell what is adapted. Names
    # in a list match a module's last component (PEFT saves "all-linear" as full module paths).
    if isinstance(modules, list | tuple):
        unsupported = sorted({m.rsplit(".", 1)[-1] for m in modules} - set(SUPPORTED_MODULES))
        if unsupported:
            raise ValueError(f"LoRA adapter {path!r} targets unsupported modules {unsupported}; supported: "
                             f"{', '.join(SUPPORTED_MODULES)}")
    return config


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return _read_tensor_file(path)
    except ValueError:
        raise
    except Exception as error:  # a truncated or corrupt file: an unusable adapter, never an engine failure
        raise ValueError(f"LoRA adapter {path!r}: its weights could not be read ({type(error).__name__}: "
                         f"{error})") from error


def _read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        return load_file(safetensors_path)
    bin_path = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors or adapter_model.bin")
