// CPU matmul kernels for decoding: they read each weight once, sequentially, at memory bandwidth.
//
// A decode step at batch 1 is a chain of matrix-vector products: the time is the bytes of weights read
// divided by the bandwidth a core gets. torch's fp32 `F.linear` reads ~17 GB/s at one row on the
// development machine (AMD EPYC, AVX2), against ~48 GB/s that one core can stream; fbgemm's int8 GEMM needs
// a second, packed copy of every weight. These kernels stream the weights as they are stored (the layouts are
// described in seekling/model/quant.py):
//
//   f32_linear(x [M, K], w [O, K]) -> x @ w^T      fp32; rows of w 4 at a time, 8 lanes, the next 4 prefetched
//   int8_linear(x, q, s, O) -> x @ W^T              int8 W = q * s, an fp16 scale per block of 32 (Q8_0), q in tiles
//                                                  of 4 rows [O / 4, Kp / 32, 4, 32], Kp = K rounded up to 32
//   int4_linear(x, q, codes, dm) -> x @ W^T         int4 groups of 32, W = d·sc·q - dmin·m, row-major
//   int4_fit(groups [N, 32]) -> (scale [N], min [N])   the int4 quantiser's per-group search
//
// Both quantised products quantise each row of x to int8 in blocks of 32 (one scale per block: max|x| / 127,
// rounded to nearest even, as torch.round) — llama.cpp's Q8_0 activations — and multiply in integers:
//   int8: u8 x s8 products with maddubs (|x| times w with x's sign moved onto w, so no operand is ever -128
//         and no int16 pair sum can saturate: 2 * 127 * 127 < 2^15; vpdpbusd where VNNI is), each block's
//         int32 sum scaled by its activation scale times its weight scale in fp32;
//   int4: the 4-bit values (0..15) are the unsigned operand of maddubs as they are; the int16 pair sums are
//         multiplied by the group's 8-bit scale code in the same madd that widens them to int32
//         (2 * 15 * 127 * 255 < 2^31 with room), then scaled by the activation block's scale in fp32; d and
//         the min term (dmin · Σ_g m_g · xs_g · Σ x_g, from per-block sums of x) are applied once per
//         super-block of 8 groups.
// Several rows of x share each load of a weight (batches, prefill). Without AVX2 the same loops are written
// plainly for the compiler to vectorise (NEON on Arm). The results equal the torch reference in
// seekling/model/quant.py up to the order of the fp32 sums.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEEKLING_AVX2 1
// VNNI (AVX512-VNNI with VL, or AVX-VNNI): vpdpbusd sums four u8 x s8 products into int32 in one instruction
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define SEEKLING_VNNI 1
#endif
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

inline float half_to_float(const at::Half h) {
#ifdef __F16C__
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

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

// The rows of x quantised once per call: xq [M, Kp], xs [M, Kp / 32].
struct QuantizedX {
  int64_t M, Kp, nb;
  std::vector<int8_t> q;
  std::vector<float> s;
  QuantizedX(const at::Tensor& x, int64_t Kp_) : M(x.size(0)), Kp(Kp_), nb(Kp_ / QBLOCK), q(M * Kp_), s(M * nb) {
    const float* xp = x.data_ptr<float>();
    const int64_t K = x.size(1);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, Kp, q.data() + m * Kp, s.data() + m * nb);
    });
  }
};

// The weights are stored in tiles of 4 output rows with their blocks interleaved, q[tile][block][row][32], and
// their fp16 scales beside them, s[tile][block][row]: a tile is one sequential stream (4 rows of a short matrix
// read side by side would be 4 short streams, which the hardware prefetcher follows badly: 11 vs 22 GB/s from
// DRAM at 896-wide rows on one core), prefetched PREFETCH bytes ahead.
constexpr int64_t TILE = 4, PREFETCH = 1024;

#ifdef SEEKLING_AVX2
// Eight int32 sums of four u8 x s8 products each (no operand is -128: see the top of the file).
inline __m256i dot_u8s8(__m256i u, __m256i s, __m256i ones16) {
#if defined(SEEKLING_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones16;
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(SEEKLING_VNNI)
  (void)ones16;
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones16);
#endif
}
#endif

