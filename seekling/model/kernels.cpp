// CPU matmul kernels for decoding: they read each weight once, sequentially, at memory bandwidth.
//
// A decode step at batch 1 is a chain of matrix-vector products: the time is the bytes of weights read
// divided by the bandwidth a core gets. torch's fp32 `F.linear` reads ~17 GB/s at one row on the
// development machine (AMD EPYC, AVX2), against ~48 GB/s that one core can stream (CALIBRATION.md); fbgemm's
// int8 GEMM needs a second, packed copy of every weight. These kernels stream the weights as they are stored:
//
//   f32_linear(x [M, K], w [O, K]) -> x @ w^T               fp32; rows of w 4 at a time, 8 lanes, the next 4 prefetched
//   int8_linear(x [M, K], q, s [O]) -> x @ (q * s)^T         q: int8 weights, one scale per output row, rows
//                                                           padded to Kp = K rounded up to 32 with zeros, in
//                                                           tiles of 4 rows [O / 4, Kp / 32, 4, 32] (below)
//
// int8_linear quantises each row of x to int8 in blocks of 32 (one scale per block: max|x| / 127, rounded to
// nearest even, as torch.round) and sums u8 x s8 products with maddubs (|x| times w with x's sign moved onto
// w, so no operand is ever -128 and no int16 pair sum can saturate: 2 * 127 * 127 < 2^15), then scales each
// block's int32 sum by its activation scale in fp32 — llama.cpp's Q8_0 dot product, with per-row weight
// scales. Two rows of x share each load of a weight tile (prefill, batches). Without AVX2 the same
// loops are written plainly for the compiler to vectorise (NEON on Arm). The results equal the torch
// reference in seekling/model/quant.py up to the order of the fp32 block sums.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEEKLING_AVX2 1
#endif

namespace {

constexpr int64_t QBLOCK = 32;

// Grain for at::parallel_for: at least ~64 KB of weights per task, so small matrices stay on one thread.
int64_t grain(int64_t bytes_per_item) { return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, bytes_per_item)); }

#ifdef SEEKLING_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ------------------------------------------------------------------------------------------------- fp32

// y[m, o] for o in [o0, o0 + R): R rows of w against one row of x.
template <int R>
inline void f32_rows(const float* x, const float* w, int64_t K, float* y) {
  int64_t i = 0;
#ifdef SEEKLING_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (; i + 8 <= K; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) {
      if ((i & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + i), _MM_HINT_T0);  // next tile
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + i), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) y[r] = 0.f;
#endif
  for (int r = 0; r < R; ++r) {
    float tail = 0.f;
    for (int64_t j = i; j < K; ++j) tail += w[r * K + j] * x[j];
    y[r] += tail;
  }
}

at::Tensor f32_linear(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "f32_linear: fp32 only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), "f32_linear: x [M, K], w [O, K]");
  const auto x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  auto y = at::empty({M, O}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + 3) / 4, grain(4 * K * 4), [&](int64_t b, int64_t e) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t o4 = b; o4 < e; ++o4) {
        const int64_t o = o4 * 4;
        float out[4];
        const int64_t rows = std::min<int64_t>(4, O - o);
        if (rows == 4) {
          f32_rows<4>(xp + m * K, wp + o * K, K, out);
        } else {
          for (int64_t r = 0; r < rows; ++r) f32_rows<1>(xp + m * K, wp + (o + r) * K, K, out + r);
        }
        for (int64_t r = 0; r < rows; ++r) yp[m * O + o + r] = out[r];
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------------- int8

// Quantise one row of x (K values) into Kp int8 values (zero beyond K) and Kp / 32 block scales.
void quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q, float* s) {
  for (int64_t b = 0; b < Kp / QBLOCK; ++b) {
    const int64_t lo = b * QBLOCK, hi = std::min<int64_t>(lo + QBLOCK, K);
    float amax = 0.f;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.f;
    s[b] = scale;
    for (int64_t i = lo; i < lo + QBLOCK; ++i) {
      const float v = (i < hi && scale > 0.f) ? std::nearbyint(x[i] / scale) : 0.f;
      q[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
    }
  }
}

// The weights are stored in tiles of 4 output rows with their blocks interleaved, q[tile][block][row][32]: a
// tile is one sequential stream (4 rows of a short matrix read side by side would be 4 short streams, which
// the hardware prefetcher follows badly: 11 vs 22 GB/s from DRAM at 896-wide rows on one core), prefetched
// PREFETCH bytes ahead.
constexpr int64_t TILE = 4, PREFETCH = 1024;

// MR rows of quantised x against one tile: out[m][r] = sum_b xs[m, b] * (xq[m, b] . w[r, b]).
template <int MR>
inline void int8_tile(const int8_t* xq, const float* xs, int64_t Kp, const int8_t* tile, float out[][TILE]) {
  const int64_t nb = Kp / QBLOCK;
#ifdef SEEKLING_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][TILE];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < TILE; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = tile + b * TILE * QBLOCK;
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 64), _MM_HINT_T0);
    __m256i wv[TILE];
    for (int r = 0; r < TILE; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * QBLOCK));
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + b * QBLOCK));
      const __m256i ax = _mm256_sign_epi8(xv, xv);
      const __m256 sx = _mm256_set1_ps(xs[m * nb + b]);
      for (int r = 0; r < TILE; ++r) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xv)), ones);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sx, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < TILE; ++r) out[m][r] = hsum(acc[m][r]);
