// Exact causal attention with segment ids for XLA's CPU backend, fp32, forward and backward,
// called through jax.ffi (sc_jax/cpu_attention.py):
//
//   out[b,i,h] = sum_j P[i,j] v[b,j,h/G],  P = softmax_j(q[b,i,h] . k[b,j,h/G] / sqrt(D))
//   over the keys j <= i of query i's segment (segment 0 = padding: its output is 0)
//
// q, out [B,T,H,D]; k, v [B,T,K,D] (G = H/K query heads per kv head); seg [B,T] int32, each
// segment one contiguous run of positions (as the packer writes them); lse [B,H,T] fp32, each
// query's log-sum-exp, kept for the backward pass, which recomputes P from it.
//
// Why a kernel: XLA's CPU code runs the reference math as batched [T,D]x[D,T] dots with the
// [B,H,T,S] scores streamed through memory, about 21 GFLOP/s for fwd+bwd at T=512 against
// ~150 for its large matmuls (bench/attention.py). Here each (batch row, head) is one task:
// its queries go in blocks of kBlockQ, each block against only the keys its segment and the
// causal mask allow (the rest is never computed: about half of the causal square, less
// again for packed rows), with the block's scores [kBlockQ, keys] in cache. The softmax of a
// block is over its whole key range at once, so it is exact, with no online rescaling.
// Each output is summed by one thread in a fixed order: results do not depend on threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unordered_set>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockQ = 64;  // queries per block: [64, T] fp32 scores, 128 KiB at T=512

#if defined(__AVX512F__)
inline __mmask16 Lanes(int64_t w) { return static_cast<__mmask16>((1u << w) - 1); }  // w in 1..16

// C[R, 16V] (+)= A[R, k] @ B[k, 16V] (the last 16 columns masked by `tail`), row-major.
template <int R, int V>
void Micro(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
           bool accumulate, __mmask16 tail) {
  __mmask16 m[V];
  for (int v = 0; v < V; ++v) m[v] = v == V - 1 ? tail : 0xFFFF;
  __m512 c[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(m[v], C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(m[v], B + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + p]);
      for (int v = 0; v < V; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, m[v], c[r][v]);
}

template <int V>
void Strip(int64_t m, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
           bool accumulate, __mmask16 tail) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) Micro<8, V>(k, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate, tail);
  A += i * lda, C += i * ldc;
  switch (m - i) {
    case 1: Micro<1, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 2: Micro<2, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 3: Micro<3, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 4: Micro<4, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 5: Micro<5, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 6: Micro<6, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 7: Micro<7, V>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    default: break;
  }
}

// C[m,n] (+)= A[m,k] @ B[k,n], row-major with leading dimensions, in 32-column strips.
void Gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t w = std::min<int64_t>(32, n - j);
    if (w > 16)
      Strip<2>(m, k, A, lda, B + j, ldb, C + j, ldc, accumulate, Lanes(w - 16));
    else
      Strip<1>(m, k, A, lda, B + j, ldb, C + j, ldc, accumulate, Lanes(w));
  }
}

// exp of 16 lanes: 2^n * e^r with r in [-ln2/2, ln2/2], a degree-6 polynomial (Cephes' expf
// coefficients, ~1 ulp); inputs are clamped at -87 (e^-87 ~ 1.6e-38; masked keys are zeroed apart).
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

struct Shape {
  int64_t B, T, H, K, D;
  int64_t G() const { return H / K; }
  int64_t ldq() const { return H * D; }  // between positions of q, out and their gradients
  int64_t ldk() const { return K * D; }  // of k, v and theirs
};

// Per batch row: the first position of each position's segment run, or 0 for every position
// where an id comes back after another (not one run): then every earlier key is looked at.
std::vector<int64_t> RunStarts(const int32_t* seg, int64_t T) {
  std::vector<int64_t> start(T);
  std::unordered_set<int32_t> ended;
  for (int64_t i = 0; i < T; ++i) {
    const bool same = i > 0 && seg[i] == seg[i - 1];
    if (!same && i > 0) ended.insert(seg[i - 1]);
    if (!same && ended.count(seg[i])) return std::vector<int64_t>(T, 0);
    start[i] = same ? start[i - 1] : i;
  }
  return start;
}