// MR rows of quantised x against one tile: out[m][r] = sum_b xs[m, b] * s[b, r] * (xq[m, b] . w[r, b]).
template <int MR>
inline void int8_tile(const int8_t* xq, const float* xs, int64_t Kp, const int8_t* tile, const at::Half* ws,
                      float out[][TILE]) {
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
    // the tile's 4 block scales at once (F16C), times each x row's block scale; broadcast from memory per row
    const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ws + b * TILE)));
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + b * QBLOCK));
      const __m256i ax = _mm256_sign_epi8(xv, xv);
      alignas(16) float f[4];
      _mm_store_ps(f, _mm_mul_ps(s4, _mm_set1_ps(xs[m * nb + b])));
      for (int r = 0; r < TILE; ++r) {
        const __m256i p = dot_u8s8(ax, _mm256_sign_epi8(wv[r], xv), ones);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(f + r), acc[m][r]);
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
        a += static_cast<float>(d) * (xs[m * nb + b] * half_to_float(ws[b * TILE + r]));
      }
      out[m][r] = a;
    }
  }
#endif
}

// Tiles [t_begin, t_end) against x rows [m0, m0 + MR); rows past O (the last tile's padding) are not stored.
template <int MR>
void int8_rows(const QuantizedX& x, int64_t m0, const int8_t* wq, const at::Half* ws, int64_t O, int64_t t_begin,
               int64_t t_end, float* y) {
  float out[MR][TILE];
  const int64_t Kp = x.Kp;
  for (int64_t t = t_begin; t < t_end; ++t) {
    int8_tile<MR>(x.q.data() + m0 * Kp, x.s.data() + m0 * x.nb, Kp, wq + t * TILE * Kp, ws + t * x.nb * TILE, out);
    for (int m = 0; m < MR; ++m)
      for (int64_t r = 0; r < TILE && t * TILE + r < O; ++r) y[(m0 + m) * O + t * TILE + r] = out[m][r];
  }
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& wq_in, const at::Tensor& ws_in, int64_t O) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "int8_linear: x must be fp32");
  TORCH_CHECK(wq_in.scalar_type() == at::kChar && ws_in.scalar_type() == at::kHalf,
              "int8_linear: int8 weights with fp16 block scales");
  TORCH_CHECK(x_in.dim() == 2 && wq_in.dim() == 4 && wq_in.size(2) == TILE && wq_in.size(3) == QBLOCK &&
              ws_in.dim() == 3 && ws_in.size(0) == wq_in.size(0) && ws_in.size(1) == wq_in.size(1) &&
              ws_in.size(2) == TILE && (O + TILE - 1) / TILE == wq_in.size(0),
              "int8_linear: x [M, K], q [tiles, blocks, 4, 32], s [tiles, blocks, 4]");
  const auto x = x_in.contiguous(), wq = wq_in.contiguous(), ws = ws_in.contiguous();
  const int64_t K = x.size(1), tiles = wq.size(0), Kp = wq.size(1) * QBLOCK;
  TORCH_CHECK(Kp >= K && Kp - K < QBLOCK, "int8_linear: weight rows must be K padded to 32");
  auto y = at::empty({x.size(0), O}, x.options());
  const QuantizedX xq(x, Kp);
  const int8_t* wp = wq.data_ptr<int8_t>();
  const at::Half* sp = ws.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  // Two x rows share each tile's loads (2 x 4 accumulators); an odd last row goes alone. Every x row's result
  // is computed the same way whatever the other rows (batch invariance).
  at::parallel_for(0, tiles, grain(TILE * Kp), [&](int64_t b, int64_t e) {
    int64_t m = 0;
    for (; m + 2 <= xq.M; m += 2) int8_rows<2>(xq, m, wp, sp, O, b, e, yp);
    for (; m < xq.M; ++m) int8_rows<1>(xq, m, wp, sp, O, b, e, yp);
  });
  return y;
}

