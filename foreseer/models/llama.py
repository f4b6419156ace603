"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2): model code only, over a flattened token batch."""

from collections.abc import Iterable

import torch
from torch import nn

from foreseer.layers.activation import silu_and_mul
from foreseer.layers.attention import PagedAttention
from foreseer.layers.norm import RMSNorm
from foreseer.layers.quantized_linear import BlockWeight, QuantizedEmbedding, QuantizedLinear
from foreseer.layers.rotary import RotaryEmbedding
from foreseer.lora.context import apply_lora
from foreseer.models.config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index  # names this layer's projections to the LoRA context
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = apply_lora(self.qkv_proj(x), x, self.layer_index, "qkv_proj")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v).flatten(1)
        return apply_lora(self.o_proj(out), out, self.layer_index, "o_proj")


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = silu_and_mul(apply_lora(self.gate_up_proj(x), x, self.layer_index, "gate_up_proj"))
        return apply_lora(self.down_proj(hidden), hidden, self.layer_index, "down_proj")


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, layer_index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): the next norm adds the two."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(positions, x), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    logits_slice = 2048  # vocabulary entries per matmul in compute_logits
    # HF checkpoint projections that live inside one fused projection here: name -> (fused name, shard index).
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in vocabulary slices: each slice of the output stays in cache while it is written, which
        keeps a large-vocabulary matmul near full speed on a CPU. A head in its stored format has its own kernels."""
        if not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(hidden).float()
        weight = self.lm_head.weight
        logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, weight.shape[0], self.logits_slice):
            end = start + self.logits_slice
            torch.mm(hidden, weight[start:end].t(), out=logits[:, start:end])
        return logits.float()

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    @staticmethod
    def residual_stream(layer_output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The hidden state after a decoder layer, from what it returns (its output and the residual before it)."""
        x, residual = layer_output
        return x + residual

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def shard_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            return [q, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]

    def _num_shards(self, param_name: str) -> int:
        module = param_name.split(".")[-2]
        return len(self.shard_sizes(module)) if module in ("qkv_proj", "gate_up_proj") else 1

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockWeight]],
                     device: torch.device | str = "cpu") -> None:
        """Set every parameter from HF-named checkpoint tensors (the model may be built on the meta device, as
        a placeholder of shapes): float tensors become parameters on `device` in the model's dtype; a matrix kept
        in its stored format (BlockWeight) replaces its linear or embedding layer. Fused projections gather their
        shards first."""
        placeholders = dict(self.named_parameters())
        shards: dict[str, dict[int, torch.Tensor | BlockWeight]] = {}
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = name, 0
            for part, (fused, index) in self.stacked_params.items():
                if f".{part}." in name:
                    target, shard = name.replace(f".{part}.", f".{fused}."), index
                    break
            if target not in placeholders:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            expected = tuple(placeholders[target].shape)
            if self._num_shards(target) > 1:
                expected = (self.shard_sizes(target.split(".")[-2])[shard], *expected[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            parts = shards.setdefault(target, {})
            parts[shard] = tensor
            if len(parts) == self._num_shards(target):
                self._set_weight(target, [parts[i] for i in range(len(parts))], placeholders[target].dtype, device)
        missing = sorted(name for name in placeholders if len(shards.get(name, ())) < self._num_shards(name))
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if self.config.tie_word_embeddings:
            embed = self.model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):
                self.lm_head = QuantizedLinear([embed.blocks])
            else:
                self.lm_head.weight = embed.weight

    def _set_weight(self, target: str, parts: list[torch.Tensor | BlockWeight], dtype: torch.dtype,
                    device: torch.device | str) -> None:
        module_name, _, param_name = target.rpartition(".")
        module = self.get_submodule(module_name)
        if param_name == "weight" and all(isinstance(p, BlockWeight) for p in parts):
            parent_name, _, child_name = module_name.rpartition(".")
            if isinstance(module, nn.Embedding):
                replacement = QuantizedEmbedding(parts[0])
            else:  # a bias loaded before stays; one loaded after lands on the replacement
                replacement = QuantizedLinear(parts, bias=module.bias)
            setattr(self.get_submodule(parent_name), child_name, replacement)
            return
        floats = [p.dequantize() if isinstance(p, BlockWeight) else p for p in parts]
        value = floats[0] if len(floats) == 1 else torch.cat(floats)
        setattr(module, param_name, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
