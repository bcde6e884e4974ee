// The DeepSeek-V3 inference step in C++: the forward of seekling/model (model.py `Transformer.infer` and
// `infer_mtp`, mla.py `MLA.infer`, moe.py `MoE.infer`, layers.py `rms_norm` / `apply_rope`) over raw loops, plus
// the sampler and a multi-step decode loop, so that a decode step costs the weights it reads and no Python or
// operator dispatch per token.
//
// Why: a decode step of the speedrun model (3.7M parameters) reads ~5.8 MB of weights, ~120 us from L3; the
// same step through ATen is ~400 operators at 1-6 us each, and through torch.compile still ~100 us of wrappers
// plus the engine's Python. Here one call runs k decode steps of a batch (embedding, every layer, head,
// sampling, stop tokens, cache writes) and returns the tokens.
//
// Contract with the Python side (seekling/model/native.py):
//   - The weights are the model's own tensors (the fused views `prepare` builds), held by reference: their
//     data pointers are read at every call, so in-place updates (an optimizer step, RL) are seen at once.
//   - The cache is the engine's kv[layer, block, slot, r + d_rope]; a forward writes each new token's latent
//     into its slot before that layer's attention, then attends over slots [0, position] of its sequence.
//   - fp32 only; the Python side refuses other dtypes, int8 weights and routing variants this file does not
//     implement (they run the Python step).
//   - Maths as the Python forward, in its order: RMSNorm in fp32, RoPE on interleaved pairs written
//     de-interleaved, absorbed MLA (W_UK^T q_nope against c_KV, W_UV after attention), sigmoid routing with the
//     correction bias (group-limited on the top-2 sum), experts added in expert order, SwiGLU.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NATIVE_AVX2 1
#endif

namespace {

using Tensors = std::map<std::string, at::Tensor>;

// ------------------------------------------------------------------------------------------------ kernels

#ifdef NATIVE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four horizontal sums of a, b, c, d in one register.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// exp(x) for 8 lanes (Cephes' polynomial after a range reduction by ln 2), relative error ~2e-7.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef NATIVE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef NATIVE_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void add(float* y, const float* x, int64_t n) {
  int64_t i = 0;
#ifdef NATIVE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) y[i] += x[i];
}

// exp(x[i] - shift) in place; returns the sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float s = 0.f;
#ifdef NATIVE_AVX2
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  s = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

// silu(g) * u * scale, g = x[0:n], u = x[n:2n] -> y[0:n]
inline void silu_mul(const float* x, int64_t n, float scale, float* y) {
  int64_t i = 0;
#ifdef NATIVE_AVX2
  const __m256 one = _mm256_set1_ps(1.f), sc = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(x + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(s, _mm256_loadu_ps(x + n + i)), sc));
  }
#endif
  for (; i < n; ++i) y[i] = x[i] / (1.f + std::exp(-x[i])) * x[n + i] * scale;
}

// RMSNorm of one row: y = x / sqrt(mean(x^2) + eps) * w  (y may be x)
inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float inv = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  int64_t i = 0;
#ifdef NATIVE_AVX2
  const __m256 iv = _mm256_set1_ps(inv);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
#endif
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// MR (1 or 2) rows of x against 4 consecutive rows of w: y[m * ldy + r] = x[m] . w[r]. Each 8-float slice of the
// four weight rows is loaded once for the MR rows (8 accumulators + 4 weights + 1 x: no spills; MR 3 spilled and
// ran at half the speed), and the next tile is prefetched (the 4 rows are one contiguous stream of 4K floats).
template <int MR>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
#ifdef NATIVE_AVX2
  __m256 acc[MR][4];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K, *next = w + 4 * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(next + 2 * k), _MM_HINT_T0);  // the next tile, 2 lines a step
    _mm_prefetch(reinterpret_cast<const char*>(next + 2 * k + 16), _MM_HINT_T0);
    const __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k), c = _mm256_loadu_ps(w2 + k),
                 d = _mm256_loadu_ps(w3 + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      acc[m][0] = _mm256_fmadd_ps(a, xv, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(b, xv, acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(c, xv, acc[m][2]);
      acc[m][3] = _mm256_fmadd_ps(d, xv, acc[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float out[4];
    _mm_storeu_ps(out, hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int r = 0; r < 4; ++r) {
      float tail = 0.f;
      for (int64_t j = k; j < K; ++j) tail += w[r * K + j] * x[m * ldx + j];
      y[m * ldy + r] = out[r] + tail;
    }
  }
#else
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = dot(x + m * ldx, w + r * K, K);
#endif
}

// One row of x against 4 consecutive rows of w (one sequential stream of 4K floats): y[r] = x . w[r]. Two
// accumulators a row (16 floats a step) keep 8 FMAs in flight; the next 4 rows are prefetched a line a row a step.
inline void row4(const float* x, const float* w, int64_t K, float* y) {
#ifdef NATIVE_AVX2
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K, *next = w + 4 * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next + K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next + 2 * K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next + 3 * K + k), _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), x0, a0);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), x1, b0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), x0, a1);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), x1, b1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), x0, a2);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), x1, b2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), x0, a3);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), x1, b3);
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), x0, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), x0, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), x0, a3);
  }
  float out[4];
  _mm_storeu_ps(out, hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)));
  for (int r = 0; r < 4; ++r) {
    float tail = 0.f;
    for (int64_t j = k; j < K; ++j) tail += w[r * K + j] * x[j];
    y[r] = out[r] + tail;
  }
#else
  for (int r = 0; r < 4; ++r) y[r] = dot(x, w + r * K, K);
#endif
}