// The first key any query of block [i0, i1) may see; -1 if the block is all padding.
int64_t FirstKey(const int32_t* seg, const std::vector<int64_t>& start, int64_t i0, int64_t i1) {
  int64_t lo = -1;
  for (int64_t i = i0; i < i1; ++i)
    if (seg[i] != 0) lo = lo < 0 ? start[i] : std::min(lo, start[i]);
  return lo;
}

void Transpose(const float* x, int64_t ldx, int64_t rows, int64_t cols, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[c * ldy + r] = x[r * ldx + c];
}

#if defined(__AVX512F__)
// Scores s [rows, n] (keys lo..lo+n) -> probabilities in place, 0 for keys the query may not
// see. With lse null, the softmax (each row's log-sum-exp to lse_out); else exp(s*scale - lse).
void Probabilities(float* s, int64_t lds, int64_t rows, int64_t n, int64_t i0, int64_t lo, const int32_t* seg,
                   float scale, const float* lse, float* lse_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    const int64_t i = i0 + r, seen = std::min<int64_t>(n, i - lo + 1);  // keys after i are the future
    const int32_t id = seg[i];
    if (id == 0) {  // padding: no keys (its own key i is in its segment otherwise)
      std::fill(row, row + n, 0.0f);
      if (lse_out) lse_out[i] = 0.0f;
      continue;
    }
    for (int64_t j = 0; j < seen; ++j)
      if (seg[lo + j] != id) row[j] = -INFINITY;
    std::fill(row + seen, row + n, 0.0f);
    float shift;
    if (lse) {
      shift = lse[i];
    } else {
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < seen; j += 16)
        {
        const __mmask16 m = Lanes(std::min<int64_t>(16, seen - j));
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, row + j));
      }
      shift = _mm512_reduce_max_ps(mx) * scale;
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(shift), minus_inf = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < seen; j += 16) {
      const __mmask16 m = Lanes(std::min<int64_t>(16, seen - j));
      const __m512 x = _mm512_maskz_loadu_ps(m, row + j);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, x, minus_inf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(keep, Exp(_mm512_fmsub_ps(x, vscale, vshift)));
      _mm512_mask_storeu_ps(row + j, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (lse) continue;
    const float total = _mm512_reduce_add_ps(sum);
    lse_out[i] = shift + std::log(total);
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t j = 0; j < seen; j += 16) {
      const __mmask16 m = Lanes(std::min<int64_t>(16, seen - j));
      _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv));
    }
  }
}

void Forward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* seg, float* out,
             float* lse, int64_t task) {
  const int64_t b = task / s.H, h = task % s.H, kh = h / s.G(), T = s.T, D = s.D;
  const float* Q = q + (b * T * s.H + h) * D;
  const float* Kp = k + (b * T * s.K + kh) * D;
  const float* Vp = v + (b * T * s.K + kh) * D;
  float* O = out + (b * T * s.H + h) * D;
  float* L = lse + (b * s.H + h) * T;
  const int32_t* sg = seg + b * T;
  const std::vector<int64_t> start = RunStarts(sg, T);
  std::vector<float> kt(D * T), scores(kBlockQ * T);
  Transpose(Kp, s.ldk(), T, D, kt.data(), T);  // [D, T]
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t i0 = 0; i0 < T; i0 += kBlockQ) {
    const int64_t i1 = std::min(T, i0 + kBlockQ), rows = i1 - i0, lo = FirstKey(sg, start, i0, i1);
    if (lo < 0) {  // padding only
      for (int64_t i = i0; i < i1; ++i) std::fill(O + i * s.ldq(), O + i * s.ldq() + D, 0.0f), L[i] = 0.0f;
      continue;
    }
    const int64_t n = i1 - lo;
    Gemm(rows, n, D, Q + i0 * s.ldq(), s.ldq(), kt.data() + lo, T, scores.data(), T, false);
    Probabilities(scores.data(), T, rows, n, i0, lo, sg, scale, nullptr, L);
    Gemm(rows, D, n, scores.data(), T, Vp + lo * s.ldk(), s.ldk(), O + i0 * s.ldq(), s.ldq(), false);
  }
}

