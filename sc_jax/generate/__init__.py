"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, stop tokens
and stop strings, batches of prompts of different lengths, and fill-in-the-middle.

    from sc_jax.generate import load_generator
    gen = load_generator("runs/quickstart/hf")     # tokenizer=, dtype=, batch_size=32
    gen.complete(["def fib(n):"], max_new_tokens=128, stop=["\\ndef"])
    gen.infill(["def add(a, b):\\n    "], ["\\n"], max_new_tokens=32)

Modules: `generator` (`TokenGenerator`: token prompts batched, prefilled and decoded on the
device, with stop tokens), `sampling` (greedy, temperature, top-k, top-p), `text` (`Generator`:
text and FIM prompts cut to the context, stop strings) and `__main__` (the command line,
`python -m sc_jax.generate`). The forward passes are the model's own (`model.DecodeModel`).
"""

from __future__ import annotations

import importlib

from sc_jax.generate.stops import cut_at_stop
from sc_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

__all__ = ["Generator", "TokenGenerator", "GenerationStats", "load_generator", "cut_at_stop", "filter_logits",
           "greedy_pick", "sample", "INFILL_STOPS", "EOS", "FILE_SEP", "FIM_MIDDLE", "FIM_PREFIX", "FIM_SUFFIX",
           "MIN_NEW_BUCKET", "MIN_PROMPT_BUCKET", "PREFILL_SCORES_BYTES", "STOP_CHECK_EVERY", "compute_dtype", "PRECISIONS"]
# These import JAX (seconds): loaded on first use, so that `cut_at_stop` (the evaluation
# harness, scoring completions made elsewhere) starts at once.
_LAZY = {"MIN_NEW_BUCKET": "generator", "MIN_PROMPT_BUCKET": "generator", "PREFILL_SCORES_BYTES": "generator",
         "STOP_CHECK_EVERY": "generator", "GenerationStats": "generator", "TokenGenerator": "generator",
         "compute_dtype": "generator", "PRECISIONS": "generator", "filter_logits": "sampling", "greedy_pick": "sampling", "sample": "sampling",
         "INFILL_STOPS": "text", "Generator": "text"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sc_jax.generate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sc_jax.generate' has no attribute '{name}'")


def load_generator(path: str, tokenizer: str | None = None, dtype=None, *, batch_size: int = 32):
    """A Generator from a HF model directory, an orbax checkpoint (directory or step) or a
    training run directory. The tokenizer is `tokenizer` when given, else the one beside
    the checkpoint (the HF directory itself, CKPT/tokenizer/, RUN/tokenizer.json, ...).
    A HF checkpoint is read straight into the compute dtype (no fp32 copy of a bf16 run).
    dtype="int8": weight-only int8, quantized here from whatever the checkpoint holds
    (read in float32, quantized tensor by tensor; only the int8 kernels stay)."""
    from sc_jax.config import DTYPES
    from sc_jax.generate.generator import precision
    from sc_jax.generate.text import Generator
    from sc_jax.loading import check_checkpoint_path, load_params, tokenizer_for

    check_checkpoint_path(path)
    tok = tokenizer_for(path, tokenizer)
    compute, weights = precision(dtype)
    cfg, params = load_params(path, dtype=DTYPES["float32" if weights else compute])
    return Generator(cfg, params, tokenizer=tok, dtype=weights or compute, batch_size=batch_size)
