// irformer's fused CPU inference kernels (irformer.cpu_kernels).
//
// Window self-attention: one call does what the eager path needs eight tensor
// passes for: split the qkv projection into heads, scale q, q k^T +
// relative-position bias (+ the shifted-window mask on the windows that have
// one), softmax, times v, and merge the heads back. Given the feature map
// instead of windows, it also does the cyclic shift and window partition on the
// way in and their inverses on the way out by address arithmetic; with
// kv_window it is HAT's overlapping cross-attention (keys/values from the
// co-centred larger window, zeros outside the map). Each (window, head) pair is
// copied to fp32 (or bf16-pair) buffers that stay in L1/L2, so only the qkv
// input and the output travel through memory; scores, softmax and sums are
// fp32 whatever the storage type. With AVX-512 and 64, 256 or 576 keys the
// scores of one or four query rows live in registers (a register-blocked
// micro-kernel); other shapes and CPUs take a portable loop.
//
// LN* / i-LN: per-sample statistics and the normalisation, one call each.
#include <torch/extension.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxTokens = 256;    // query tokens per window
constexpr int64_t kMaxKvTokens = 1024;  // key/value tokens per window (HAT's OCAB: 576)
constexpr int64_t kMaxHeadDim = 64;
constexpr float kLog2e = 1.4426950408889634f;

struct Job {
  const void* qkv;        // (windows, n, 3C) or (images, H, W, 3C), T
  const float* bias;      // (heads, n, n_kv)
  const float* mask;      // (mask_windows, n, n) or nullptr
  const uint8_t* masked;  // (mask_windows,): 1 where that window's mask is not all zero
  void* out;              // qkv's layout with C channels, T
  int64_t n, channels, heads, mask_windows;
  float scale;
  // Map layout when window > 0: windows of window x window tokens, row-major
  // per image, of the map cyclically shifted up/left by `shift`.
  int64_t height = 0, width = 0, window = 0, shift = 0;
  // Cross-attention (HAT's OCAB) when kv_window > 0: keys/values from the
  // co-centred kv_window x kv_window window, zeros outside the map.
  int64_t kv_window = 0, n_kv = 0;

  // Token index (into qkv / out rows) of token t of window w.
  int64_t token(int64_t w, int64_t t) const {
    if (window == 0) return w * n + t;
    const int64_t cols = width / window, per_image = (height / window) * cols;
    const int64_t image = w / per_image, wi = w % per_image;
    const int64_t r = ((wi / cols) * window + t / window + shift) % height;
    const int64_t c = ((wi % cols) * window + t % window + shift) % width;
    return (image * height + r) * width + c;
  }

  // Token index of key/value t of window w; -1 outside the map (zero k and v).
  int64_t kv_token(int64_t w, int64_t t) const {
    if (kv_window == 0) return token(w, t);
    const int64_t cols = width / window, per_image = (height / window) * cols;
    const int64_t image = w / per_image, wi = w % per_image, pad = (kv_window - window) / 2;
    const int64_t r = (wi / cols) * window - pad + t / kv_window;
    const int64_t c = (wi % cols) * window - pad + t % kv_window;
    if (r < 0 || r >= height || c < 0 || c >= width) return -1;
    return (image * height + r) * width + c;
  }

  const float* window_mask(int64_t w) const {
    if (mask == nullptr) return nullptr;
    const int64_t mw = w % mask_windows;
    return masked[mw] ? mask + mw * n * n : nullptr;
  }
};

// fp32 copies of one (window, head): q scaled (n x d), k transposed (d x n_kv),
// v padded to dp columns (n_kv x dp).
struct Tile {
  std::vector<float> q, k_t, v, p;
  int64_t dp;
  explicit Tile(int64_t d)
      : q(kMaxTokens * kMaxHeadDim),
        k_t(kMaxHeadDim * kMaxKvTokens),
        v(kMaxKvTokens * kMaxHeadDim),
        p(4 * kMaxKvTokens),
        dp((d + 15) / 16 * 16) {}