// Rows at or above this count go to ATen's GEMM (MKL), whose packed blocking wins once a weight tile is reused by
// many rows; below it the weights stream once through `micro` with no dispatch and no packing (MKL repacks each
// weight at every call: at 8 rows the packing took 3x its multiply; measured whole steps on the development
// machine: 8 rows 1.6-2.0 ms ours vs 2.3-2.4 MKL, 32 rows 6.5-7.0 vs 5.8).
int64_t gemm_rows = 16;

// y [M, O] (row stride ldy) = x [M, K] (row stride ldx) @ w [O, K]^T
void matmul(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t O, float* y, int64_t ldy) {
  if (M >= gemm_rows) {
    const auto xs = at::from_blob(const_cast<float*>(x), {M, K}, {ldx, 1}, at::kFloat);
    const auto ws = at::from_blob(const_cast<float*>(w), {O, K}, at::kFloat);
    auto ys = at::from_blob(y, {M, O}, {ldy, 1}, at::kFloat);
    at::mm_out(ys, xs, ws.t());
    return;
  }
  int64_t o = 0;
  if (M == 1) {  // batch-1 decode: a matrix-vector product at memory bandwidth
    for (; o + 4 <= O; o += 4) row4(x, w + o * K, K, y + o);
    for (; o < O; ++o) y[o] = dot(x, w + o * K, K);
    return;
  }
  for (; o + 4 <= O; o += 4) {  // a tile of 4 weight rows (in L1 after the first pair) against every row of x
    const float* wo = w + o * K;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) micro<2>(x + m * ldx, ldx, wo, K, y + m * ldy + o, ldy);
    if (m < M) micro<1>(x + m * ldx, ldx, wo, K, y + m * ldy + o, ldy);
  }
  for (; o < O; ++o)
    for (int64_t m = 0; m < M; ++m) y[m * ldy + o] = dot(x + m * ldx, w + o * K, K);
}

const float* fp(const at::Tensor& t) { return t.data_ptr<float>(); }

// ---------------------------------------------------------------------------------------------- sampling

uint64_t next(uint64_t& state) {  // splitmix64
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double uniform(uint64_t& state) { return (next(state) >> 11) * (1.0 / 9007199254740992.0); }

// sampling.py probs_from_logits + sample for one row (no penalties): temperature, top-k, top-p, min-p, then a
// draw; temperature 0 is the argmax (the first maximum, as torch.argmax). `l` is overwritten.
int64_t sample(float* l, int64_t V, const std::vector<double>& p, uint64_t& state) {
  const double temperature = p[0], top_p = p[2], min_p = p[3];
  const int64_t top_k = p[1] > 0 && p[1] < V ? static_cast<int64_t>(p[1]) : V;
  if (temperature == 0.0) return std::max_element(l, l + V) - l;
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t i = 0; i < V; ++i) l[i] *= inv_t;
  const float mx = *std::max_element(l, l + V);
  std::vector<int64_t> order;
  if (top_k < V || top_p < 1.0) {  // keep the top-k, then the smallest prefix whose mass reaches top_p
    order.resize(V);
    for (int64_t i = 0; i < V; ++i) order[i] = i;
    auto desc = [&](int64_t a, int64_t b) { return l[a] > l[b]; };
    if (top_k < V) {
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(), desc);
      order.resize(top_k);
    } else {
      std::sort(order.begin(), order.end(), desc);
    }
    double z = 0.0;
    for (int64_t i : order) z += std::exp(static_cast<double>(l[i] - mx));
    double cum = 0.0;
    size_t keep = 0;
    for (; keep < order.size(); ++keep) {
      if (keep > 0 && cum >= top_p) break;
      cum += std::exp(static_cast<double>(l[order[keep]] - mx)) / z;
    }
    order.resize(keep);
  }
  // exp(l - max) over the kept tokens; min-p keeps those with p >= min_p * p_max, i.e. exp(l - max) >= min_p
  auto weight = [&](int64_t i) {
    const double w = std::exp(static_cast<double>(l[i] - mx));
    return w >= min_p ? w : 0.0;
  };
  double total = 0.0;
  if (order.empty()) {
    for (int64_t i = 0; i < V; ++i) total += weight(i);
  } else {
    for (int64_t i : order) total += weight(i);
  }
  double u = uniform(state) * total;
  if (order.empty()) {
    int64_t last = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double w = weight(i);
      if (w > 0) {
        last = i;
        if ((u -= w) < 0) return i;
      }
    }
    return last;
  }
  int64_t last = order[0];
  for (int64_t i : order) {
    const double w = weight(i);
    if (w > 0) {
      last = i;
      if ((u -= w) < 0) return i;
    }
  }
  return last;
}

// ------------------------------------------------------------------------------------------------ the model

// moe.py route()'s variants: scoring sigmoid | softmax; topk_method noaux_tc (the balancing bias steers the choice,
// groups scored by their best two) | greedy (no groups) | group_limited_greedy (groups scored by their best one).
enum Scoring { SIGMOID = 0, SOFTMAX = 1 };
enum Method { NOAUX_TC = 0, GREEDY = 1, GROUP_LIMITED_GREEDY = 2 };

struct Routing {
  int64_t n_experts = 0, top_k = 0, n_group = 1, topk_group = 1, scoring = SIGMOID, method = NOAUX_TC;
  bool norm_topk_prob = true;
  float route_scale = 1.f;

  // [n_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, scoring, method]
  static Routing of(const std::vector<double>& r) {
    TORCH_CHECK(r.size() == 8, "native: routing takes 8 numbers");
    Routing out;
    out.n_experts = r[0], out.top_k = r[1], out.n_group = r[2], out.topk_group = r[3];
    out.norm_topk_prob = r[4] != 0, out.route_scale = r[5], out.scoring = r[6], out.method = r[7];
    TORCH_CHECK(out.n_experts <= 512 && out.n_group <= 64 && out.top_k <= out.n_experts &&
                out.n_group >= 1 && out.n_experts % out.n_group == 0 && out.topk_group <= out.n_group &&
                (out.scoring == SIGMOID || out.scoring == SOFTMAX) && out.method >= NOAUX_TC &&
                out.method <= GROUP_LIMITED_GREEDY, "native: a routing this file does not cover");
    return out;
  }
};