void Backward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* seg, const float* out,
              const float* lse, const float* dout, float* dq, float* dk, float* dv, int64_t task) {
  const int64_t b = task / s.K, kh = task % s.K, T = s.T, D = s.D;
  const float* Kp = k + (b * T * s.K + kh) * D;
  const float* Vp = v + (b * T * s.K + kh) * D;
  float* dK = dk + (b * T * s.K + kh) * D;
  float* dV = dv + (b * T * s.K + kh) * D;
  const int32_t* sg = seg + b * T;
  const std::vector<int64_t> start = RunStarts(sg, T);
  std::vector<float> kt(D * T), vt(D * T), p(kBlockQ * T), ds(kBlockQ * T), flip(T * kBlockQ), delta(kBlockQ);
  Transpose(Kp, s.ldk(), T, D, kt.data(), T);
  Transpose(Vp, s.ldk(), T, D, vt.data(), T);
  for (int64_t j = 0; j < T; ++j) {
    std::fill(dK + j * s.ldk(), dK + j * s.ldk() + D, 0.0f);
    std::fill(dV + j * s.ldk(), dV + j * s.ldk() + D, 0.0f);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t h = kh * s.G(); h < (kh + 1) * s.G(); ++h) {
    const int64_t off = (b * T * s.H + h) * D;
    const float *Q = q + off, *O = out + off, *dO = dout + off, *L = lse + (b * s.H + h) * T;
    float* dQ = dq + off;
    for (int64_t i0 = 0; i0 < T; i0 += kBlockQ) {
      const int64_t i1 = std::min(T, i0 + kBlockQ), rows = i1 - i0, lo = FirstKey(sg, start, i0, i1);
      if (lo < 0) {
        for (int64_t i = i0; i < i1; ++i) std::fill(dQ + i * s.ldq(), dQ + i * s.ldq() + D, 0.0f);
        continue;
      }
      const int64_t n = i1 - lo;
      Gemm(rows, n, D, Q + i0 * s.ldq(), s.ldq(), kt.data() + lo, T, p.data(), T, false);
      Probabilities(p.data(), T, rows, n, i0, lo, sg, scale, L, nullptr);
      Gemm(rows, n, D, dO + i0 * s.ldq(), s.ldq(), vt.data() + lo, T, ds.data(), T, false);  // dP
      for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - rowsum(dO * O)) * scale
        const float *o = O + (i0 + r) * s.ldq(), *g = dO + (i0 + r) * s.ldq();
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += o[d] * g[d];
        float *pr = p.data() + r * T, *dr = ds.data() + r * T;
        for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
      }
      Gemm(rows, D, n, ds.data(), T, Kp + lo * s.ldk(), s.ldk(), dQ + i0 * s.ldq(), s.ldq(), false);
      Transpose(ds.data(), T, rows, n, flip.data(), kBlockQ);  // dS^T [n, rows]
      Gemm(n, D, rows, flip.data(), kBlockQ, Q + i0 * s.ldq(), s.ldq(), dK + lo * s.ldk(), s.ldk(), true);
      Transpose(p.data(), T, rows, n, flip.data(), kBlockQ);  // P^T
      Gemm(n, D, rows, flip.data(), kBlockQ, dO + i0 * s.ldq(), s.ldq(), dV + lo * s.ldk(), s.ldk(), true);
    }
  }
}
#endif

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                       ffi::Buffer<ffi::S32>& seg, Shape* s) {
  const auto qd = q.dimensions(), kd = k.dimensions(), sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 || sd.size() != 2)
    return ffi::Error::InvalidArgument("cpu_attention: q, k, v must be 4-D and seg 2-D");
  *s = {qd[0], qd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != s->B || kd[1] != s->T || kd[3] != s->D || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || sd[0] != s->B || sd[1] != s->T ||
      s->K == 0 || s->H % s->K)
    return ffi::Error::InvalidArgument("cpu_attention: q [B,T,H,D], k/v [B,T,K,D] (K divides H), seg [B,T]");
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, seg, &s); e.failure()) return e;
#if defined(__AVX512F__)
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* sp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor::Run(pool, s.B * s.H, [&](int64_t t) { Forward(s, qp, kp, vp, sp, op, lp, t); });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("cpu_attention: built without AVX-512");
#endif
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, seg, &s); e.failure()) return e;
#if defined(__AVX512F__)
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *gp = dout.typed_data();
  const int32_t* sp = seg.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor::Run(pool, s.B * s.K,
                   [&](int64_t t) { Backward(s, qp, kp, vp, sp, op, lp, gp, dqp, dkp, dvp, t); });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("cpu_attention: built without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 where the AVX-512 code was compiled in and this CPU runs it.
extern "C" int ScAttentionVectorized() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
  return 0;
#endif
}