  // tokens / kv_tokens: token indices of the window's queries / keys (-1:
  // zero key and value); base: qkv + head offset.
  template <typename T>
  void load(const T* base, const int64_t* tokens, const int64_t* kv_tokens, const Job& job,
            int64_t d) {
    const int64_t row = 3 * job.channels, n = job.n, n_kv = job.n_kv;
    for (int64_t j = 0; j < n; ++j) {
      const T* tok = base + tokens[j] * row;
      for (int64_t c = 0; c < d; ++c) q[j * d + c] = static_cast<float>(tok[c]) * job.scale;
    }
    for (int64_t j = 0; j < n_kv; ++j) {
      const T* tok = kv_tokens[j] < 0 ? nullptr : base + kv_tokens[j] * row;
      for (int64_t c = 0; c < d; ++c) {
        k_t[c * n_kv + j] = tok ? static_cast<float>(tok[job.channels + c]) : 0.f;
        v[j * dp + c] = tok ? static_cast<float>(tok[2 * job.channels + c]) : 0.f;
      }
      for (int64_t c = d; c < dp; ++c) v[j * dp + c] = 0.f;
    }
  }
};

#if defined(__AVX512F__)
// exp(x) for x <= 0 (softmax arguments): 2^t = 2^floor(t) * P(frac(t)), P the
// degree-7 Taylor polynomial of 2^f (relative error < 2e-6); scalef applies
// the power of two.
inline __m512 exp_nonpositive(__m512 x) {
  // max(-126, t) with t second: vmaxps returns its second operand when either is
  // NaN, so NaN scores stay NaN (as in PyTorch's softmax) instead of becoming 2^-126.
  __m512 t = _mm512_max_ps(_mm512_set1_ps(-126.f), _mm512_mul_ps(x, _mm512_set1_ps(kLog2e)));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.5252734e-5f), _mm512_set1_ps(1.5403530e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, whole);
}

// One row of scores held in NB registers -> exp(score - max) in place; returns
// 1 / their sum (the softmax normaliser, applied to the outputs at the end).
template <int NB>
inline float softmax_numerators(__m512 (&row)[NB]) {
  __m512 top = row[0];
#pragma GCC unroll 16
  for (int b = 1; b < NB; ++b) top = _mm512_max_ps(top, row[b]);
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) {
    row[b] = exp_nonpositive(_mm512_sub_ps(row[b], shift));
    sum = _mm512_add_ps(sum, row[b]);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// R query rows [i0, i0 + R) of one (window, head), NB * 16 tokens, head dim
// padded to DV * 16: writes R rows of DV * 16 outputs (already divided by the
// softmax sums) to o.
template <int NB, int R, int DV>
void rows_avx512(const Tile& tile, const float* bias, const float* mask, int64_t i0, int64_t d,
                 float* p, float* o) {
  constexpr int n = NB * 16;
  __m512 s[R][NB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      s[r][b] = _mm512_loadu_ps(bias + (i0 + r) * n + 16 * b);
      if (mask != nullptr)
        s[r][b] = _mm512_add_ps(s[r][b], _mm512_loadu_ps(mask + (i0 + r) * n + 16 * b));
    }
  const float* q = tile.q.data();
  const float* k_t = tile.k_t.data();
  for (int64_t c = 0; c < d; ++c) {
    __m512 qb[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) qb[r] = _mm512_set1_ps(q[(i0 + r) * d + c]);
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const __m512 kv = _mm512_loadu_ps(k_t + c * n + 16 * b);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) s[r][b] = _mm512_fmadd_ps(qb[r], kv, s[r][b]);
    }
  }
  float inv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    inv[r] = softmax_numerators<NB>(s[r]);
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(p + r * n + 16 * b, s[r][b]);
  }
  __m512 acc[R][DV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) acc[r][x] = _mm512_setzero_ps();
  const float* v = tile.v.data();
  for (int j = 0; j < n; ++j) {
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) {
      const __m512 vv = _mm512_loadu_ps(v + j * DV * 16 + 16 * x);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r][x] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * n + j]), vv, acc[r][x]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x)
      _mm512_storeu_ps(o + r * DV * 16 + 16 * x,
                       _mm512_mul_ps(acc[r][x], _mm512_set1_ps(inv[r])));
}

template <int NB, int R, int DV>
struct Fp32Rows {
  static constexpr auto run = &rows_avx512<NB, R, DV>;
};