// ------------------------------------------------------------------------------------------------- int4

constexpr int64_t SUPER = 8;  // groups of 32 per (d, dmin) and per activation scale: 256 values

// x quantised for the int4 product: int8 per super-block of 256 (one scale each, as llama.cpp's Q8_K), padded to
// whole super-blocks, and what the min term needs: xsum[g] = xs[g / 8] * Σ xq over group g.
struct QuantizedX256 {
  int64_t M, Kq, S;
  std::vector<int8_t> q;
  std::vector<float> s, xsum;
  QuantizedX256(const at::Tensor& x, int64_t S_) : M(x.size(0)), Kq(S_ * 256), S(S_), q(M * Kq), s(M * S_),
                                                    xsum(M * S_ * SUPER) {
    const float* xp = x.data_ptr<float>();
    const int64_t K = x.size(1);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        for (int64_t sb = 0; sb < S; ++sb) {
          const int64_t lo = sb * 256, hi = std::min<int64_t>(K, lo + 256);
          float amax = 0.f;
          for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(xp[m * K + i]));
          const float sc = amax / 127.f;
          s[m * S + sb] = sc;
          for (int64_t i = lo; i < lo + 256; ++i) {
            const float v = (i < hi && sc > 0.f) ? std::nearbyint(xp[m * K + i] / sc) : 0.f;
            q[m * Kq + i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
          }
          for (int64_t g = 0; g < SUPER; ++g) {
            int32_t t = 0;
            for (int64_t i = 0; i < QBLOCK; ++i) t += q[m * Kq + lo + g * QBLOCK + i];
            xsum[(m * S + sb) * SUPER + g] = sc * static_cast<float>(t);
          }
        }
    });
  }
};

struct Int4Row {
  const uint8_t* q;      // [pairs, 32]
  const uint8_t* sc;     // [G]
  const int8_t* mins;    // [G]
  const at::Half* dm;    // [S, 2]
};

#ifdef SEEKLING_AVX2
// shuffle masks that broadcast int16 lane g (of 8) of a 128-bit lane to all its lanes
alignas(32) const uint8_t LANE16[8][32] = {
#define L(g) {2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, \
              2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1, 2*g, 2*g+1}
    L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7)
#undef L
};

// One pair of groups (64 weights, 32 bytes) of a row against MR rows of x, summed into ai[m] (int32): the
// 4-bit values are maddubs' unsigned operand, and the madd that widens the pair sums to int32 multiplies them
// by the groups' scale codes.
template <int MR>
inline void int4_pair(const uint8_t* q, const int8_t* xq, int64_t Kq, __m256i codes, int j, __m256i ai[]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  _mm_prefetch(reinterpret_cast<const char*>(q + PREFETCH), _MM_HINT_T0);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  const __m256i sc0 = _mm256_shuffle_epi8(codes, _mm256_load_si256(reinterpret_cast<const __m256i*>(LANE16[j])));
  const __m256i sc1 = _mm256_shuffle_epi8(codes, _mm256_load_si256(reinterpret_cast<const __m256i*>(LANE16[j + 1])));
  for (int m = 0; m < MR; ++m) {
    const int8_t* xm = xq + m * Kq;
    const __m256i p0 = _mm256_madd_epi16(
        _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm))), sc0);
    const __m256i p1 = _mm256_madd_epi16(
        _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 32))), sc1);
    ai[m] = _mm256_add_epi32(ai[m], _mm256_add_epi32(p0, p1));
  }
}
#endif