// moe.py route() for one token: router logits [E] -> the scores (sigmoid or softmax), the top-k chosen on the
// scores (+ the balancing bias for noaux_tc; `bias` may be null), within the best groups; weights are the unbiased
// scores, renormalised over the k when norm_topk_prob, times route_scale. -> ids [k] in torch.topk's order.
void route(const Routing& r, const float* logits, const float* bias, int64_t* ids, float* weights) {
  const int64_t E = r.n_experts, k = r.top_k;
  float scores[512], chosen_by[512];
  if (r.scoring == SIGMOID) {
    for (int64_t j = 0; j < E; ++j) scores[j] = 1.f / (1.f + std::exp(-logits[j]));
  } else {
    const float mx = *std::max_element(logits, logits + E);
    float z = 0.f;
    for (int64_t j = 0; j < E; ++j) z += (scores[j] = std::exp(logits[j] - mx));
    for (int64_t j = 0; j < E; ++j) scores[j] /= z;
  }
  for (int64_t j = 0; j < E; ++j) chosen_by[j] = r.method == NOAUX_TC && bias ? scores[j] + bias[j] : scores[j];
  if (r.n_group > 1 && r.method != GREEDY) {
    const int64_t G = r.n_group, per = E / G;
    float gs[64];
    for (int64_t g = 0; g < G; ++g) {  // the group's best one, or best two summed
      float a = -std::numeric_limits<float>::infinity(), b = a;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const float v = chosen_by[j];
        if (v > a) {
          b = a;
          a = v;
        } else if (v > b) {
          b = v;
        }
      }
      gs[g] = r.method == NOAUX_TC ? a + b : a;
    }
    bool keep[64] = {false};
    for (int64_t t = 0; t < r.topk_group; ++t) {
      int64_t best = -1;
      for (int64_t g = 0; g < G; ++g)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = true;
    }
    for (int64_t g = 0; g < G; ++g)
      if (!keep[g])
        for (int64_t j = g * per; j < (g + 1) * per; ++j) chosen_by[j] = -std::numeric_limits<float>::infinity();
  }
  bool taken[512] = {false};
  float sum = 0.f;
  for (int64_t t = 0; t < k; ++t) {
    int64_t best = -1;
    for (int64_t j = 0; j < E; ++j)
      if (!taken[j] && (best < 0 || chosen_by[j] > chosen_by[best])) best = j;
    taken[best] = true;
    ids[t] = best;
    weights[t] = scores[best];
    sum += scores[best];
  }
  for (int64_t t = 0; t < k; ++t) {
    if (r.norm_topk_prob) weights[t] = weights[t] / (sum + 1e-20f);
    if (r.route_scale != 1.f) weights[t] *= r.route_scale;
  }
}

struct Layer {
  int64_t cache_layer = 0;
  bool moe = false;
  at::Tensor in_norm, w_in, q_a_norm, w_q_b, kv_a_norm, kv_b, w_o, post_norm;
  at::Tensor w13, w2;                       // dense FFN, or the shared experts of an MoE layer
  at::Tensor gate, bias, ew13, ew2;         // MoE: router [E, h], correction bias [E], experts [E, 2I, h], [E, h, I]
  at::Tensor enorm, hnorm, w_eh, head_norm; // MTP module only
};

at::Tensor get(const Tensors& t, const std::string& key, bool required = true) {
  auto it = t.find(key);
  if (it == t.end()) {
    TORCH_CHECK(!required, "native: missing weight ", key);
    return {};
  }
  TORCH_CHECK(it->second.scalar_type() == at::kFloat && it->second.is_contiguous() && it->second.device().is_cpu(),
              "native: ", key, " must be a contiguous fp32 CPU tensor");
  return it->second;
}

// Scratch space for one forward (grown on demand, reused between calls).
struct Scratch {
  std::vector<float> x, xn, y, q, qa, qcat, olat, o, a, f, t, act, scores, logits, h;
  std::vector<float> ex, ey;  // an expert's gathered rows and outputs
  std::vector<float> cat, mx, mh, mhid;  // the MTP module's input, its rows, its normed output, the main hidden it reads
  std::vector<int64_t> slot;
};

inline void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

class Model {
 public:
  Model(const Tensors& top, const std::vector<Tensors>& layers, const Tensors& mtp, const std::map<std::string, double>& cfg,
        at::Tensor kv, const std::vector<double>& routing)
      : kv_(kv) {
    auto c = [&](const char* k) { return cfg.at(k); };
    h_ = c("hidden_size");
    H_ = c("num_attention_heads");
    dn_ = c("qk_nope_head_dim");
    dr_ = c("qk_rope_head_dim");
    dv_ = c("v_head_dim");
    r_ = c("kv_lora_rank");
    q_lora_ = c("q_lora_rank");
    V_ = c("vocab_size");
    eps_ = c("rms_norm_eps");
    scale_ = c("softmax_scale");
    attention_factor_ = c("attention_factor");
    route_ = Routing::of(routing);
    embed_ = get(top, "embed");
    head_ = get(top, "head");
    norm_ = get(top, "norm");
    inv_freq_ = get(top, "inv_freq");
    for (const auto& t : layers) layers_.push_back(layer_of(t, layers_.size()));
    if (!mtp.empty()) {
      mtp_ = layer_of(mtp, layers_.size());
      mtp_.enorm = get(mtp, "enorm");
      mtp_.hnorm = get(mtp, "hnorm");
      mtp_.w_eh = get(mtp, "w_eh");
      mtp_.head_norm = get(mtp, "head_norm");
      has_mtp_ = true;
    }
    TORCH_CHECK(kv_.scalar_type() == at::kFloat && kv_.is_contiguous() && kv_.dim() == 4 && kv_.size(3) == r_ + dr_,
                "native: the cache must be contiguous fp32 [layers, blocks, block_size, kv_lora_rank + rope dim]");
    block_size_ = kv_.size(2);
  }