#else
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < TILE; ++r) {
      float a = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t d = 0;
        const int8_t* xb = xq + m * Kp + b * QBLOCK;
        const int8_t* wb = tile + (b * TILE + r) * QBLOCK;
        for (int64_t i = 0; i < QBLOCK; ++i) d += static_cast<int32_t>(xb[i]) * wb[i];
        a += static_cast<float>(d) * xs[m * nb + b];
      }
      out[m][r] = a;
    }
  }
#endif
}

// Tiles [t_begin, t_end) against x rows [m0, m0 + MR); rows past O (the last tile's padding) are not stored.
template <int MR>
void int8_rows(const int8_t* xq, const float* xs, int64_t Kp, const int8_t* wq, const float* ws, int64_t O,
               int64_t t_begin, int64_t t_end, float* y, int64_t m0) {
  float out[MR][TILE];
  for (int64_t t = t_begin; t < t_end; ++t) {
    int8_tile<MR>(xq, xs, Kp, wq + t * TILE * Kp, out);
    for (int m = 0; m < MR; ++m)
      for (int64_t r = 0; r < TILE && t * TILE + r < O; ++r)
        y[(m0 + m) * O + t * TILE + r] = out[m][r] * ws[t * TILE + r];
  }
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& wq_in, const at::Tensor& ws_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "int8_linear: x must be fp32");
  TORCH_CHECK(wq_in.scalar_type() == at::kChar && ws_in.scalar_type() == at::kFloat,
              "int8_linear: int8 weights with fp32 scales");
  TORCH_CHECK(x_in.dim() == 2 && wq_in.dim() == 4 && wq_in.size(2) == TILE && wq_in.size(3) == QBLOCK &&
              ws_in.dim() == 1 && (ws_in.size(0) + TILE - 1) / TILE == wq_in.size(0),
              "int8_linear: x [M, K], q [tiles, blocks, 4, 32], s [O]");
  const auto x = x_in.contiguous(), wq = wq_in.contiguous(), ws = ws_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = ws.size(0), tiles = wq.size(0), Kp = wq.size(1) * QBLOCK;
  TORCH_CHECK(Kp >= K && Kp - K < QBLOCK, "int8_linear: weight rows must be K padded to 32");
  auto y = at::empty({M, O}, x.options());
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> xs(M * (Kp / QBLOCK));
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, Kp, xq.data() + m * Kp, xs.data() + m * (Kp / QBLOCK));
  });
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = Kp / QBLOCK;
  // Two x rows share each tile's loads (2 x 4 accumulators); an odd last row goes alone. Every x row's result
  // is computed the same way whatever the other rows (batch invariance).
  at::parallel_for(0, tiles, grain(TILE * Kp), [&](int64_t b, int64_t e) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) int8_rows<2>(xq.data() + m * Kp, xs.data() + m * nb, Kp, wp, sp, O, b, e, yp, m);
    for (; m < M; ++m) int8_rows<1>(xq.data() + m * Kp, xs.data() + m * nb, Kp, wp, sp, O, b, e, yp, m);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(seekling, m) {
  m.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor s) -> Tensor");
}

TORCH_LIBRARY_IMPL(seekling, CPU, m) {
  m.impl("f32_linear", &f32_linear);
  m.impl("int8_linear", &int8_linear);
}