// The micro-kernel instance Rows<NB, R, DV>::run for n queries, n_kv keys and
// head dim d (64 keys: 4 query rows per call; 256 or 576 keys: 1) and its row
// count, or {nullptr, 0} for shapes without one.
template <template <int, int, int> class Rows>
auto pick_rows(int64_t n, int64_t n_kv, int64_t d)
    -> std::pair<std::remove_const_t<decltype(Rows<4, 4, 1>::run)>, int> {
  const int64_t keys = n_kv == 64 && n % 4 == 0 ? 0 : n_kv == 256 ? 10 : n_kv == 576 ? 20 : 100;
  switch (keys + (d + 15) / 16) {
    case 1: return {Rows<4, 4, 1>::run, 4};
    case 2: return {Rows<4, 4, 2>::run, 4};
    case 3: return {Rows<4, 4, 3>::run, 4};
    case 4: return {Rows<4, 4, 4>::run, 4};
    case 11: return {Rows<16, 1, 1>::run, 1};
    case 12: return {Rows<16, 1, 2>::run, 1};
    case 13: return {Rows<16, 1, 3>::run, 1};
    case 14: return {Rows<16, 1, 4>::run, 1};
    case 21: return {Rows<36, 1, 1>::run, 1};
    case 22: return {Rows<36, 1, 2>::run, 1};
    case 23: return {Rows<36, 1, 3>::run, 1};
    case 24: return {Rows<36, 1, 4>::run, 1};
    default: return {nullptr, 0};
  }
}
#endif

// Query and key/value token indices of the current window, recomputed only
// when the window changes (consecutive pairs are the heads of one window).
struct WindowTokens {
  int64_t q[kMaxTokens];
  int64_t kv[kMaxKvTokens];
  int64_t of = -1;
  void update(const Job& job, int64_t w) {
    if (of == w) return;
    for (int64_t t = 0; t < job.n; ++t) q[t] = job.token(w, t);
    for (int64_t t = 0; t < job.n_kv; ++t) kv[t] = job.kv_token(w, t);
    of = w;
  }
};

#if defined(__AVX512BF16__)
// bf16 words of one (window, head) for the AVX512-BF16 dot-product
// micro-kernel, which multiplies bf16 pairs exactly and sums in fp32 (twice
// the fp32 FMA rate): q rows (n x dq, dq = d rounded up to even), k as
// channel pairs (dq / 2 x n_kv words), v as token pairs (n_kv / 2 x dp words),
// probabilities rounded to bf16 for P V (as the eager bf16 path does).
struct PairTile {
  std::vector<uint16_t> q, p;
  std::vector<uint32_t> k, v;
  int64_t dq, dp;
  explicit PairTile(int64_t d)
      : q(kMaxTokens * kMaxHeadDim),
        p(4 * kMaxKvTokens),
        k(kMaxHeadDim / 2 * kMaxKvTokens),
        v(kMaxKvTokens / 2 * kMaxHeadDim),
        dq((d + 1) / 2 * 2),
        dp((d + 15) / 16 * 16) {}

  // n and n_kv must be even. 16 channels at a time with masked loads; a key
  // token -1 loads nothing (zero key and value).
  void load(const c10::BFloat16* base, const int64_t* tokens, const int64_t* kv_tokens,
            const Job& job, int64_t d) {
    const int64_t row = 3 * job.channels, n = job.n, n_kv = job.n_kv, ch = job.channels;
    const auto* raw = reinterpret_cast<const uint16_t*>(base);
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* t = raw + tokens[j] * row;
      for (int64_t c0 = 0; c0 < dq; c0 += 16) {
        const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, d - c0));
        const __mmask16 keep = static_cast<__mmask16>((1u << std::min<int64_t>(16, dq - c0)) - 1);
        const __m256i qv = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << left) - 1), t + c0);
        _mm256_mask_storeu_epi16(q.data() + j * dq + c0, keep, qv);  // zero beyond d
      }
    }
    for (int64_t j = 0; j < n_kv; j += 2) {
      const uint16_t* t0 = raw + std::max<int64_t>(kv_tokens[j], 0) * row;
      const uint16_t* t1 = raw + std::max<int64_t>(kv_tokens[j + 1], 0) * row;
      for (int64_t c0 = 0; c0 < dp; c0 += 16) {
        const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, d - c0));
        const __mmask16 live = static_cast<__mmask16>((1u << left) - 1);
        const __mmask16 live0 = kv_tokens[j] < 0 ? 0 : live;
        const __mmask16 live1 = kv_tokens[j + 1] < 0 ? 0 : live;
        // k channel pairs: word c/2 of token j is (k[c], k[c + 1])
        alignas(32) uint32_t k0[8], k1[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(k0), _mm256_maskz_loadu_epi16(live0, t0 + ch + c0));
        _mm256_store_si256(reinterpret_cast<__m256i*>(k1), _mm256_maskz_loadu_epi16(live1, t1 + ch + c0));
        for (int64_t w = 0; w < 8 && c0 + 2 * w < dq; ++w) {
          k[(c0 / 2 + w) * n_kv + j] = k0[w];
          k[(c0 / 2 + w) * n_kv + j + 1] = k1[w];
        }
        // v token pairs: word c of pair j / 2 is (v_j[c], v_{j+1}[c])
        const __m512i v0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live0, t0 + 2 * ch + c0));
        const __m512i v1 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live1, t1 + 2 * ch + c0));
        _mm512_storeu_si512(v.data() + (j / 2) * dp + c0, _mm512_or_si512(v0, _mm512_slli_epi32(v1, 16)));
      }
    }
  }
};