// One weight row against MR rows of x (from row m0): out[m] = Σ_s xs[s] d_s Σ_{g in s} sc_g (q_g . xq_g)
// - dmin_s Σ_{g in s} m_g xsum_g. Over a super-block the products stay in int32 (< 8 * 2 * 2 * 15 * 127 * 255).
template <int MR>
inline void int4_row(const QuantizedX256& x, int64_t pairs, int64_t m0, const Int4Row& w, float* out) {
  const int64_t S = x.S, Kq = x.Kq;
  const int8_t* xq = x.q.data() + m0 * Kq;
  const float* xs = x.s.data() + m0 * S;
  const float* xsum = x.xsum.data() + m0 * S * SUPER;
#ifdef SEEKLING_AVX2
  __m256 acc[MR], low[MR];  // separate chains for the scaled products and the min term
  for (int m = 0; m < MR; ++m) acc[m] = low[m] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const __m256i codes = _mm256_broadcastsi128_si256(
        _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.sc + s * SUPER))));
    __m256i ai[MR];
    for (int m = 0; m < MR; ++m) ai[m] = _mm256_setzero_si256();
    const uint8_t* qs = w.q + s * 4 * 32;
    const int8_t* xs8 = xq + s * 256;
    if ((s + 1) * 4 <= pairs) {  // a whole super-block: four pairs, unrolled
      int4_pair<MR>(qs, xs8, Kq, codes, 0, ai);
      int4_pair<MR>(qs + 32, xs8 + 64, Kq, codes, 2, ai);
      int4_pair<MR>(qs + 64, xs8 + 128, Kq, codes, 4, ai);
      int4_pair<MR>(qs + 96, xs8 + 192, Kq, codes, 6, ai);
    } else {
      for (int64_t p = s * 4; p < pairs; ++p) int4_pair<MR>(w.q + p * 32, xq + p * 64, Kq, codes, 2 * (p - s * 4), ai);
    }
    const float d = half_to_float(w.dm[2 * s]);
    const __m256 dmin = _mm256_set1_ps(half_to_float(w.dm[2 * s + 1]));
    const __m256 mins = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.mins + s * SUPER))));
    for (int m = 0; m < MR; ++m) {
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[m]), _mm256_set1_ps(d * xs[m * S + s]), acc[m]);
      low[m] = _mm256_fmadd_ps(_mm256_mul_ps(mins, _mm256_loadu_ps(xsum + (m * S + s) * SUPER)), dmin, low[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = hsum(_mm256_sub_ps(acc[m], low[m]));
#else
  for (int m = 0; m < MR; ++m) {
    float a = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      int32_t dot = 0;
      float msum = 0.f;
      for (int64_t g = s * SUPER; g < std::min<int64_t>((s + 1) * SUPER, 2 * pairs); ++g) {
        const uint8_t* qb = w.q + (g / 2) * 32;
        const int shift = (g % 2) * 4;
        int32_t t = 0;
        for (int64_t i = 0; i < QBLOCK; ++i) t += static_cast<int32_t>((qb[i] >> shift) & 15) * xq[m * Kq + g * QBLOCK + i];
        dot += t * static_cast<int32_t>(w.sc[g]);
      }
      for (int64_t g = 0; g < SUPER; ++g) msum += static_cast<float>(w.mins[s * SUPER + g]) * xsum[(m * S + s) * SUPER + g];
      a += static_cast<float>(dot) * xs[m * S + s] * half_to_float(w.dm[2 * s]) - msum * half_to_float(w.dm[2 * s + 1]);
    }
    out[m] = a;
  }
#endif
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& codes_in,
                       const at::Tensor& dm_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "int4_linear: x must be fp32 [M, K]");
  TORCH_CHECK(q_in.scalar_type() == at::kByte && q_in.dim() == 3 && q_in.size(2) == 32 &&
              codes_in.scalar_type() == at::kByte && codes_in.dim() == 3 && codes_in.size(1) == 2 &&
              dm_in.scalar_type() == at::kHalf && dm_in.dim() == 3 && dm_in.size(2) == 2,
              "int4_linear: q uint8 [O, pairs, 32], codes uint8 [O, 2, G], dm fp16 [O, G / 8, 2]");
  const auto x = x_in.contiguous(), q = q_in.contiguous(), codes = codes_in.contiguous(), dm = dm_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = q.size(0), pairs = q.size(1), Kp = pairs * 64, G = codes.size(2);
  TORCH_CHECK(Kp >= K && Kp - K < 64 && G % SUPER == 0 && G >= Kp / QBLOCK && dm.size(1) == G / SUPER &&
              codes.size(0) == O && dm.size(0) == O, "int4_linear: shapes do not match (x [M, K] vs q [O, K / 64, 32])");
  auto y = at::empty({M, O}, x.options());
  const QuantizedX256 xq(x, G / SUPER);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* dp = dm.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t ROWS = 16;  // weight rows per block: the block's x rows are read from L1 for all of them
  at::parallel_for(0, O, grain(Kp / 2), [&](int64_t b, int64_t e) {
    float out[4];
    for (int64_t o0 = b; o0 < e; o0 += ROWS) {
      const int64_t o1 = std::min(e, o0 + ROWS);
      auto run = [&](auto mr, int64_t m0) {
        constexpr int MR = decltype(mr)::value;
        for (int64_t o = o0; o < o1; ++o) {
          const Int4Row w{qp + o * Kp / 2, cp + o * 2 * G, reinterpret_cast<const int8_t*>(cp + o * 2 * G + G),
                          dp + o * G / SUPER * 2};
          int4_row<MR>(xq, pairs, m0, w, out);
          for (int i = 0; i < MR; ++i) yp[(m0 + i) * O + o] = out[i];
        }
      };
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) run(std::integral_constant<int, 4>{}, m);
      for (; m < M; ++m) run(std::integral_constant<int, 1>{}, m);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------- int4 quantiser

// Each group's (scale, min), w ~ scale·q - min with q in 0..15: seekling.model.quant.int4_fit in C++ (its
// reference; see there). For each candidate rounding the least-squares (scale, offset) leaves the weighted
// residual Σw x² - scale·Σw x q - offset·Σw x (the residual is orthogonal to q and 1), so a candidate costs
// four weighted sums over the group: 8 lanes at a time with AVX2.
constexpr int FIT_STEPS = 21;

struct Sums {
  float swl, swl2, swxl;
};

#ifdef SEEKLING_AVX2
inline Sums fit_sums(const __m256 xl[4], const __m256 w[4], const __m256 wx[4], float iscale) {
  const __m256 is = _mm256_set1_ps(iscale), zero = _mm256_setzero_ps(), top = _mm256_set1_ps(15.f);
  __m256 swl = zero, swl2 = zero, swxl = zero;
  for (int v = 0; v < 4; ++v) {
    const __m256 q = _mm256_min_ps(top, _mm256_max_ps(zero, _mm256_round_ps(_mm256_mul_ps(xl[v], is),
                                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m256 wq = _mm256_mul_ps(w[v], q);
    swl = _mm256_add_ps(swl, wq), swl2 = _mm256_fmadd_ps(wq, q, swl2), swxl = _mm256_fmadd_ps(wx[v], q, swxl);
  }
  return {hsum(swl), hsum(swl2), hsum(swxl)};
}
#endif

void fit_group(const float* x, float* scale, float* low) {
  float lo = 0.f, hi = 0.f, ss = 0.f;
  for (int i = 0; i < 32; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]), ss += x[i] * x[i];
  const float span = std::max(hi - lo, 1e-30f), rms = std::sqrt(ss / 32.f);
  float w[32], sw = 0.f, swx = 0.f, swx2 = 0.f;
  for (int i = 0; i < 32; ++i) w[i] = rms + std::fabs(x[i]), sw += w[i], swx += w[i] * x[i], swx2 += w[i] * x[i] * x[i];
  float best_s = span / 15.f, best_b = lo, best_e = 0.f;
  for (int i = 0; i < 32; ++i) {  // the min-max fit's own residual
    const float r = best_s * std::min(15.f, std::max(0.f, std::nearbyint((x[i] - lo) / best_s))) + best_b - x[i];
    best_e += w[i] * r * r;
  }
#ifdef SEEKLING_AVX2
  __m256 xl[4], wv[4], wx[4];
  for (int v = 0; v < 4; ++v) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * v);
    xl[v] = _mm256_sub_ps(xv, _mm256_set1_ps(lo)), wv[v] = _mm256_loadu_ps(w + 8 * v), wx[v] = _mm256_mul_ps(wv[v], xv);
  }
#endif
  for (int step = 0; step < FIT_STEPS; ++step) {
    const float iscale = (14.f + 2.f * step / (FIT_STEPS - 1)) / span;
#ifdef SEEKLING_AVX2
    const Sums t = fit_sums(xl, wv, wx, iscale);
#else
    Sums t{0.f, 0.f, 0.f};
    for (int i = 0; i < 32; ++i) {
      const float q = std::min(15.f, std::max(0.f, std::nearbyint((x[i] - lo) * iscale)));
      t.swl += w[i] * q, t.swl2 += w[i] * q * q, t.swxl += w[i] * x[i] * q;
    }
#endif
    const float det = sw * t.swl2 - t.swl * t.swl;
    if (!(det > 0.f)) continue;
    const float s = (sw * t.swxl - swx * t.swl) / det, off = (t.swl2 * swx - t.swl * t.swxl) / det;
    const float err = swx2 - s * t.swxl - off * swx;
    if (err < best_e && s > 0.f) best_e = err, best_s = s, best_b = off;
  }
  *scale = best_s, *low = -best_b;
}

std::tuple<at::Tensor, at::Tensor> int4_fit(const at::Tensor& groups_in) {
  TORCH_CHECK(groups_in.scalar_type() == at::kFloat && groups_in.dim() == 2 && groups_in.size(1) == 32,
              "int4_fit: groups must be fp32 [N, 32]");
  const auto groups = groups_in.contiguous();
  const int64_t N = groups.size(0);
  auto scale = at::empty({N}, groups.options()), low = at::empty({N}, groups.options());
  const float* gp = groups.data_ptr<float>();
  float *sp = scale.data_ptr<float>(), *lp = low.data_ptr<float>();
  at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) fit_group(gp + n * 32, sp + n, lp + n);
  });
  return {scale, low};
}

