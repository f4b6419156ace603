"""The building blocks every decoder here is made of, over a flattened token batch: attention (fused qkv, optional
q/k norms, per-layer rope, window and soft-cap), a gated MLP, pre-norm and sandwich-norm decoder layers, and
`CausalLM`, which loads HF-named weights, computes logits and exposes what the engine reads of a model. Each
architecture's file (llama.py, qwen3.py, gemma.py, phi3.py) picks among them in a few lines."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from foreseer.layers.activation import GATED_ACTIVATIONS
from foreseer.layers.attention import PagedAttention
from foreseer.layers.norm import RMSNorm
from foreseer.layers.quantized_linear import BlockWeight, QuantizedEmbedding, QuantizedLinear
from foreseer.layers.rotary import RotaryEmbedding
from foreseer.lora.context import apply_lora
from foreseer.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.layer_index = layer_index  # names this layer's projections to the LoRA context
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        # Per-head RMSNorm of queries and keys before the rotary embedding (Qwen 3, Gemma 3).
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        # Sliding layers may have their own rope base, without the full layers' scaling (Gemma 3).
        local = cfg.is_sliding(layer_index) and cfg.rope_local_theta is not None
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings,
                                          cfg.rope_local_theta if local else cfg.rope_theta,
                                          None if local else cfg.rope_scaling, cfg.rope_freq_factors)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, cfg.attention_scale,
                                   cfg.window(layer_index), cfg.attn_logit_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = apply_lora(self.qkv_proj(x), x, self.layer_index, "qkv_proj")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v).flatten(1)
        return apply_lora(self.o_proj(out), out, self.layer_index, "o_proj")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up as one projection."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        if cfg.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"unsupported hidden activation {cfg.hidden_act!r}; "
                             f"supported: {sorted(GATED_ACTIVATIONS)}")
        self.layer_index = layer_index
        self.act_and_mul = GATED_ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_and_mul(apply_lora(self.gate_up_proj(x), x, self.layer_index, "gate_up_proj"))
        return apply_lora(self.down_proj(hidden), hidden, self.layer_index, "down_proj")


class DecoderLayer(nn.Module):
    """Pre-norm (Llama): x + attn(norm(x)), then + mlp(norm(.)). The residual add is fused into the next norm."""

    def __init__(self, cfg: ModelConfig, layer_index: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg, layer_index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): the next norm adds the two."""
        x, residual = self.normed_input(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(positions, x), residual)
        return self.mlp(x), residual

    def normed_input(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input norm of the residual stream, the stream): the last layer's output added in first, if any."""
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm(x, residual)


class SandwichDecoderLayer(DecoderLayer):
    """Sandwich norms (Gemma 2 and 3): each block's output is normed again before it joins the residual stream
    (post_attention_layernorm is the attention output's norm here, the MLP's input has its own)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, qk_norm: bool = False) -> None:
        super().__init__(cfg, layer_index, qk_norm)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.normed_input(x, residual)
        attended = self.post_attention_layernorm(self.self_attn(positions, x))
        x, residual = self.pre_feedforward_layernorm(attended, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: Callable[[ModelConfig, int], nn.Module],
                 embedding_scale: float | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embedding_scale = embedding_scale  # Gemma: the embeddings times sqrt(hidden_size)
        self.layers = nn.ModuleList(layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """A decoder and its lm_head. Subclasses name the HF architectures and GGUF architectures they load and build
    their decoder; the rest (weights, logits, what the engine reads) is shared."""

    architectures: tuple[str, ...] = ()  # HF config.json names
    default_activation = "silu"  # the MLP gate's, where a config names none
    gguf_architectures: dict[str, str] = {}  # GGUF general.architecture names -> the HF architecture each is
    gguf_interleaved_rope: frozenset[str] = frozenset()  # those whose Q and K rows llama.cpp's converter permuted
    logits_slice = 2048  # vocabulary entries per matmul in compute_logits
    # HF checkpoint projections that live inside one fused projection here: name -> (fused name, shard index).
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        self.model = model
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def finish_config(cls, cfg: ModelConfig) -> ModelConfig:
        """The architecture's defaults for what its configs leave out (after HF or GGUF parsing)."""
        cfg.hidden_act = cfg.hidden_act or cls.default_activation
        return cfg

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in vocabulary slices: each slice of the output stays in cache while it is written, which
        keeps a large-vocabulary matmul near full speed on a CPU. A head in its stored format has its own kernels."""
        if not isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(hidden).float()
        else:
            weight = self.lm_head.weight
            logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
            for start in range(0, weight.shape[0], self.logits_slice):
                end = start + self.logits_slice
                torch.mm(hidden, weight[start:end].t(), out=logits[:, start:end])
            logits = logits.float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

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

    def checkpoint_names(self) -> list[str]:
        """The HF names of the tensors a checkpoint holds for this model (fused projections as their shards)."""
        fused_to_parts: dict[str, list[str]] = {}
        for part, (fused, _) in sorted(self.stacked_params.items(), key=lambda item: item[1][1]):
            fused_to_parts.setdefault(fused, []).append(part)
        names = []
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module, _, suffix = name.rpartition(".")
            parent, dot, leaf = module.rpartition(".")
            names.extend(f"{parent}{dot}{part}.{suffix}" for part in fused_to_parts.get(leaf, [leaf]))
        return names

    def transform_weight(self, name: str, tensor: torch.Tensor, from_gguf: bool) -> torch.Tensor:
        """A checkpoint tensor as this model computes with it (Gemma: its norms' weights plus one)."""
        return tensor

    def _num_shards(self, param_name: str) -> int:
        module = param_name.split(".")[-2]
        fused = {f for f, _ in self.stacked_params.values()}
        return len(self.shard_sizes(module)) if module in fused else 1

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockWeight]],
                     device: torch.device | str = "cpu", from_gguf: bool = False) -> None:
        """Set every parameter from HF-named checkpoint tensors (the model may be built on the meta device, as
        a placeholder of shapes): float tensors become parameters on `device` in the model's dtype; a matrix kept
        in its stored format (BlockWeight) replaces its linear or embedding layer. Fused projections gather their
        shards first; a checkpoint that stores them fused (Phi-3) gives them whole."""
        placeholders = dict(self.named_parameters())
        shards: dict[str, dict[int, torch.Tensor | BlockWeight]] = {}
        architecture = self.config.architecture
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard, whole = name, 0, True
            for part, (fused, index) in self.stacked_params.items():
                if f".{part}." in name:
                    target, shard, whole = name.replace(f".{part}.", f".{fused}."), index, False
                    break
            if target not in placeholders:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {architecture}")
            if not isinstance(tensor, BlockWeight):
                tensor = self.transform_weight(name, tensor, from_gguf)
            expected = tuple(placeholders[target].shape)
            if not whole:
                expected = (self.shard_sizes(target.split(".")[-2])[shard], *expected[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            parts = shards.setdefault(target, {})
            if whole and self._num_shards(target) > 1:  # stored fused: every shard at once
                parts.update(dict.fromkeys(range(self._num_shards(target))))
                self._set_weight(target, [tensor], placeholders[target].dtype, device)
                continue
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