inline uint32_t word_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// rows_avx512 with bf16 dot products for q k^T and P V.
template <int NB, int R, int DV>
void rows_bf16(const PairTile& tile, const float* bias, const float* mask, int64_t i0,
               float scale, float* o) {
  constexpr int n = NB * 16;
  __m512 s[R][NB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) s[r][b] = _mm512_setzero_ps();
  const int64_t dq = tile.dq;
  for (int64_t cp = 0; cp < dq / 2; ++cp) {
    __m512i qb[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      qb[r] = _mm512_set1_epi32(static_cast<int>(word_at(tile.q.data() + (i0 + r) * dq + 2 * cp)));
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const __m512i kv = _mm512_loadu_si512(tile.k.data() + cp * n + 16 * b);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) s[r][b] = _mm512_dpbf16_ps(s[r][b], (__m512bh)qb[r], (__m512bh)kv);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  float inv[R];
  uint16_t* p = const_cast<uint16_t*>(tile.p.data());
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      __m512 add = _mm512_loadu_ps(bias + (i0 + r) * n + 16 * b);
      if (mask != nullptr) add = _mm512_add_ps(add, _mm512_loadu_ps(mask + (i0 + r) * n + 16 * b));
      s[r][b] = _mm512_fmadd_ps(s[r][b], vscale, add);
    }
    inv[r] = softmax_numerators<NB>(s[r]);
#pragma GCC unroll 16
    for (int b = 0; b < NB; b += 2)
      _mm512_storeu_si512(p + r * n + 16 * b, (__m512i)_mm512_cvtne2ps_pbh(s[r][b + 1], s[r][b]));
  }
  __m512 acc[R][DV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) acc[r][x] = _mm512_setzero_ps();
  __m512 acc2[R][DV];  // a second set of sums: twice the independent dependency chains
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) acc2[r][x] = _mm512_setzero_ps();
  const int64_t dp = tile.dp;
  for (int jp = 0; jp < n / 2; jp += 2) {
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) {
      const __m512i v0 = _mm512_loadu_si512(tile.v.data() + jp * dp + 16 * x);
      const __m512i v1 = _mm512_loadu_si512(tile.v.data() + (jp + 1) * dp + 16 * x);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i p0 = _mm512_set1_epi32(static_cast<int>(word_at(p + r * n + 2 * jp)));
        const __m512i p1 = _mm512_set1_epi32(static_cast<int>(word_at(p + r * n + 2 * jp + 2)));
        acc[r][x] = _mm512_dpbf16_ps(acc[r][x], (__m512bh)p0, (__m512bh)v0);
        acc2[r][x] = _mm512_dpbf16_ps(acc2[r][x], (__m512bh)p1, (__m512bh)v1);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x)
      _mm512_storeu_ps(o + r * DV * 16 + 16 * x,
                       _mm512_mul_ps(_mm512_add_ps(acc[r][x], acc2[r][x]),
                                     _mm512_set1_ps(inv[r])));
}

template <int NB, int R, int DV>
struct Bf16Rows {
  static constexpr auto run = &rows_bf16<NB, R, DV>;
};

