// Weight-only int8 matmul for XLA's CPU backend, called through jax.ffi (sc_jax/int8_kernel.py):
//
//   y[M,N] = (x[M,K] @ q[N,K]^T) * scale[N]      x, y, scale fp32; q int8, one row per output
//
// Each int8 weight is widened to fp32 in a register just before its multiply-add, so the
// weights are read from memory once, as int8, front to back (each output's K inputs are one
// contiguous row, which the hardware prefetcher follows). XLA's own dot takes float operands
// only and writes a whole fp32 copy of the kernel first, every call. Sums are fp32: per
// output, 16 partial sums over k in order, then added together, so results agree with XLA's
// dot to fp32 rounding, not bit for bit; they do not depend on the threads.
//
// Work is split into ranges of output rows ("claims") that the caller and XLA's intra-op
// thread pool take from one counter (parallel_for.h).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 4;       // rows of q per block (4 x R accumulators in registers)
constexpr int64_t kRowBlock = 4;   // rows of x per block
constexpr int64_t kClaimBytes = 64 << 10;  // q per claim, where there are enough claims

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t m, k, n;
};

#if defined(__AVX512F__)
inline __m512 Widen(const int8_t* q) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

// R rows of x (a compile-time count, so every accumulator stays in a register) against
// kRows rows of q from n0; K a multiple of 16.
template <int R>
void Block(const Problem& p, int64_t m0, int64_t n0) {
  const int8_t* q = p.q + n0 * p.k;
  __m512 acc[R][kRows];
  for (auto& r : acc)
    for (auto& a : r) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.k; k += 16) {
    __m512 w[kRows];
    for (int j = 0; j < kRows; ++j) w[j] = Widen(q + j * p.k + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(p.x + (m0 + r) * p.k + k);
      for (int j = 0; j < kRows; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kRows; ++j) p.y[(m0 + r) * p.n + n0 + j] = _mm512_reduce_add_ps(acc[r][j]) * p.scale[n0 + j];
}

void Blocks(const Problem& p, int64_t n0) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kRowBlock) {
    switch (std::min(kRowBlock, p.m - m0)) {
      case 1: Block<1>(p, m0, n0); break;
      case 2: Block<2>(p, m0, n0); break;
      case 3: Block<3>(p, m0, n0); break;
      default: Block<4>(p, m0, n0); break;
    }
  }
}
#endif

// Rows [n0, n0 + count) of q in plain loops: the tails, and machines without AVX-512.
void Plain(const Problem& p, int64_t n0, int64_t count) {
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t j = n0; j < n0 + count; ++j) {
      float sum = 0;
      for (int64_t k = 0; k < p.k; ++k) sum += p.x[m * p.k + k] * static_cast<float>(p.q[j * p.k + k]);
      p.y[m * p.n + j] = sum * p.scale[j];
    }
}

// Output columns (rows of q) [n0, n1).
void Outputs(const Problem& p, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  if (p.k % 16 == 0) {
    for (; n0 + kRows <= n1; n0 += kRows) Blocks(p, n0);
  }
#endif
  Plain(p, n0, n1 - n0);
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("int8_matmul: x and q must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = qd[0];
  if (qd[1] != k || scale.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("int8_matmul: x [M,K], q [N,K] and scale [N] do not agree");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  const Problem problem{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), m, k, n};
  // A claim: whole blocks, >= kClaimBytes of q, but at least 4 claims per thread where q allows.
  const int64_t threads = pool.num_threads() + 1, blocks = (n + kRows - 1) / kRows;
  const int64_t per_claim = kRows * std::max<int64_t>(1, std::min(kClaimBytes / (kRows * k) + 1, blocks / (4 * threads)));
  ParallelFor::Run(pool, (n + per_claim - 1) / per_claim, [&](int64_t i) {
    Outputs(problem, i * per_claim, std::min((i + 1) * per_claim, n));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 where the AVX-512 blocks were compiled in and this CPU has AVX-512; otherwise the plain
// loops would be slower than XLA's own product, and sc_jax does not use the kernel.
extern "C" int ScInt8MatmulVectorized() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f") ? 1 : 0;  // a library built elsewhere, on this CPU
#else
  return 0;
#endif
}