  // One forward over packed rows (row i: token[i] at position pos[i] of sequence seq[i], whose blocks are
  // tables[seq[i]]): writes every row's latents into the cache. -> (the logits of `logit_rows` [M, V], the final
  // normed hidden states of every row [N, h], which the MTP module reads).
  std::pair<at::Tensor, at::Tensor> forward(const std::vector<int64_t>& token, const std::vector<int64_t>& pos,
                                            const std::vector<int64_t>& seq, const std::vector<std::vector<int64_t>>& tables,
                                            const std::vector<int64_t>& logit_rows) {
    const int64_t N = token.size();
    check_rows(N, pos, seq, tables);
    run_main(token.data(), pos.data(), seq.data(), N, tables);
    auto logits = at::empty({static_cast<int64_t>(logit_rows.size()), V_}, at::kFloat);
    head(s_.h.data(), logit_rows, logits.data_ptr<float>());
    auto hidden = at::empty({N, h_}, at::kFloat);
    std::memcpy(hidden.data_ptr<float>(), s_.h.data(), N * h_ * sizeof(float));
    return {logits, hidden};
  }

  // The MTP module (model.py infer_mtp) over rows (next[i] = t_{i+1} at position pos[i] of sequence seq[i], with
  // hidden[i] the main model's normed hidden state there): writes its cache layer, returns the logits of
  // `logit_rows` (each predicts t_{i+2}).
  at::Tensor mtp(const std::vector<int64_t>& next, const std::vector<int64_t>& pos, const std::vector<int64_t>& seq,
                 const std::vector<std::vector<int64_t>>& tables, const at::Tensor& hidden,
                 const std::vector<int64_t>& logit_rows) {
    const int64_t N = next.size();
    check_rows(N, pos, seq, tables);
    TORCH_CHECK(has_mtp_, "native.mtp: the model has no MTP module");
    TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.is_contiguous() && hidden.dim() == 2 &&
                hidden.size(0) == N && hidden.size(1) == h_, "native.mtp: hidden must be [rows, hidden_size] fp32");
    run_mtp(next.data(), pos.data(), seq.data(), N, hidden.data_ptr<float>(), tables);
    auto logits = at::empty({static_cast<int64_t>(logit_rows.size()), V_}, at::kFloat);
    head(s_.mh.data(), logit_rows, logits.data_ptr<float>());
    return logits;
  }

  // Up to `steps` decode steps of B sequences: row b feeds token[b] at pos[b], samples its next token with its
  // parameters (sampling[b] = temperature, top_k, top_p, min_p; temperature 0 is greedy) and its random state
  // rng[b], and stops after limit[b] tokens or on a token of stops[b]. -> each row's tokens, the random states.
  std::pair<std::vector<std::vector<int64_t>>, std::vector<uint64_t>> decode(
      std::vector<int64_t> token, std::vector<int64_t> pos, const std::vector<std::vector<int64_t>>& tables,
      const std::vector<int64_t>& limit, const std::vector<std::vector<int64_t>>& stops,
      const std::vector<std::vector<double>>& sampling, std::vector<uint64_t> rng, int64_t steps) {
    const int64_t B = token.size();
    TORCH_CHECK(pos.size() == token.size() && tables.size() == token.size() && limit.size() == token.size() &&
                stops.size() == token.size() && sampling.size() == token.size() && rng.size() == token.size(),
                "native.decode: per-sequence inputs disagree");
    std::vector<std::vector<int64_t>> out(B);
    std::vector<int64_t> active, tok, ps, rows;
    for (int64_t b = 0; b < B; ++b)
      if (limit[b] > 0) active.push_back(b);
    for (int64_t step = 0; step < steps && !active.empty(); ++step) {
      const int64_t N = active.size();
      tok.resize(N);
      ps.resize(N);
      rows.resize(N);
      for (int64_t i = 0; i < N; ++i) {
        tok[i] = token[active[i]];
        ps[i] = pos[active[i]];
        rows[i] = i;
      }
      check_positions(ps, active, tables);
      run_main(tok.data(), ps.data(), active.data(), N, tables);
      grow(s_.logits, N * V_);
      head(s_.h.data(), rows, s_.logits.data());
      std::vector<int64_t> still;
      for (int64_t i = 0; i < N; ++i) {
        const int64_t b = active[i];
        const int64_t t = sample(s_.logits.data() + i * V_, V_, sampling[b], rng[b]);
        out[b].push_back(t);
        if (!is_stop(stops[b], t) && static_cast<int64_t>(out[b].size()) < limit[b]) {
          token[b] = t;
          pos[b] += 1;
          still.push_back(b);
        }
      }
      active.swap(still);
    }
    return {out, rng};
  }

  // Up to `steps` greedy speculative steps (MTP drafts one token): sequence b feeds token[b] at pos[b] and its
  // draft[b] (-1: none) after it, keeps the draft while it is the target's argmax, adds the target's next token,
  // runs the MTP module over the positions that stay valid and drafts again from the last one. Stops like
  // `decode`. The MTP cache must be filled up to pos[b] - 1 (the Python step keeps it so).
  // -> (tokens of each sequence, its last draft or -1, drafts verified, drafts accepted)
  std::tuple<std::vector<std::vector<int64_t>>, std::vector<int64_t>, int64_t, int64_t> speculate(
      std::vector<int64_t> token, std::vector<int64_t> pos, std::vector<int64_t> draft,
      const std::vector<std::vector<int64_t>>& tables, const std::vector<int64_t>& limit,
      const std::vector<std::vector<int64_t>>& stops, int64_t steps) {
    TORCH_CHECK(has_mtp_, "native.speculate: the model has no MTP module");
    const int64_t B = token.size();
    TORCH_CHECK(pos.size() == token.size() && draft.size() == token.size() && tables.size() == token.size() &&
                limit.size() == token.size() && stops.size() == token.size(), "native.speculate: inputs disagree");
    std::vector<std::vector<int64_t>> out(B);
    int64_t drafted = 0, accepted = 0;
    std::vector<int64_t> active;
    for (int64_t b = 0; b < B; ++b)
      if (limit[b] > 0) active.push_back(b);
    std::vector<int64_t> tok, ps, sq, first, rows, m_next, m_pos, m_seq, m_rows;
    for (int64_t step = 0; step < steps && !active.empty(); ++step) {
      tok.clear(), ps.clear(), sq.clear(), first.clear();
      for (int64_t b : active) {
        first.push_back(tok.size());
        tok.push_back(token[b]), ps.push_back(pos[b]), sq.push_back(b);
        if (draft[b] >= 0) tok.push_back(draft[b]), ps.push_back(pos[b] + 1), sq.push_back(b);
      }
      const int64_t N = tok.size();
      check_positions(ps, sq, tables);
      run_main(tok.data(), ps.data(), sq.data(), N, tables);
      rows.resize(N);
      for (int64_t i = 0; i < N; ++i) rows[i] = i;
      grow(s_.logits, N * V_);
      head(s_.h.data(), rows, s_.logits.data());
      auto argmax = [&](int64_t row) { return argmax_row(s_.logits.data() + row * V_); };
      m_next.clear(), m_pos.clear(), m_seq.clear(), m_rows.clear();
      std::vector<int64_t> still;
      for (size_t a = 0; a < active.size(); ++a) {
        const int64_t b = active[a], r = first[a];
        std::vector<int64_t> fresh{argmax(r)};
        if (draft[b] >= 0) {
          ++drafted;
          if (draft[b] == fresh[0]) {
            ++accepted;
            fresh.push_back(argmax(r + 1));
          }
        }
        bool done = false;
        int64_t kept = 0;
        for (int64_t t : fresh) {
          out[b].push_back(t);
          ++kept;
          if (is_stop(stops[b], t) || static_cast<int64_t>(out[b].size()) >= limit[b]) {
            done = true;
            break;
          }
        }
        draft[b] = -1;
        if (done) continue;
        for (int64_t j = 0; j < kept; ++j) {  // MTP at the fed positions that stay valid: h_i with t_{i+1}
          m_next.push_back(fresh[j]), m_pos.push_back(pos[b] + j), m_seq.push_back(b), m_rows.push_back(r + j);
        }
        token[b] = fresh[kept - 1];
        pos[b] += kept;
        still.push_back(b);
      }
      if (!m_next.empty()) {
        std::vector<int64_t> room(B);
        for (int64_t b = 0; b < B; ++b) room[b] = limit[b] - static_cast<int64_t>(out[b].size());
        draft_after(m_next, m_pos, m_seq, m_rows, room, draft, tables);
      }
      active.swap(still);
    }
    return {out, draft, drafted, accepted};
  }

 private:
  at::Tensor kv_, embed_, head_, norm_, inv_freq_;
  std::vector<Layer> layers_;
  Layer mtp_;
  bool has_mtp_ = false;
  int64_t h_, H_, dn_, dr_, dv_, r_, q_lora_, V_, block_size_;
  float eps_, scale_, attention_factor_;
  Routing route_;
  Scratch s_;
  std::vector<float> cos_, sin_;

  Layer layer_of(const Tensors& t, int64_t cache_layer) {
    Layer l;
    l.cache_layer = cache_layer;
    l.in_norm = get(t, "in_norm");
    l.w_in = get(t, "w_in");
    l.q_a_norm = get(t, "q_a_norm", false);
    l.w_q_b = get(t, "w_q_b", false);
    l.kv_a_norm = get(t, "kv_a_norm");
    l.kv_b = get(t, "kv_b");
    l.w_o = get(t, "w_o");
    l.post_norm = get(t, "post_norm");
    l.w13 = get(t, "w13");
    l.w2 = get(t, "w2");
    l.gate = get(t, "gate", false);
    l.moe = l.gate.defined();
    if (l.moe) {
      l.bias = get(t, "bias", false);  // only noaux_tc routing has the balancing bias
      l.ew13 = get(t, "ew13");
      l.ew2 = get(t, "ew2");
    }
    return l;
  }

  float* cache_entry(int64_t layer, const std::vector<int64_t>& table, int64_t p) {
    const int64_t block = table[p / block_size_];
    return kv_.data_ptr<float>() + ((layer * kv_.size(1) + block) * block_size_ + p % block_size_) * (r_ + dr_);
  }

  // cos/sin of position p -> cos_, sin_ [dr / 2] (YaRN's attention factor folded in, as RotaryEmbedding does)
  void rotary(int64_t p) {
    const int64_t half = dr_ / 2;
    cos_.resize(half);
    sin_.resize(half);
    const float* f = fp(inv_freq_);
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(p) * f[i];
      cos_[i] = std::cos(a);
      sin_[i] = std::sin(a);
      if (attention_factor_ != 1.f) {
        cos_[i] *= attention_factor_;
        sin_[i] *= attention_factor_;
      }
    }
  }

  // Rotate the interleaved pairs of x [dr] and write them de-interleaved to y (apply_rope, interleaved=True).
  void rope(const float* x, float* y) const {
    const int64_t half = dr_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      y[i] = x1 * cos_[i] - x2 * sin_[i];
      y[half + i] = x2 * cos_[i] + x1 * sin_[i];
    }
  }

  void run_main(const int64_t* token, const int64_t* pos, const int64_t* seq, int64_t N,
                const std::vector<std::vector<int64_t>>& tables) {
    grow(s_.x, N * h_);
    const float* E = fp(embed_);
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(token[i] >= 0 && token[i] < V_, "native: token id out of range");
      std::memcpy(s_.x.data() + i * h_, E + token[i] * h_, h_ * sizeof(float));
    }
    for (const auto& layer : layers_) block(layer, s_.x.data(), pos, seq, N, tables, layer.cache_layer);
    grow(s_.h, N * h_);
    for (int64_t i = 0; i < N; ++i) rms_norm(s_.x.data() + i * h_, fp(norm_), h_, eps_, s_.h.data() + i * h_);
  }

  // The output head over the rows `rows` of hidden [.., h] -> out [M, V]
  void head(const float* hidden, const std::vector<int64_t>& rows, float* out) {
    const int64_t M = rows.size();
    if (M == 0) return;
    bool contiguous = true;
    for (int64_t i = 0; i < M; ++i) contiguous = contiguous && rows[i] == rows[0] + i;
    const float* src = hidden + rows[0] * h_;
    if (!contiguous) {
      grow(s_.ex, M * h_);
      for (int64_t i = 0; i < M; ++i) std::memcpy(s_.ex.data() + i * h_, hidden + rows[i] * h_, h_ * sizeof(float));
      src = s_.ex.data();
    }
    matmul(src, h_, M, h_, fp(head_), V_, out, V_);
  }

  int64_t argmax_row(const float* l) const { return std::max_element(l, l + V_) - l; }

  // The MTP module over the positions a speculative step kept (row i: t_{i+1} = next[i] at pos[i] of sequence
  // seq[i], with the main model's hidden state in row rows[i] of s_.h); each sequence with room for two more
  // tokens drafts from its last row (draft[b], else -1).
  void draft_after(const std::vector<int64_t>& next, const std::vector<int64_t>& pos, const std::vector<int64_t>& seq,
                   const std::vector<int64_t>& rows, const std::vector<int64_t>& room, std::vector<int64_t>& draft,
                   const std::vector<std::vector<int64_t>>& tables) {
    const int64_t M = next.size();
    grow(s_.mhid, M * h_);
    for (int64_t i = 0; i < M; ++i) std::memcpy(s_.mhid.data() + i * h_, s_.h.data() + rows[i] * h_, h_ * sizeof(float));
    run_mtp(next.data(), pos.data(), seq.data(), M, s_.mhid.data(), tables);
    std::vector<int64_t> last, drafting;
    for (int64_t i = 0; i < M; ++i) {
      const int64_t b = seq[i];
      if ((i + 1 == M || seq[i + 1] != b) && room[b] > 1) last.push_back(i), drafting.push_back(b);
    }
    grow(s_.logits, static_cast<int64_t>(last.size()) * V_);
    head(s_.mh.data(), last, s_.logits.data());
    for (size_t i = 0; i < drafting.size(); ++i) draft[drafting[i]] = argmax_row(s_.logits.data() + i * V_);
  }

  static bool is_stop(const std::vector<int64_t>& stops, int64_t t) {
    return std::find(stops.begin(), stops.end(), t) != stops.end();
  }

  void check_rows(int64_t N, const std::vector<int64_t>& pos, const std::vector<int64_t>& seq,
                  const std::vector<std::vector<int64_t>>& tables) const {
    TORCH_CHECK(static_cast<int64_t>(pos.size()) == N && static_cast<int64_t>(seq.size()) == N, "native: rows disagree");
    for (int64_t s : seq) TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(tables.size()), "native: no block table for a row");
    check_positions(pos, seq, tables);
  }

  // Every position must have a block in its table, and every block must be in the cache.
  void check_positions(const std::vector<int64_t>& pos, const std::vector<int64_t>& seq,
                       const std::vector<std::vector<int64_t>>& tables) const {
    for (size_t i = 0; i < pos.size(); ++i) {
      const auto& table = tables[seq[i]];
      TORCH_CHECK(pos[i] >= 0 && pos[i] / block_size_ < static_cast<int64_t>(table.size()),
                  "native: position ", pos[i], " is past its block table");
      const int64_t block = table[pos[i] / block_size_];
      TORCH_CHECK(block >= 0 && block < kv_.size(1), "native: block id ", block, " is not in the cache");
    }
  }

  // The MTP module over N rows -> s_.mh [N, h] (shared_head.norm of its output); writes its cache layer.
  void run_mtp(const int64_t* next, const int64_t* pos, const int64_t* seq, int64_t N, const float* hidden,
               const std::vector<std::vector<int64_t>>& tables) {
    const float* E = fp(embed_);
    grow(s_.cat, N * 2 * h_);
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(next[i] >= 0 && next[i] < V_, "native: token id out of range");
      rms_norm(E + next[i] * h_, fp(mtp_.enorm), h_, eps_, s_.cat.data() + i * 2 * h_);
      rms_norm(hidden + i * h_, fp(mtp_.hnorm), h_, eps_, s_.cat.data() + i * 2 * h_ + h_);
    }
    grow(s_.mx, N * h_);
    matmul(s_.cat.data(), 2 * h_, N, 2 * h_, fp(mtp_.w_eh), h_, s_.mx.data(), h_);
    block(mtp_, s_.mx.data(), pos, seq, N, tables, mtp_.cache_layer);
    grow(s_.mh, N * h_);
    for (int64_t i = 0; i < N; ++i) rms_norm(s_.mx.data() + i * h_, fp(mtp_.head_norm), h_, eps_, s_.mh.data() + i * h_);
  }

  // x [N, h] <- block(x): MLA then the FFN, each with its residual.
  void block(const Layer& L, float* x, const int64_t* pos, const int64_t* seq, int64_t N,
             const std::vector<std::vector<int64_t>>& tables, int64_t cache_layer) {
    attention(L, x, pos, seq, N, tables, cache_layer);
    grow(s_.xn, N * h_);
    for (int64_t i = 0; i < N; ++i) rms_norm(x + i * h_, fp(L.post_norm), h_, eps_, s_.xn.data() + i * h_);
    grow(s_.f, N * h_);
    if (L.moe) {
      moe(L, s_.xn.data(), N, s_.f.data());
    } else {
      mlp(fp(L.w13), fp(L.w2), L.w2.size(1), s_.xn.data(), N, s_.f.data(), nullptr);
    }
    for (int64_t i = 0; i < N; ++i) add(x + i * h_, s_.f.data() + i * h_, h_);
  }

  // Absorbed MLA (mla.py MLA.infer): x [N, h] += o_proj(attention)
  void attention(const Layer& L, float* x, const int64_t* pos, const int64_t* seq, int64_t N,
                 const std::vector<std::vector<int64_t>>& tables, int64_t cache_layer) {
    const int64_t dq = dn_ + dr_, e = r_ + dr_;
    const int64_t d_in = L.w_in.size(0);
    grow(s_.xn, N * h_);
    for (int64_t i = 0; i < N; ++i) rms_norm(x + i * h_, fp(L.in_norm), h_, eps_, s_.xn.data() + i * h_);
    grow(s_.y, N * d_in);
    matmul(s_.xn.data(), h_, N, h_, fp(L.w_in), d_in, s_.y.data(), d_in);
    const int64_t q_width = q_lora_ > 0 ? q_lora_ : H_ * dq;  // [q or q_a | c_KV | k_pe]
    const float* q = s_.y.data();
    int64_t ldq = d_in;
    if (q_lora_ > 0) {
      grow(s_.qa, N * q_lora_);
      for (int64_t i = 0; i < N; ++i)
        rms_norm(s_.y.data() + i * d_in, fp(L.q_a_norm), q_lora_, eps_, s_.qa.data() + i * q_lora_);
      grow(s_.q, N * H_ * dq);
      matmul(s_.qa.data(), q_lora_, N, q_lora_, fp(L.w_q_b), H_ * dq, s_.q.data(), H_ * dq);
      q = s_.q.data();
      ldq = H_ * dq;
    }
    // The new latents into the cache, and the queries in the latent space: qcat [N, H, r + dr]
    grow(s_.qcat, N * H_ * e);
    const float* kvb = fp(L.kv_b);  // [H, dn + dv, r]
    for (int64_t i = 0; i < N; ++i) {
      rotary(pos[i]);
      const float* yi = s_.y.data() + i * d_in;
      float* entry = cache_entry(cache_layer, tables[seq[i]], pos[i]);
      rms_norm(yi + q_width, fp(L.kv_a_norm), r_, eps_, entry);
      rope(yi + q_width + r_, entry + r_);
      for (int64_t hd = 0; hd < H_; ++hd) {
        const float* qh = q + i * ldq + hd * dq;
        float* qc = s_.qcat.data() + (i * H_ + hd) * e;
        std::fill(qc, qc + r_, 0.f);
        const float* wuk = kvb + hd * (dn_ + dv_) * r_;  // W_UK[h]: [dn, r]
        for (int64_t j = 0; j < dn_; ++j) axpy(qh[j], wuk + j * r_, qc, r_);
        rope(qh + dn_, qc + r_);
      }
    }
    // Attention over each row's cached slots [0, pos], one latent key shared by every head: per block of the
    // cache, the heads' scores are one small matmul against the block's entries.
    grow(s_.olat, N * H_ * r_);
    std::vector<float> inv(H_);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t S = pos[i] + 1;
      grow(s_.scores, H_ * S);
      const auto& table = tables[seq[i]];
      const float* qi = s_.qcat.data() + i * H_ * e;
      for (int64_t s0 = 0; s0 < S; s0 += block_size_) {
        const int64_t n = std::min(block_size_, S - s0);
        matmul(qi, e, H_, e, cache_entry(cache_layer, table, s0), n, s_.scores.data() + s0, S);
      }
      for (int64_t hd = 0; hd < H_; ++hd) {
        float* sc = s_.scores.data() + hd * S;
        for (int64_t j = 0; j < S; ++j) sc[j] *= scale_;
        inv[hd] = 1.f / exp_shifted(sc, S, *std::max_element(sc, sc + S));
      }
      float* oi = s_.olat.data() + i * H_ * r_;
      std::fill(oi, oi + H_ * r_, 0.f);
      for (int64_t s0 = 0; s0 < S; s0 += block_size_) {
        const int64_t n = std::min(block_size_, S - s0);
        const float* entries = cache_entry(cache_layer, table, s0);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t hd = 0; hd < H_; ++hd) axpy(s_.scores[hd * S + s0 + j], entries + j * e, oi + hd * r_, r_);
      }
      for (int64_t hd = 0; hd < H_; ++hd)
        for (int64_t j = 0; j < r_; ++j) oi[hd * r_ + j] *= inv[hd];
    }
    // W_UV per head, then o_proj
    grow(s_.o, N * H_ * dv_);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t hd = 0; hd < H_; ++hd)
        matmul(s_.olat.data() + (i * H_ + hd) * r_, r_, 1, r_, kvb + (hd * (dn_ + dv_) + dn_) * r_, dv_,
               s_.o.data() + (i * H_ + hd) * dv_, dv_);
    grow(s_.a, N * h_);
    matmul(s_.o.data(), H_ * dv_, N, H_ * dv_, fp(L.w_o), h_, s_.a.data(), h_);
    for (int64_t i = 0; i < N; ++i) add(x + i * h_, s_.a.data() + i * h_, h_);
  }

  // SwiGLU of x [N, h] with w13 [2I, h], w2 [h, I] -> y [N, h]; `scale` [N] multiplies the activations.
  void mlp(const float* w13, const float* w2, int64_t I, const float* x, int64_t N, float* y, const float* scale) {
    grow(s_.t, N * 2 * I);
    grow(s_.act, N * I);
    matmul(x, h_, N, h_, w13, 2 * I, s_.t.data(), 2 * I);
    for (int64_t i = 0; i < N; ++i) silu_mul(s_.t.data() + i * 2 * I, I, scale ? scale[i] : 1.f, s_.act.data() + i * I);
    matmul(s_.act.data(), I, N, I, w2, h_, y, h_);
  }

  // DeepSeekMoE (moe.py MoE.infer): shared experts + the k routed experts of each row, grouped by expert.
  void moe(const Layer& L, const float* x, int64_t N, float* y) {
    const int64_t E = route_.n_experts, k = route_.top_k, I = L.ew2.size(2);
    grow(s_.scores, N * E);
    matmul(x, h_, N, h_, fp(L.gate), E, s_.scores.data(), E);  // router logits
    std::vector<int64_t> ids(N * k);
    std::vector<float> wts(N * k);
    for (int64_t i = 0; i < N; ++i) route(route_, s_.scores.data() + i * E, L.bias.defined() ? fp(L.bias) : nullptr, ids.data() + i * k,
            wts.data() + i * k);
    mlp(fp(L.w13), fp(L.w2), L.w2.size(1), x, N, y, nullptr);  // the shared experts
    const float* W13 = fp(L.ew13);
    const float* W2 = fp(L.ew2);
    // (row, weight) pairs grouped by expert, in expert order (as the training forward's dispatch adds them)
    std::vector<std::vector<std::pair<int64_t, float>>> by(E);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < k; ++t) by[ids[i * k + t]].push_back({i, wts[i * k + t]});
    for (int64_t ex = 0; ex < E; ++ex) {
      const int64_t n = by[ex].size();
      if (!n) continue;
      grow(s_.ex, n * h_);
      grow(s_.ey, n * h_);
      std::vector<float> sc(n);
      for (int64_t j = 0; j < n; ++j) {
        std::memcpy(s_.ex.data() + j * h_, x + by[ex][j].first * h_, h_ * sizeof(float));
        sc[j] = by[ex][j].second;
      }
      mlp(W13 + ex * 2 * I * h_, W2 + ex * h_ * I, I, s_.ex.data(), n, s_.ey.data(), sc.data());
      for (int64_t j = 0; j < n; ++j) add(y + by[ex][j].first * h_, s_.ey.data() + j * h_, h_);
    }
  }

};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Model>(m, "Model")
      .def(pybind11::init<const Tensors&, const std::vector<Tensors>&, const Tensors&, const std::map<std::string, double>&,
                          at::Tensor, const std::vector<double>&>())
      // The GIL is released while the step computes: a server's event loop goes on meanwhile.
      .def("forward", &Model::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("mtp", &Model::mtp, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("decode", &Model::decode, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("speculate", &Model::speculate, pybind11::call_guard<pybind11::gil_scoped_release>());
  // moe.py route() on router logits [N, E] (the parity test's entry point) -> (weights [N, k], expert ids [N, k])
  m.def("route", [](const at::Tensor& logits, const c10::optional<at::Tensor>& bias, const std::vector<double>& routing) {
    const Routing r = Routing::of(routing);
    const auto s = logits.contiguous();
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(1) == r.n_experts, "route: logits [N, E] fp32");
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
      b = bias->contiguous();
      TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == r.n_experts, "route: bias [E] fp32");
    }
    const int64_t N = s.size(0);
    auto w = at::empty({N, r.top_k}, at::kFloat);
    auto ids = at::empty({N, r.top_k}, at::kLong);
    for (int64_t i = 0; i < N; ++i)
      route(r, s.data_ptr<float>() + i * r.n_experts, b.defined() ? b.data_ptr<float>() : nullptr,
            ids.data_ptr<int64_t>() + i * r.top_k, w.data_ptr<float>() + i * r.top_k);
    return std::make_pair(w, ids);
  });
  // One token from each row of logits [M, V] with that row's parameters and random state (the Python step's rows)
  m.def("sample_rows", [](const at::Tensor& logits, const std::vector<std::vector<double>>& sampling,
                          std::vector<uint64_t> rng) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(0) == static_cast<int64_t>(rng.size()) &&
                sampling.size() == rng.size(), "sample_rows: logits [M, V] fp32 and M parameters and states");
    const auto l = logits.contiguous();
    const int64_t M = l.size(0), V = l.size(1);
    std::vector<int64_t> out(M);
    std::vector<float> row(V);
    for (int64_t i = 0; i < M; ++i) {
      std::memcpy(row.data(), l.data_ptr<float>() + i * V, V * sizeof(float));
      out[i] = sample(row.data(), V, sampling[i], rng[i]);
    }
    return std::make_pair(out, rng);
  });
  m.def("set_gemm_rows", [](int64_t n) { gemm_rows = n; });
  m.def("matmul", [](const at::Tensor& x, const at::Tensor& w, int64_t reps) {
    auto y = at::empty({x.size(0), w.size(0)}, at::kFloat);
    for (int64_t i = 0; i < reps; ++i)
      matmul(x.data_ptr<float>(), x.size(1), x.size(0), x.size(1), w.data_ptr<float>(), w.size(0), y.data_ptr<float>(), w.size(0));
    return y;
  });
}
