"""Token prompts in, new tokens out: batching, the jitted prefill and decode loop, sampling and
stops. The math is the model's (`model.DecodeModel`); text lives in `text.py`.

The prompts are left-padded (segment id 0: never attended to) to a power-of-two length and
batch, and one jitted prefill fills the KV cache and returns the logits of each prompt's last
token; then one jitted `lax.while_loop` samples and decodes on the device (the cache donated,
no host round trip per token) and exits early once every row has produced a stop token.
Positions count from 0 at each prompt's first real token, so rotary angles are those of the
unpadded prompt. A host-side `stop_check` (stop strings) runs between chunks of decode steps.
Sampling keys derive from (seed, the prompt's index in the call), so a prompt's sample does not
depend on how the call is batched. Compiled code is cached per (config, batch bucket, prompt
bucket, new-token bucket, sampling mode).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sc_jax import cpu_attention, int8_kernel
from sc_jax import model as M
from sc_jax.attention import ATTENTION_CHUNK
from sc_jax.config import DTYPES, ConfigError, ModelConfig
from sc_jax.generate.sampling import sample

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
STOP_CHECK_EVERY = 32  # decode steps between host-side stop-string checks
PREFILL_SCORES_BYTES = 2 << 30  # most bytes of attention scores one prefill block may hold

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def _bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------- jitted kernels


def _prefill(graphdef, weights, ids, positions, segs, real, *, cache_len: int, new_len: int, pad_id: int):
    """Runs the left-padded prompts and builds the decode carry: the cache (cache_len
    slots) and the logits for each row's first new token. No sampling here, so one
    compile serves every sampling mode.

    ids/positions/segs [B,P]; real [B] bool (False for batch-padding rows)."""
    B = ids.shape[0]
    logits, cache = nnx.merge(graphdef, weights).prefill(ids, positions, segs, cache_len)
    return {
        "cache": cache,
        "logits": logits,  # [B,V]: the next token's
        "pos": positions[:, -1] + 1,  # where the next token goes
        "done": ~real,
        "out": jnp.full((B, new_len), pad_id, jnp.int32),
        "length": jnp.zeros((B,), jnp.int32),
        "step": jnp.asarray(0, jnp.int32),
    }


def _decode(graphdef, n_ctx: int, weights, carry, limit, keys, stop_ids, temperature, top_k, top_p, *,
            greedy: bool, filtered: bool, pad_id: int):
    """Samples a token, records it and runs it through the model, until `limit` tokens
    exist or every row is done (one forward past the last token: its logits are unused)."""

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        step, done = c["step"], c["done"]
        tok = sample(c["logits"], keys, step, temperature, top_k, top_p, greedy=greedy, filtered=filtered)
        tok = jnp.where(done, pad_id, tok)
        new = dict(c, step=step + 1, pos=c["pos"] + 1,
                   out=jax.lax.dynamic_update_slice(c["out"], tok[:, None], (0, step)),
                   length=c["length"] + (~done).astype(jnp.int32),
                   # A row also ends with the token at the last position the model knows.
                   done=done | jnp.isin(tok, stop_ids) | (c["pos"] >= n_ctx - 1))
        if "all_logits" in c:
            new["all_logits"] = jax.lax.dynamic_update_slice(c["all_logits"], c["logits"][:, None], (0, step, 0))
        new["logits"], new["cache"] = nnx.merge(graphdef, weights).decode_step(tok, c["pos"], c["cache"])
        return new

    return jax.lax.while_loop(cond, body, carry)


_KERNELS: dict[str, tuple] = {}


def _kernels(cfg: ModelConfig, weights: str | None = None):
    """(jitted prefill, jitted decode) for a config and weight format, shared by every
    generator of them so that reloading a model reuses the compiled code. Whether int8
    products take `int8_kernel`, and whether attention may take `cpu_attention`, are part of
    the key, and hold whenever the two trace."""
    use_kernel = weights == "int8" and int8_kernel.enabled()
    use_attention = cpu_attention.LIBRARY.enabled
    key = repr((dataclasses.astuple(cfg), weights, use_kernel, use_attention))
    if key not in _KERNELS:
        graphdef = nnx.graphdef(M.abstract_decode_model(cfg, weights))

        def keyed(fn):  # fn traces with the kernels switched as the key says, whenever it traces
            @functools.wraps(fn)
            def traced(*args, **kwargs):
                with int8_kernel.switched(use_kernel), cpu_attention.switched(use_attention):
                    return fn(*args, **kwargs)
            return traced

        prefill = jax.jit(keyed(functools.partial(_prefill, graphdef)),
                          static_argnames=("cache_len", "new_len", "pad_id"))
        decode = jax.jit(keyed(functools.partial(_decode, graphdef, cfg.max_position_embeddings)),
                         static_argnames=("greedy", "filtered", "pad_id"), donate_argnames=("carry",))
        _KERNELS[key] = (prefill, decode)
    return _KERNELS[key]


# ----------------------------------------------------------------------------- host side


WEIGHT_FORMATS = ("int8",)  # weight-only quantized precisions: kernels int8, compute in the default dtype
PRECISIONS = (*sorted(DTYPES), *WEIGHT_FORMATS)


def precision(dtype) -> tuple[str, str | None]:
    """(compute dtype, weight format) of a precision name: a float dtype computes and
    stores in itself (format None); "int8" stores the kernels int8 with per-output-channel
    scales and computes in the default dtype (`compute_dtype(None)`), activations and KV
    cache included."""
    if isinstance(dtype, str) and dtype in WEIGHT_FORMATS:
        return compute_dtype(None), dtype
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(PRECISIONS)}, got '{dtype}'")
    return compute_dtype(dtype), None


def compute_dtype(dtype) -> str:
    """The compute dtype's name: `dtype` (a name or a dtype), or float32 on CPU and
    bfloat16 on accelerators."""
    if dtype is None:
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    return name


def _check_sampling(max_new_tokens, temperature, top_p, top_k) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")


def _check_prompts(prompts: list[list[int]], vocab_size: int, n_ctx: int) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ConfigError(f"prompt {i} has token ids outside [0, {vocab_size})")
        if len(p) >= n_ctx:
            raise ConfigError(f"prompt {i} has {len(p)} tokens but the model's context is {n_ctx} "
                              "(max_position_embeddings): shorten it")


def _left_pad(prompts: list[list[int]], B: int, P: int, pad_id: int):
    """The prompts as [B,P] int32 ids, positions and segment ids, left-padded so that the
    last column holds every prompt's last token, and real [B] bool. Rows past the prompts
    (batch padding) hold one dummy token and are done from the start."""
    ids = np.full((B, P), pad_id, np.int32)
    pos = np.zeros((B, P), np.int32)
    seg = np.zeros((B, P), np.int32)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = p
        pos[r, P - len(p):] = np.arange(len(p))
        seg[r, P - len(p):] = 1
    seg[len(prompts):, -1] = 1
    real = np.arange(B) < len(prompts)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(real)


def _row_keys(seed: int, rows: Sequence[int], B: int):
    """[B,2] PRNG keys, one per row from (seed, the prompt's index in the call)."""
    base = jax.random.PRNGKey(seed)
    row_ids = np.asarray(list(rows) + [0] * (B - len(rows)), np.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids))


