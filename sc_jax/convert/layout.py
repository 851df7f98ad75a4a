"""The name map between our parameters and Hugging Face's `StableLmForCausalLM` tensors:
one `Leaf` per parameter of ours, with the HF tensors it is made of and the reshapes.

HF `nn.Linear` weights are [out, in]; ours keep heads as their own axis (q_proj [E,H,D],
o_proj [H,D,E]) so that tensor parallelism can shard heads, and the layers are stacked on
a leading axis for `scan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sc_jax.config import ModelConfig
from sc_jax.hf_io import TensorSpec


@dataclass(frozen=True)
class Leaf:
    """One of our parameters and the HF tensors it is made of.

    A per-layer leaf is stacked over layers on axis 0, from one HF tensor per layer
    (`hf_name` holds `{i}`), or from one per head when `heads` > 0 (`{h}`: qk norms)."""

    path: str  # dotted path in our parameter tree
    shape: tuple[int, ...]  # our shape, [layers, ...] when per layer
    hf_name: str
    hf_shape: tuple[int, ...]  # one HF tensor
    from_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    per_layer: bool = False
    heads: int = 0
    keys: str = "hidden_size"  # the config.json keys that set its shape (for error messages)

    def hf_names(self, layer: int | None) -> list[str]:
        if self.heads:
            return [self.hf_name.format(i=layer, h=h) for h in range(self.heads)]
        return [self.hf_name.format(i=layer)]

    def hf_specs(self, num_layers: int, dtype) -> list[TensorSpec]:
        layers = range(num_layers) if self.per_layer else [None]
        return [TensorSpec(name, self.hf_shape, np.dtype(dtype)) for i in layers for name in self.hf_names(i)]


def _layer_leaves(cfg: ModelConfig) -> list[Leaf]:
    E, H, K, D, I, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.num_hidden_layers)
    T = dict(from_hf=lambda a: a.T, to_hf=lambda a: a.T)

    def proj(heads):  # ours [E, heads, D] <-> HF [heads*D, E]
        return dict(from_hf=lambda a: a.T.reshape(E, heads, D), to_hf=lambda a: a.reshape(E, heads * D).T)

    def bias(heads):  # ours [heads, D] <-> HF [heads*D]
        return dict(from_hf=lambda a: a.reshape(heads, D), to_hf=lambda a: a.reshape(heads * D))

    def leaf(ours, theirs, shape, hf_shape, keys, **kw):
        return Leaf(f"model.layers.{ours}", (L, *shape), f"model.layers.{{i}}.{theirs}", hf_shape, per_layer=True,
                    keys=f"{keys}, num_hidden_layers", **kw)

    heads_keys = "hidden_size, num_attention_heads"
    kv_keys = "hidden_size, num_attention_heads, num_key_value_heads"
    leaves = [
        leaf("input_layernorm.weight", "input_layernorm.weight", (E,), (E,), "hidden_size"),
        leaf("input_layernorm.bias", "input_layernorm.bias", (E,), (E,), "hidden_size"),
        leaf("self_attn.q_proj", "self_attn.q_proj.weight", (E, H, D), (H * D, E), heads_keys, **proj(H)),
        leaf("self_attn.k_proj", "self_attn.k_proj.weight", (E, K, D), (K * D, E), kv_keys, **proj(K)),
        leaf("self_attn.v_proj", "self_attn.v_proj.weight", (E, K, D), (K * D, E), kv_keys, **proj(K)),
        leaf("self_attn.o_proj", "self_attn.o_proj.weight", (H, D, E), (E, H * D), heads_keys,
             from_hf=lambda a: a.T.reshape(H, D, E), to_hf=lambda a: a.reshape(H * D, E).T),
        leaf("mlp.gate_proj", "mlp.gate_proj.weight", (E, I), (I, E), "hidden_size, intermediate_size", **T),
        leaf("mlp.up_proj", "mlp.up_proj.weight", (E, I), (I, E), "hidden_size, intermediate_size", **T),
        leaf("mlp.down_proj", "mlp.down_proj.weight", (I, E), (E, I), "hidden_size, intermediate_size", **T),
    ]
    if not cfg.use_parallel_residual:
        leaves += [leaf("post_attention_layernorm.weight", "post_attention_layernorm.weight", (E,), (E,), "hidden_size"),
                   leaf("post_attention_layernorm.bias", "post_attention_layernorm.bias", (E,), (E,), "hidden_size")]
    if cfg.use_qkv_bias:
        leaves += [leaf("self_attn.q_bias", "self_attn.q_proj.bias", (H, D), (H * D,), heads_keys, **bias(H)),
                   leaf("self_attn.k_bias", "self_attn.k_proj.bias", (K, D), (K * D,), kv_keys, **bias(K)),
                   leaf("self_attn.v_bias", "self_attn.v_proj.bias", (K, D), (K * D,), kv_keys, **bias(K))]
    if cfg.qk_layernorm:  # ours [heads, D] per layer <-> HF one [D] weight per head
        leaves += [leaf("self_attn.q_layernorm.weight", "self_attn.q_layernorm.norms.{h}.weight", (H, D), (D,),
                        heads_keys, heads=H),
                   leaf("self_attn.k_layernorm.weight", "self_attn.k_layernorm.norms.{h}.weight", (K, D), (D,),
                        kv_keys, heads=K)]
    return leaves


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every parameter of the model `cfg` describes, in a fixed order."""
    V, E = cfg.vocab_size, cfg.hidden_size
    out = [Leaf("model.embed_tokens.embedding", (V, E), "model.embed_tokens.weight", (V, E),
                keys="vocab_size, hidden_size"),
           *_layer_leaves(cfg),
           Leaf("model.norm.weight", (E,), "model.norm.weight", (E,)),
           Leaf("model.norm.bias", (E,), "model.norm.bias", (E,))]
    if not cfg.tie_word_embeddings:
        out.append(Leaf("lm_head", (E, V), "lm_head.weight", (V, E), from_hf=lambda a: a.T, to_hf=lambda a: a.T,
                        keys="vocab_size, hidden_size"))
    return out