// run_pairs for bf16 storage through the bf16 dot-product micro-kernel; false
// (nothing done) for shapes it does not cover.
bool run_pairs_bf16(const Job& job, int64_t begin, int64_t end) {
  const int64_t n = job.n, d = job.channels / job.heads;
  const auto [rows_fn, block] = pick_rows<Bf16Rows>(n, job.n_kv, d);
  if (rows_fn == nullptr) return false;
  PairTile tile(d);
  alignas(64) float o[4 * kMaxHeadDim];
  auto win = std::make_unique<WindowTokens>();
  const int64_t* tokens = win->q;
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t w = pair / job.heads, h = pair % job.heads;
    win->update(job, w);
    tile.load(static_cast<const c10::BFloat16*>(job.qkv) + h * d, win->q, win->kv, job, d);
    const float* bias = job.bias + h * n * job.n_kv;
    const float* mask = job.window_mask(w);
    auto* out = static_cast<c10::BFloat16*>(job.out) + h * d;
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      rows_fn(tile, bias, mask, i0, job.scale, o);
      for (int64_t r = 0; r < block; ++r)
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
          const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, d - c0)) - 1);
          const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(o + r * tile.dp + c0));
          _mm256_mask_storeu_epi16(out + tokens[i0 + r] * job.channels + c0, live, (__m256i)packed);
        }
    }
  }
  return true;
}
#endif

// One query row on any CPU and window size (n = keys): writes d outputs to o.
void row_portable(const Tile& tile, const float* bias, const float* mask, int64_t i, int64_t n,
                  int64_t d, float* s, float* o) {
  for (int64_t j = 0; j < n; ++j) s[j] = bias[i * n + j] + (mask ? mask[i * n + j] : 0.f);
  for (int64_t c = 0; c < d; ++c) {
    const float qc = tile.q[i * d + c];
    const float* kc = tile.k_t.data() + c * n;
    for (int64_t j = 0; j < n; ++j) s[j] += qc * kc[j];
  }
  const float top = *std::max_element(s, s + n);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) o[c] += s[j] * tile.v[j * tile.dp + c];
  for (int64_t c = 0; c < d; ++c) o[c] /= sum;
}

// (window, head) pairs [begin, end).
template <typename T>
void run_pairs(const Job& job, int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (run_pairs_bf16(job, begin, end)) return;
  }
#endif
  const int64_t n = job.n, n_kv = job.n_kv, d = job.channels / job.heads;
  Tile tile(d);
  alignas(64) float o[4 * kMaxHeadDim];
  auto win = std::make_unique<WindowTokens>();
  const int64_t* tokens = win->q;
#if defined(__AVX512F__)
  const auto [rows_fn, rows_block] = pick_rows<Fp32Rows>(n, n_kv, d);
  const int64_t block = rows_fn != nullptr ? rows_block : 1;
#else
  const void* rows_fn = nullptr;
  const int64_t block = 1;
#endif
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t w = pair / job.heads, h = pair % job.heads;
    win->update(job, w);
    tile.load(static_cast<const T*>(job.qkv) + h * d, win->q, win->kv, job, d);
    const float* bias = job.bias + h * n * n_kv;
    const float* mask = job.window_mask(w);
    T* out = static_cast<T*>(job.out) + h * d;
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      int64_t stride = tile.dp;
#if defined(__AVX512F__)
      if (rows_fn != nullptr) {
        rows_fn(tile, bias, mask, i0, d, tile.p.data(), o);
      } else
#endif
      {
        row_portable(tile, bias, mask, i0, n_kv, d, tile.p.data(), o);
        stride = d;
      }
      for (int64_t r = 0; r < block; ++r)
        for (int64_t c = 0; c < d; ++c)
          out[tokens[i0 + r] * job.channels + c] = static_cast<T>(o[r * stride + c]);
    }
  }
}

// (window, head) pairs over torch's intra-op thread pool (built with
// -fopenmp, the extension shares the OpenMP runtime torch already loaded).
template <typename T>
void launch(const Job& job, int64_t pairs) {
  at::parallel_for(0, pairs, 1, [&job](int64_t begin, int64_t end) {
    run_pairs<T>(job, begin, end);
  });
}

