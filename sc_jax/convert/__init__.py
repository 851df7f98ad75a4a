"""Hugging Face (`StableLmForCausalLM`) <-> our parameters and orbax checkpoints, and either -> GGUF.

    layout      the name map: one Leaf per parameter of ours and the HF tensors it is made of
    from_hf     a HF directory, checked against its config, read one tensor at a time
    to_hf       our parameters written as a HF directory, one leaf at a time
    to_gguf     our parameters and tokenizer written as one GGUF file for llama.cpp, one leaf at a time
    streaming   hf_to_orbax / orbax_to_hf / hf_to_gguf / orbax_to_gguf, what `python -m sc_jax.convert` runs
"""

from sc_jax.convert.from_hf import check_architecture, check_tensors, hf_params_onto, hf_to_params, load_hf, open_hf, read_leaf
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.convert.streaming import hf_to_gguf, hf_to_orbax, orbax_to_gguf, orbax_to_hf
from sc_jax.convert.to_gguf import GGUF_TYPES, save_gguf
from sc_jax.convert.to_hf import copy_tokenizer, hf_specs, hf_tensors, params_to_hf, save_hf

__all__ = ["GGUF_TYPES", "Leaf", "check_architecture", "check_tensors", "copy_tokenizer", "hf_params_onto", "hf_specs", "hf_tensors",
           "hf_to_gguf", "hf_to_orbax", "hf_to_params", "leaves", "load_hf", "open_hf", "orbax_to_gguf", "orbax_to_hf",
           "params_to_hf", "read_leaf", "save_gguf", "save_hf"]