// ------------------------------------------------------------------------------- quantising rows (loads)

// Rows of x (fp32 or bf16) -> the layouts' row pieces, one pass per row: the loader's hot loop (a quantising
// load reads each weight once). Bitwise the results of quant.py's _int8_rows / _int4_rows (same divisions,
// round-half-even and fp16 rounding), which stay the reference and the path without the kernels.
template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

template <typename T>
void int8_rows_of(const T* x, int64_t n, int64_t K, int64_t Kp, int8_t* q, at::Half* scale) {
  const int64_t nb = Kp / QBLOCK;
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* row = x + r * K;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t lo = blk * QBLOCK, hi = std::min<int64_t>(lo + QBLOCK, K);
        float amax = 0.f;
        for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(as_float(row[i])));
        const at::Half h(amax / 127.f);
        const float s = static_cast<float>(h);
        scale[r * nb + blk] = h;
        for (int64_t i = lo; i < lo + QBLOCK; ++i)
          q[r * Kp + i] = (i < hi && s > 0.f)
                              ? static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(as_float(row[i]) / s))))
                              : 0;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "quantize_int8_rows: x must be fp32 or bf16 [n, K]");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), K = x.size(1), Kp = (K + QBLOCK - 1) / QBLOCK * QBLOCK;
  auto q = at::empty({n, Kp / QBLOCK, QBLOCK}, x.options().dtype(at::kChar));
  auto scale = at::empty({n, Kp / QBLOCK}, x.options().dtype(at::kHalf));
  if (x.scalar_type() == at::kFloat)
    int8_rows_of(x.data_ptr<float>(), n, K, Kp, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>());
  else
    int8_rows_of(x.data_ptr<at::BFloat16>(), n, K, Kp, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>());
  return {q, scale};
}