torch::Tensor window_attention(const torch::Tensor& qkv, const torch::Tensor& bias,
                               const c10::optional<torch::Tensor>& mask,
                               const c10::optional<torch::Tensor>& masked, int64_t heads,
                               double scale, int64_t window, int64_t shift,
                               int64_t kv_window) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous() &&
                  (window > 0 ? qkv.dim() == 4 : qkv.dim() == 3),
              "qkv must be a contiguous CPU tensor: (windows, tokens, 3 * channels), or "
              "(images, H, W, 3 * channels) with window > 0");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kFloat,
              "qkv must be bfloat16 or float32, got ", qkv.scalar_type());
  TORCH_CHECK(heads > 0, "heads must be positive");
  const int64_t width3 = qkv.size(-1), channels = width3 / 3;
  int64_t windows = qkv.size(0), n = window > 0 ? window * window : qkv.size(1);
  if (window > 0) {
    TORCH_CHECK(qkv.size(1) % window == 0 && qkv.size(2) % window == 0 && shift >= 0 &&
                    shift < window,
                "map ", qkv.size(1), "x", qkv.size(2), " is not a multiple of window ", window,
                " or shift ", shift, " is outside [0, window)");
    windows *= (qkv.size(1) / window) * (qkv.size(2) / window);
  }
  TORCH_CHECK(width3 == 3 * channels && channels % heads == 0, "qkv width ", width3,
              " is not 3 * channels with channels divisible by heads ", heads);
  TORCH_CHECK(n <= kMaxTokens && channels / heads <= kMaxHeadDim, "window of ", n,
              " tokens / head dim ", channels / heads, " exceeds the kernel's ", kMaxTokens, " / ",
              kMaxHeadDim);
  int64_t n_kv = n;
  if (kv_window > 0) {
    TORCH_CHECK(window > 0 && shift == 0 && !mask.has_value() && kv_window >= window &&
                    (kv_window - window) % 2 == 0 && kv_window * kv_window <= kMaxKvTokens &&
                    (kv_window * kv_window) % 2 == 0,
                "cross-attention needs the map layout, no shift or mask, and an even-sized "
                "kv_window >= window of at most ", kMaxKvTokens, " tokens; got window ", window,
                ", kv_window ", kv_window);
    n_kv = kv_window * kv_window;
  }
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.sizes() == at::IntArrayRef({heads, n, n_kv}),
              "bias must be contiguous float32 (heads, tokens, key tokens)");
  Job job{qkv.data_ptr(), bias.data_ptr<float>(), nullptr, nullptr, nullptr,
          n, channels, heads, 1, static_cast<float>(scale)};
  job.kv_window = kv_window;
  job.n_kv = n_kv;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(masked.has_value(), "mask given without the per-window masked flags");
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 3 &&
                    m.size(1) == n && m.size(2) == n && m.size(0) > 0 &&
                    windows % m.size(0) == 0,
                "mask must be contiguous float32 (mask_windows, tokens, tokens) dividing the "
                "windows");
    TORCH_CHECK(masked->scalar_type() == at::kByte && masked->is_contiguous() &&
                    masked->numel() == m.size(0),
                "masked flags must be contiguous uint8 of length mask_windows");
    job.mask = m.data_ptr<float>();
    job.masked = masked->data_ptr<uint8_t>();
    job.mask_windows = m.size(0);
  }
  if (window > 0) {
    job.height = qkv.size(1);
    job.width = qkv.size(2);
    job.window = window;
    job.shift = shift;
  }
  std::vector<int64_t> out_shape = qkv.sizes().vec();
  out_shape.back() = channels;
  auto out = torch::empty(out_shape, qkv.options());
  job.out = out.data_ptr();
  if (qkv.scalar_type() == at::kBFloat16) {
    launch<c10::BFloat16>(job, windows * heads);
  } else {
    launch<float>(job, windows * heads);
  }
  return out;
}

// ---------------------------------------------------------------- LN* / i-LN

constexpr int64_t kStatChunk = 4096;

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}

// Sum of x[i] (center = nullptr) or of (x[i] - *center)^2 over [0, count):
// fp32 sums over chunks of kStatChunk (vectorised), chunk totals in fp64,
// chunks spread over torch's threads.
template <typename T>
double chunked_sum(const T* x, int64_t count, const float* center) {
  const int64_t chunks = (count + kStatChunk - 1) / kStatChunk;
  std::vector<double> part(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const T* p = x + c * kStatChunk;
      const int len = static_cast<int>(std::min(kStatChunk, count - c * kStatChunk));
      float s = 0.f;
      if (center == nullptr) {
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < len; ++i) s += as_float(p[i]);
      } else {
        const float m = *center;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < len; ++i) {
          const float v = as_float(p[i]) - m;
          s += v * v;
        }
      }
      part[c] = s;
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