@dataclasses.dataclass
class GenerationStats:
    """What the last call did (for benchmarks and tests)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    batches: int = 0
    seconds: float = 0.0


class TokenGenerator:
    """A model's weights on the device, generating after token prompts.

    `batch_size` caps how many prompts run together (more are split into batches, grouped
    by length; long prompts run in smaller batches, see `_rows_per_batch`).
    """

    def __init__(self, cfg: ModelConfig, params: dict, dtype=None, batch_size: int = 32):
        dtype, self.weight_format = precision(dtype)
        # Inference: weights stored in the compute dtype (the kernels int8 for "int8").
        self.cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype).validate()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._prefill, self._decode = _kernels(self.cfg, self.weight_format)
        self.weights = M.decode_state(self.cfg, params, self.weight_format)
        self.stats = GenerationStats()

    @property
    def eos_id(self) -> int | None:
        """The id that ends a row by default."""
        return self.cfg.eos_token_id

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights held on the device (int8 values and their scales for "int8")."""
        return sum(a.nbytes for a in jax.tree.leaves(self.weights))

    def model(self) -> M.DecodeModel:
        """The DecodeModel these weights make (scoring whole sequences: `DecodeModel.score`)."""
        return nnx.merge(nnx.graphdef(M.abstract_decode_model(self.cfg, self.weight_format)), self.weights)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, stop_tokens: Sequence[int] | None = None, seed: int = 0,
                     stop_check: Callable[[int, list[int]], bool] | None = None, return_logits: bool = False):
        """Generates after each prompt; returns the new ids per prompt, ending with the stop
        token when one was produced (as `transformers` does), at most max_new_tokens, and
        never past the model's context (max_position_embeddings tokens, prompt included).

        stop_tokens: ids that end a row (default: the EOS id; () for none).
        stop_check(i, new_ids) -> bool: a host-side test run every few steps (stop strings).
        return_logits: also return each row's per-step logits [n_new, V] (tests).
        """
        _check_sampling(max_new_tokens, temperature, top_p, top_k)
        prompts = [list(map(int, p)) for p in prompt_ids]
        _check_prompts(prompts, self.cfg.vocab_size, self.cfg.max_position_embeddings)
        if stop_tokens is None:
            stop_tokens = () if self.eos_id is None else (self.eos_id,)
        t0 = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        results: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
        b = 0
        while b < len(order):
            idx = order[b:b + self._rows_per_batch(len(prompts[order[b]]))]  # order[b]: the longest left
            b += len(idx)
            outs = self._generate_batch([prompts[i] for i in idx], idx, max_new_tokens, float(temperature),
                                        float(top_p), int(top_k), list(stop_tokens), int(seed), stop_check,
                                        return_logits)
            for i, o in zip(idx, outs):
                results[i] = o
        self.stats.seconds = time.perf_counter() - t0
        if return_logits:
            return [r[0] for r in results], [r[1] for r in results]
        return results

    def _rows_per_batch(self, longest: int) -> int:
        """batch_size, or fewer rows for long prompts: a power of two that keeps one
        prefill query block's fp32 scores [rows, H, min(P, 1024), P] under
        PREFILL_SCORES_BYTES (at 16k tokens on stable-code-3b one row's block is 2 GiB)."""
        P = _bucket(longest, MIN_PROMPT_BUCKET)
        per_row = self.cfg.num_attention_heads * min(P, ATTENTION_CHUNK) * P * 4
        rows = max(1, PREFILL_SCORES_BYTES // per_row)
        return max(1, min(self.batch_size, 1 << (rows.bit_length() - 1)))

    def _generate_batch(self, prompts, rows, max_new, temperature, top_p, top_k, stop_tokens, seed, stop_check,
                        return_logits):
        """One batch: prompts (id lists) that are prompts `rows` of the call -> each one's new
        ids (with its logits [n_new, V] when return_logits)."""
        n = len(prompts)
        # No row goes past the context, so the shortest prompt bounds the steps: asking for
        # more must not grow the output buffer and the cache past it.
        max_new = min(max_new, self.cfg.max_position_embeddings - min(map(len, prompts)))
        B, P, N = _bucket(n), _bucket(max(map(len, prompts)), MIN_PROMPT_BUCKET), _bucket(max_new, MIN_NEW_BUCKET)
        pad_id = int(stop_tokens[0]) if stop_tokens else 0
        carry = self._prefill(self.weights, *_left_pad(prompts, B, P, pad_id), cache_len=P + N, new_len=N,
                              pad_id=pad_id)
        if return_logits:  # every step's logits too (tests; [B,N,V] fp32)
            carry["all_logits"] = jnp.zeros((B, N, self.cfg.vocab_size), jnp.float32)
        greedy = temperature == 0.0
        filtered = not greedy and (top_k > 0 or top_p < 1.0)
        traced = (_row_keys(seed, rows, B), jnp.asarray(np.asarray(stop_tokens if stop_tokens else [-1], np.int32)),
                  jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
        static = dict(greedy=greedy, filtered=filtered, pad_id=pad_id)
        carry, steps = self._decode_until_done(carry, max_new, traced, static, rows, stop_check)
        out, length = np.asarray(carry["out"]), np.asarray(carry["length"])
        self.stats.decode_steps += steps
        self.stats.batches += 1
        self.stats.new_tokens += int(length[:n].sum())
        if not return_logits:
            return [out[r, :length[r]].tolist() for r in range(n)]
        logits = np.asarray(carry["all_logits"])
        return [(out[r, :length[r]].tolist(), logits[r, :length[r]]) for r in range(n)]

    def _decode_until_done(self, carry, max_new: int, traced: tuple, static: dict, rows, stop_check):
        """Runs the decode loop until max_new steps or every row is done; with a stop_check,
        in chunks of STOP_CHECK_EVERY steps with the check between them. -> (carry, steps)."""
        step = 0
        while step < max_new:
            limit = max_new if stop_check is None else min(step + STOP_CHECK_EVERY, max_new)
            carry = self._decode(self.weights, carry, jnp.int32(limit), *traced, **static)
            step = int(carry["step"])
            done = np.array(carry["done"])
            if stop_check is not None and not done.all():
                out, length = np.asarray(carry["out"]), np.asarray(carry["length"])
                hit = [r for r in range(len(rows)) if not done[r] and stop_check(rows[r], out[r, :length[r]].tolist())]
                if hit:
                    done[hit] = True
                    carry["done"] = jnp.asarray(done)
            if done.all():
                break
        return carry, step
