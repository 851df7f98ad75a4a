"""The attention core: q, k, v -> output, by one of several paths of the same math.

`attend` picks the path from `model.attention` (config.ATTENTION_PATHS):

- `reference`: the dense math, softmax in fp32; holds the [B,H,T,S] scores.
- `chunked`: the reference one 1024-query block at a time, each block rematerialised
  (one [B,H,1024,S] score block live); any backend.
- `cudnn`: cuDNN fused flash attention (NVIDIA GPU, bf16/fp16). A batch whose rows each
  hold at most one segment takes the public unpacked call (right padding as lengths);
  other batches the packed-rows call, segments as offsets, `model.max_segments` per row.
- `splash`: the Pallas TPU splash-attention kernel with segment ids (interpret mode, i.e.
  the same kernel emulated by XLA, off TPU: the CPU tests run it).
- `cpu`: sc_jax's C++ kernel for XLA's CPU backend, fp32, with segment ids
  (`sc_jax.cpu_attention`, built on first use).
- `auto`: `attention_path` - cudnn on NVIDIA GPUs where `cudnn_unsupported` finds
  nothing against it (else chunked), splash on TPU where the length fits its blocks (else
  chunked); on the CPU the `cpu` kernel where `cpu_attention.unsupported` finds nothing
  against it (fp32 self-attention, the kernel built, the sequence not sharded), else
  chunked with `CPU_AUTO_CHUNK`-query blocks (bench/attention.py measured both).

The fused paths (cudnn, splash, cpu) read who-attends-to-whom from `segment_ids` alone: they
assume the self-attention causal mask of `AttentionMask.causal(segment_ids)`, which is
what the model passes; they zero the output at padding and cut padding off from the
gradients. `cached_attention` is one new token against the decode cache.
Shapes: B batch, T query length, S key length, H heads, K kv heads (K divides H), D head_dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sc_jax import cpu_attention
from sc_jax.config import ConfigError, ModelConfig

NEG_INF = -1e30  # finite, so a fully masked (padding) row stays finite instead of NaN
ATTENTION_CHUNK = 1024  # queries per block in chunked_attention
# `auto` on the CPU: chunked, CPU_AUTO_CHUNK queries a block. bench/attention.py at seq 512,
# B=8, H=12, D=64, fp32, packed rows, forward+backward, best of 7 rounds (2-core CPU), wall ms
# and process CPU time against the reference: reference 1724 ms, chunked at 1024 queries (= the
# reference below 1024) 1790 ms / 0.97x, jax.nn.dot_product_attention "xla" 1304 ms / 0.87x,
# chunked at 64/128/256 queries 1080/904/908 ms, 0.95x/0.70x/0.75x. The [B,H,128,S] score
# block stays in cache where [B,H,T,S] streams through memory, which pays for the block's
# recomputation in the backward pass; 128 over 256 for its CPU time and smaller temporaries
# (129 vs 210 MiB). Explicit `chunked` keeps ATTENTION_CHUNK on every backend: the planner
# compiles it on the CPU for the memory of accelerators.
CPU_AUTO_CHUNK = 128
SPLASH_BLOCKS = (512, 256, 128)  # splash query/key block sizes tried, largest first
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention computes in


def attend(cfg: ModelConfig, q, k, v, mask: "AttentionMask", segment_ids=None):
    """q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D] by the configured path. `mask` serves the
    reference/chunked paths; cudnn/splash use `segment_ids` [B,T] (None: one whole
    segment per row, no padding) under the causal self-attention mask."""
    path = attention_path(cfg, q.shape[1], k.shape[1], q.dtype, packed=segment_ids is not None)
    if path == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, cfg.max_segments)
    if path == "splash":
        return splash_attention(q, k, v, segment_ids, interpret=jax.default_backend() != "tpu")
    if path == "cpu":
        return cpu_kernel_attention(q, k, v, segment_ids)
    if path == "chunked":
        cpu_auto = cfg.attention == "auto" and jax.default_backend() == "cpu"
        return chunked_attention(q, k, v, mask, CPU_AUTO_CHUNK if cpu_auto else ATTENTION_CHUNK)
    return reference_attention(q, k, v, mask)


def attention_path(cfg: ModelConfig, seq_len: int, kv_len: int | None = None, dtype=None,
                   packed: bool = True) -> str:
    """The path `attend` takes for `cfg.attention` at this length and compute dtype (default
    cfg.dtype): auto resolved, an explicit fused path checked here (ConfigError naming the
    fix) rather than failing inside the kernel."""
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    kv_len = seq_len if kv_len is None else kv_len
    choice, backend = cfg.attention, jax.default_backend()
    if choice == "cudnn":
        why = cudnn_unsupported(dtype, cfg.head_dim, packed)
        if why:
            raise ConfigError(f"model.attention=cudnn cannot run here: {why}; use model.attention=chunked "
                              "(or auto, which picks cuDNN wherever it can run)")
        return "cudnn"
    if choice == "splash":
        if backend == "gpu":
            raise ConfigError("model.attention=splash is the TPU kernel (on a GPU it would run emulated, "
                              "very slowly): use model.attention=cudnn, chunked or auto")
        splash_block(seq_len), splash_block(kv_len)  # ConfigError naming the fix if they don't fit
        return "splash"
    if choice == "cpu":
        why = cpu_attention.unsupported(dtype, seq_len, kv_len)
        if why:
            raise ConfigError(f"model.attention=cpu cannot run here: {why}; use model.attention=chunked "
                              "(or auto, which picks the CPU kernel wherever it can run)")
        return "cpu"
    if choice != "auto":
        return choice
    if backend == "tpu":
        try:
            splash_block(seq_len), splash_block(kv_len)
        except ConfigError:  # a length splash's blocks don't divide: the exact XLA path instead
            return "chunked"
        return "chunked" if _sequence_sharded(seq_len) else "splash"
    if use_cudnn(cfg, dtype, packed):
        return "cudnn"
    if backend == "cpu" and not _sequence_sharded(seq_len) and cpu_attention.unsupported(dtype, seq_len, kv_len) is None:
        return "cpu"
    return "chunked"  # GPUs without cuDNN's fused attention; the CPU without its kernel (CPU_AUTO_CHUNK blocks)


class AttentionMask(NamedTuple):
    """Who attends to whom, without materialising [T,S]: causal by buffer slot, same
    segment, never a padding (segment 0) key."""

    q_seg: jax.Array  # [B,T]
    kv_seg: jax.Array  # [B,S]
    q_slot: jax.Array  # [T]
    kv_slot: jax.Array  # [S]

    @classmethod
    def causal(cls, segment_ids) -> "AttentionMask":
        """Whole sequences attending to themselves: segment_ids [B,T] int32 (0 = padding)."""
        slot = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
        return cls(segment_ids, segment_ids, slot, slot)

    def dense(self):  # [B,T,S] bool
        return ((self.kv_slot[None, None, :] <= self.q_slot[None, :, None])
                & (self.q_seg[:, :, None] == self.kv_seg[:, None, :]) & (self.kv_seg[:, None, :] != 0))


def reference_attention(q, k, v, mask: AttentionMask):
    """q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D]. Softmax in fp32, GQA by grouping."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(D).astype(jnp.float32)
    logits = jnp.where(mask.dense()[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


def xla_attention(q, k, v, mask: AttentionMask):
    """jax.nn.dot_product_attention(implementation="xla") with the dense mask [B,1,T,S]: the
    same math as the reference (its padding rows also fully masked, hence uniform); kept
    as a candidate for `auto` on the CPU, where bench/attention.py measured it slower than
    chunked in 128-query blocks."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], implementation="xla")


def cached_attention(q, k_cache, v_cache, valid):
    """One new token per row over the valid slots of the heads-major cache (its own
    included). q [B,H,D]; k/v_cache [B*K,S,D]; valid [B*K,S] bool -> [B,H,D] fp32.
    Softmax in fp32, GQA by grouping: each cache row serves H/K query heads."""
    B, H, D = q.shape
    K = k_cache.shape[0] // B
    q = q.reshape(B * K, H // K, D)
    scores = jnp.einsum("ngd,nsd->ngs", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None, :], scores * (1.0 / np.sqrt(D)), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("ngs,nsd->ngd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, H, D)


def chunked_attention(q, k, v, mask: AttentionMask, chunk: int = ATTENTION_CHUNK):
    """The reference math one query block at a time, each block rematerialised in the
    backward pass: peak memory holds one [B,H,chunk,S] score block instead of [B,H,T,S].
    Runs on every backend (TPU, and CPU for memory planning)."""
    B, T, H, D = q.shape
    if T <= chunk or T % chunk:
        return reference_attention(q, k, v, mask)
    n = T // chunk
    q_blocks = q.reshape(B, n, chunk, H, D).swapaxes(0, 1)  # [n,B,c,H,D]
    seg_blocks = mask.q_seg.reshape(B, n, chunk).swapaxes(0, 1)
    slot_blocks = mask.q_slot.reshape(n, chunk)

    @jax.checkpoint
    def block(_, xs):
        qb, segb, slotb = xs
        return None, reference_attention(qb, k, v, AttentionMask(segb, mask.kv_seg, slotb, mask.kv_slot))

    _, out = jax.lax.scan(block, None, (q_blocks, seg_blocks, slot_blocks))
    return out.swapaxes(0, 1).reshape(B, T, H, D)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def use_cudnn(cfg: ModelConfig, dtype=None, packed: bool = True) -> bool:
    """Whether `attend` runs cuDNN's fused attention for this config: `cudnn`, or `auto`
    where `cudnn_unsupported` finds nothing against it (an NVIDIA GPU of compute capability
    9.0+ with cuDNN, bf16/fp16, a head_dim cuDNN takes). train/data.py asks this to refuse a
    row packing more than model.max_segments documents, which the packed call would get wrong.

    What the fused call costs in memory is its softmax statistics, fp32, kept for the
    backward pass: [B,H,T] for one-segment rows, [B*max_segments,H,T] for packed rows (one
    [H,T] slab per possible segment, used or not), i.e. max_segments*H*4 bytes per token per
    layer. At the old max_segments=256 that was 32 KiB per token per layer for stable-code-3b
    (H=32; 1 MiB per token over 32 layers where they are all kept), the extra memory the first
    H100 runs measured, for which `auto` avoided cuDNN. At today's default of 32 it is 4 KiB,
    less than the layer's bf16 attention output [B,T,H,D] (5 KiB) that every path keeps."""
    if cfg.attention == "cudnn":
        return True
    return cfg.attention == "auto" and cudnn_unsupported(cfg.dtype if dtype is None else dtype, cfg.head_dim, packed) is None


def cudnn_unsupported(dtype, head_dim: int, packed: bool = True) -> str | None:
    """Why cuDNN's fused attention cannot run in this process (None: it can). Asks jax's own
    checks in fused_attention_stablehlo, so what they accept is what runs (and a test that
    patches them to lower for "cuda" on a CPU gets the cuDNN path)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    try:
        fa.check_cudnn_version()
    except Exception:  # noqa: BLE001 - a CPU/TPU jaxlib ("cuDNN is not detected"), or no usable cuDNN
        return "no NVIDIA GPU with cuDNN in this process"
    if not fa.check_compute_capability("8.0"):
        return "the default device is not an NVIDIA GPU of compute capability 8.0 or newer"
    hopper = fa.check_compute_capability("9.0")
    if packed and not hopper:
        return ("packed rows (segment ids) need cuDNN's packed layout, which needs compute capability 9.0+ "
                "(Hopper)")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in FUSED_DTYPES]:
        return f"the compute dtype is {jnp.dtype(dtype).name}; cuDNN needs model.dtype=bfloat16 (or float16)"
    limit = 256 if hopper else 128
    if head_dim % 8 or head_dim > limit:
        return f"head_dim {head_dim} is not a multiple of 8 up to {limit}"
    return None


def cudnn_attention(q, k, v, segment_ids=None, max_segments: int = 32):
    """Fused cuDNN flash attention, causal (GPU, bf16/fp16). q [B,T,H,D], k/v [B,S,K,D]
    (GQA: cuDNN takes K kv heads as they are), segment_ids [B,T] (1-based contiguous
    segments, 0 = padding at the row's end; None = one whole segment per row) -> [B,T,H,D],
    zero at padding, whose gradients are zero too.

    Which cuDNN call, per batch at run time: a `lax.cond` on "every row holds at most one
    segment" picks the public unpacked call (stats [B,H,T]; right padding given as lengths)
    or the packed one (segments as offsets, `max_segments` per row; stats [B*M,H,T]). Both
    branches are compiled into the step; only the taken one runs. Why a cond and not one
    packed call always: a one-segment batch then runs the plain kernel. Why not a static
    choice: the batch is data, and compiling two train steps picked by the host is the
    train loop's business (train/data.py already looks at each batch's segment count).
    The cost of the cond: the backward pass keeps the residuals of both branches where
    their shapes differ (jax merges branch residuals by shape), so the packed branch's
    [B*M,H,T] statistics are allocated in every batch, as if always packed. Where one
    segment per row is known when tracing - no segment ids, or max_segments=1 (the train
    loop then refuses a row of two documents) - only the unpacked call is built, no cond.

    Rows must hold at most `max_segments` segments: more would be silently wrong (the
    train loop refuses such a batch: train/data.py, `use_cudnn`)."""
    B, T, H, D = q.shape
    scale = 1.0 / float(D) ** 0.5
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_dpa

    segment_ids = segment_ids.astype(jnp.int32)
    # Padding is in no segment, so cuDNN leaves its outputs and gradients undefined: zero
    # q/k/v there (their gradients become exactly zero) and the output after the call.
    real = segment_ids[..., None, None] > 0  # [B,T,1,1]
    q, k, v = (jnp.where(real, x, 0) for x in (q, k, v))

    def one_segment(q, k, v):
        lengths = (segment_ids > 0).sum(-1, dtype=jnp.int32)  # [B]: the segment is [0, length)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn",
                                            query_seq_lengths=lengths, key_value_seq_lengths=lengths)

    def packed(q, k, v):
        seq_lens, offsets = segment_offsets(segment_ids, min(max_segments, T))  # [B,M], [B,M+1]
        return cudnn_dpa(q, k, v, None, None, seq_lens, seq_lens, offsets, offsets,
                         scale=scale, mask_type=MaskType.PADDING_CAUSAL)

    if max_segments == 1:  # one document per row promised (and enforced by the train loop): no cond
        return jnp.where(real, one_segment(q, k, v), 0)
    out = jax.lax.cond(jnp.max(segment_ids) <= 1, one_segment, packed, q, k, v)
    return jnp.where(real, out, 0)


def segment_offsets(segment_ids, max_segments: int):
    """segment_ids [B,T] (1-based, contiguous, 0 = padding) -> (lengths [B,M], starts [B,M+1])
    as cuDNN's packed-sequence API wants: a row's used segments first, unused entries -1."""
    B, T = segment_ids.shape
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    lengths = (segment_ids[:, None, :] == ids[None, :, None]).sum(-1).astype(jnp.int32)  # [B,M]
    starts = jnp.cumsum(lengths, -1) - lengths  # segments are contiguous and in order
    starts = jnp.where(lengths > 0, starts, -1)
    return jnp.where(lengths > 0, lengths, -1), jnp.pad(starts, ((0, 0), (0, 1)), constant_values=-1)


# ----------------------------------------------------------------------------- the CPU kernel


def cpu_kernel_attention(q, k, v, segment_ids=None):
    """`cpu_attention.attention` (fp32, causal, segment ids; 0 at padding, no gradient there).
    Under a multi-device `sharding.activation_rules` mesh it runs in a shard_map, batch and
    heads as the rules place them (XLA would otherwise gather every input onto each device
    for a custom call it cannot partition); a sharded sequence is refused."""
    def local(q, k, v, seg):
        return cpu_attention.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), seg)

    return _over_mesh(local, q, k, v, segment_ids, "cpu").astype(q.dtype)


# ----------------------------------------------------------------------------- splash (TPU)


def splash_block(n: int) -> int:
    """The splash block size for a sequence of n tokens: the largest of SPLASH_BLOCKS that
    divides n. The kernel tiles queries and keys in blocks that must divide the sequence,
    and a key block is a multiple of the TPU's 128 lanes; so n must be a multiple of 128."""
    for b in SPLASH_BLOCKS:
        if n % b == 0:
            return b
    raise ConfigError(f"model.attention=splash needs the sequence length to be a multiple of 128 (the TPU "
                      f"kernel's query and key blocks must divide it), got {n}: set train.seq_len to a multiple "
                      f"of 128, or use model.attention=chunked (auto falls back to it)")


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, T: int, S: int, interpret: bool):
    """The splash kernel for `heads` query heads over [T,S]: causal mask, blocks from
    `splash_block`. Building it processes the block mask on the host (numpy): cached, and
    built as concrete arrays even when first asked for inside a trace, so that the cached
    kernel holds constants rather than that trace's tracers."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = splash_block(T), splash_block(S)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.CausalMask((T, S))] * heads)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False):
    """Pallas splash attention (TPU), causal, with segment ids. q [B,T,H,D], k/v [B,S,K,D],
    segment_ids [B,T] (0 = padding; None = one whole segment per row) -> [B,T,H,D], zero at
    padding, whose gradients are zero too. `interpret`: run the kernel emulated by XLA on
    any backend (the CPU tests).

    Constraints: T and S multiples of 128 (`splash_block`, ConfigError otherwise). GQA: the
    MHA kernel maps query head h to kv head h // (H/K) itself, so k/v go in unrepeated.
    head_dim 80 (stable-code-3b) goes in as is: a block's head_dim spans the whole axis, the
    case Pallas TPU allows for a dimension that is not a multiple of 128 (the lanes are then
    padded to 128, so 80 would cost the matmul time of 128); checked here only in interpret
    mode, not yet on a TPU. Softmax is in fp32 in the kernel; q is scaled by 1/sqrt(D) before
    it (the kernel has no scale), in fp32 and cast back to q's dtype.

    Padding: splash's segment mask is "same id", so a padding query (id 0) attends to the
    padding keys before it (its own included) - never a fully masked row, which the kernel
    would also survive (checked in interpret mode: a row masked everywhere comes out finite). Outputs there are zeroed like the cuDNN path's, and q/k/v are zeroed
    at padding so no gradient reaches or leaves it. Real queries never see a padding key
    (their ids are >= 1), so they get the reference's answer.

    Under a multi-device `sharding.activation_rules` mesh the kernel runs in a shard_map
    (a Mosaic kernel cannot be partitioned automatically): batch and heads as the rules
    place them; a sharded sequence is refused (the kernel needs every key)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, D = q.shape
    S = k.shape[1]
    splash_block(T), splash_block(S)  # fail here, with the fix, not inside the kernel
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        real = segment_ids[..., None, None] > 0  # [B,T,1,1]
        q, k, v = (jnp.where(real, x, 0) for x in (q, k, v))
    q = (q.astype(jnp.float32) * (1.0 / float(D) ** 0.5)).astype(q.dtype)

    def local(q, k, v, seg):  # this device's [b,T,h,D], [b,S,k,D], [b,T] (or seg None)
        kernel = _splash_kernel(q.shape[2], T, S, interpret)
        qh, kh, vh = (x.swapaxes(1, 2) for x in (q, k, v))  # [b,h,T,D], [b,k,S,D]
        if seg is None:
            out = jax.vmap(kernel)(qh, kh, vh)
        else:
            out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(qh, kh, vh, seg)
        return out.swapaxes(1, 2)  # [b,T,h,D]

    out = _over_mesh(local, q, k, v, segment_ids)
    return out if segment_ids is None else jnp.where(real, out, 0)


def _sequence_sharded(seq_len: int) -> bool:
    """Whether the active `sharding.activation_rules` mesh shards the sequence axis."""
    from sc_jax import sharding

    if not sharding._ACTIVE:
        return False
    mesh, rules = sharding._ACTIVE[-1]
    return sharding.logical_to_spec(("act_batch", "act_seq"), rules, mesh, (mesh.size, seq_len))[1] is not None


def _over_mesh(local, q, k, v, segment_ids, path: str = "splash"):
    """local(q, k, v, segment_ids) per device in a shard_map over the active
    `sharding.activation_rules` mesh (batch and heads sharded as the logical rules say),
    or directly without one."""
    from sc_jax import sharding

    active = sharding._ACTIVE  # the mesh and rules `constrain` pins activations to
    if not active or active[-1][0].size == 1:
        return local(q, k, v, segment_ids)
    mesh, rules = active[-1]
    P = jax.sharding.PartitionSpec
    q_spec = sharding.logical_to_spec(("act_batch", "act_seq", "act_heads", None), rules, mesh, q.shape)
    kv_spec = sharding.logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None), rules, mesh, k.shape)
    if q_spec[1] is not None or kv_spec[1] is not None:
        raise ConfigError(f"model.attention={path} cannot run with the sequence sharded (mesh.sequence > 1): "
                          "each device's kernel needs every key. Set mesh.sequence=1 or model.attention=chunked")
    if kv_spec[2] != q_spec[2] or kv_spec[0] != q_spec[0]:
        # kv heads sharded unlike query heads (e.g. K not divisible by the tensor axis): give
        # every query head its own kv head so both shard alike. [B,S,K,D] -> [B,S,H,D]
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    seg_spec = P(q_spec[0], None)
    if segment_ids is None:
        fn = lambda q, k, v: local(q, k, v, None)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