// Per sample of x (B, ...): mean and sqrt(var + eps) over all other dims
// (biased variance, two passes), as (B, 2) fp32.
torch::Tensor holistic_stats(const torch::Tensor& x, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2 && x.numel() > 0,
              "x must be a non-empty contiguous CPU tensor (batch, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t batch = x.size(0), count = x.numel() / batch;
  auto out = torch::empty({batch, 2}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  auto run = [&](auto* data) {
    for (int64_t b = 0; b < batch; ++b) {
      const auto* xb = data + b * count;
      const float m = static_cast<float>(chunked_sum(xb, count, nullptr) / count);
      const double var = chunked_sum(xb, count, &m) / count;
      o[2 * b] = m;
      o[2 * b + 1] = static_cast<float>(std::sqrt(var + eps));
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>());
  } else {
    run(x.data_ptr<c10::BFloat16>());
  }
  return out;
}

// (x - mean) / std * weight + bias per sample of x (B, L, C), stats (B, 2)
// from holistic_stats; fp32 arithmetic, x's dtype out. One pass.
torch::Tensor holistic_normalize(const torch::Tensor& x, const torch::Tensor& stats,
                                 const torch::Tensor& weight,
                                 const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 3,
              "x must be a contiguous CPU tensor (batch, tokens, channels)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t batch = x.size(0), rows = x.size(1), ch = x.size(2);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                  stats.numel() == 2 * batch,
              "stats must be contiguous float32 (batch, 2)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == ch,
              "weight must be contiguous float32 (channels,)");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                                    bias->numel() == ch),
              "bias must be contiguous float32 (channels,)");
  auto out = torch::empty_like(x);
  const float* st = stats.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto run = [&](auto* in, auto* res) {
    using T = std::remove_pointer_t<decltype(res)>;
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<float> scale(ch), shift(ch);
      const float mean = st[2 * b], inv = 1.f / st[2 * b + 1];
      for (int64_t c = 0; c < ch; ++c) {
        scale[c] = w[c] * inv;
        shift[c] = bi ? bi[c] : 0.f;
      }
      const auto* xb = in + b * rows * ch;
      T* yb = res + b * rows * ch;
      at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          // bf16 out: 16 channels at a time with the hardware rounding (which keeps
          // NaN and Inf; the scalar conversion does not vectorise).
          const __m512 vmean = _mm512_set1_ps(mean);
          for (int64_t r = r0; r < r1; ++r) {
            const auto* xr = reinterpret_cast<const uint16_t*>(xb + r * ch);
            auto* yr = reinterpret_cast<uint16_t*>(yb + r * ch);
            for (int64_t c0 = 0; c0 < ch; c0 += 16) {
              const __mmask16 live =
                  static_cast<__mmask16>((1u << std::min<int64_t>(16, ch - c0)) - 1);
              const __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(
                  _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, xr + c0)), 16));
              const __m512 yv = _mm512_fmadd_ps(_mm512_sub_ps(xv, vmean),
                                                _mm512_maskz_loadu_ps(live, scale.data() + c0),
                                                _mm512_maskz_loadu_ps(live, shift.data() + c0));
              _mm256_mask_storeu_epi16(yr + c0, live, (__m256i)_mm512_cvtneps_pbh(yv));
            }
          }
          return;
        }
#endif
        for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
          for (int64_t c = 0; c < ch; ++c)
            yb[r * ch + c] =
                static_cast<T>((as_float(xb[r * ch + c]) - mean) * scale[c] + shift[c]);
        }
      });
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), out.data_ptr<float>());
  } else {
    run(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("window_attention", &window_attention, "fused window attention (CPU inference)",
        py::arg("qkv"), py::arg("bias"), py::arg("mask"), py::arg("masked"), py::arg("heads"),
        py::arg("scale"), py::arg("window") = 0, py::arg("shift") = 0,
        py::arg("kv_window") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("holistic_stats", &holistic_stats, "per-sample mean and sqrt(var + eps)", py::arg("x"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("holistic_normalize", &holistic_normalize, "per-sample normalisation + affine",
        py::arg("x"), py::arg("stats"), py::arg("weight"), py::arg("bias"),
        py::call_guard<py::gil_scoped_release>());
}