inline float to_half_and_back(float v) { return static_cast<float>(at::Half(v)); }

template <typename T>
void int4_rows_of(const T* x, int64_t n, int64_t K, int64_t pairs, int64_t G, uint8_t* q, uint8_t* codes,
                  at::Half* dm) {
  const int64_t groups = 2 * pairs, S = G / SUPER;
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    std::vector<float> row(groups * 32), scale(G, 0.f), low(G, 0.f), cs(groups), cl(groups);
    for (int64_t r = b; r < e; ++r) {
      for (int64_t i = 0; i < groups * 32; ++i) row[i] = i < K ? as_float(x[r * K + i]) : 0.f;
      for (int64_t g = 0; g < groups; ++g) fit_group(row.data() + g * 32, &scale[g], &low[g]);
      uint8_t* sc = codes + r * 2 * G;
      int8_t* mc = reinterpret_cast<int8_t*>(sc + G);
      for (int64_t s = 0; s < S; ++s) {
        float smax = 0.f, mmax = 0.f;
        for (int64_t g = s * SUPER; g < (s + 1) * SUPER; ++g) smax = std::max(smax, scale[g]), mmax = std::max(mmax, std::fabs(low[g]));
        const float d = to_half_and_back(smax / 255.f), dmin = to_half_and_back(mmax / 127.f);
        dm[(r * S + s) * 2] = at::Half(smax / 255.f), dm[(r * S + s) * 2 + 1] = at::Half(mmax / 127.f);
        for (int64_t g = s * SUPER; g < (s + 1) * SUPER; ++g) {
          const float c = d > 0.f ? std::max(0.f, std::min(255.f, std::nearbyint(scale[g] / d))) : 0.f;
          const float m = dmin > 0.f ? std::max(-127.f, std::min(127.f, std::nearbyint(low[g] / dmin))) : 0.f;
          sc[g] = static_cast<uint8_t>(c), mc[g] = static_cast<int8_t>(m);
          if (g < groups) cs[g] = d * c, cl[g] = dmin * m;
        }
      }
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t j = 0; j < 32; ++j) {
          uint8_t v[2];
          for (int h = 0; h < 2; ++h) {
            const int64_t g = 2 * p + h;
            v[h] = cs[g] > 0.f ? static_cast<uint8_t>(std::max(0.f, std::min(15.f, std::nearbyint((row[g * 32 + j] + cl[g]) / cs[g])))) : 0;
          }
          q[(r * pairs + p) * 32 + j] = v[0] | static_cast<uint8_t>(v[1] << 4);
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "quantize_int4_rows: x must be fp32 or bf16 [n, K]");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), K = x.size(1), pairs = (K + 63) / 64, G = (2 * pairs + SUPER - 1) / SUPER * SUPER;
  auto q = at::empty({n, pairs, 32}, x.options().dtype(at::kByte));
  auto codes = at::empty({n, 2, G}, x.options().dtype(at::kByte));
  auto dm = at::empty({n, G / SUPER, 2}, x.options().dtype(at::kHalf));
  if (x.scalar_type() == at::kFloat)
    int4_rows_of(x.data_ptr<float>(), n, K, pairs, G, q.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(),
                 dm.data_ptr<at::Half>());
  else
    int4_rows_of(x.data_ptr<at::BFloat16>(), n, K, pairs, G, q.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(),
                 dm.data_ptr<at::Half>());
  return {q, codes, dm};
}

std::string simd_level() {
#if defined(SEEKLING_VNNI)
  return "AVX2 + VNNI";
#elif defined(SEEKLING_AVX2)
  return "AVX2";
#else
  return "portable C++";
#endif
}

}  // namespace

TORCH_LIBRARY(seekling, m) {
  m.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor s, int out) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor codes, Tensor dm) -> Tensor");
  m.def("int4_fit(Tensor groups) -> (Tensor, Tensor)");
  m.def("quantize_int8_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_int4_rows(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("simd_level() -> str", &simd_level);
}

TORCH_LIBRARY_IMPL(seekling, CPU, m) {
  m.impl("f32_linear", &f32_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_fit", &int4_fit);
  m.impl("quantize_int8_rows", &quantize_int8_rows);
  m.impl("quantize_int4_rows", &quantize_int4_rows);
}
