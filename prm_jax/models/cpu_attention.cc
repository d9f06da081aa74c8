// Attention kernels for x86 CPUs with AVX-512 BF16, as XLA FFI custom calls (models/cpu_kernels.py builds
// and registers them).
// - PrmAttentionBf16: what `models.attention.attention` computes without a gradient, in one pass over each
//   tile of queries instead of XLA:CPU's ~8 passes over the f32 scores:
//     scores = q k^T in f32 (q already scaled), masked keys excluded; w = exp(scores - max) rounded to
//     bf16; out = (w v, accumulated in f32) / sum(w), rounded to bf16.
//   Keys outside a tile's unmasked range are never touched, so a causal mask costs half.
// - PrmDecodeAttentionF32: `models.attention.decode_attention` (one f32 query per row against the KV
//   cache), reading only the cache's filled part, once.
// A query whose keys are all masked gets the mean of v over all keys, as the softmax of equal scores would.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileTokens = 4;  // query tokens per tile (times G query heads)
constexpr int kPad = 64;        // packed key count rounded up to this

// fn(i) for i in [0, n), on the caller and the pool's threads. A task that starts after every item
// was taken returns without touching fn, so fn may live on the caller's stack.
template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct Counter { std::atomic<int64_t> next{0}, done{0}; };
  auto counter = std::make_shared<Counter>();
  const F* f = &fn;
  auto drain = [counter, n, f]() {
    for (int64_t i; (i = counter->next.fetch_add(1)) < n;) {
      (*f)(i);
      counter->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t j = 0; j < helpers; ++j) pool.Schedule(decltype(drain)(drain));
  drain();
  while (counter->done.load() < n) std::this_thread::yield();
}

inline __m512 Exp(__m512 x) {  // e^x, ~2 ulp; 0 below -87
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
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
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

inline float Bf16ToFloat(uint16_t x) {
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Shape {
  int64_t b, t, h, kv, s, d, g, sp;  // sp: keys rounded up to kPad
};

// Per (row, kv head): keys as bf16 pairs along D, [D/2][sp] (key vectors of 16 for the score
// product), values as bf16 pairs along keys, [sp/2][D] (for the value product). Pads are zero.
void Pack(const Shape& sh, const uint16_t* k, const uint16_t* v, uint32_t* kp, uint32_t* vp, int64_t bk) {
  const int64_t d2 = sh.d / 2;
  const uint32_t* krows = reinterpret_cast<const uint32_t*>(k + bk * sh.s * sh.d);
  uint32_t* kout = kp + bk * d2 * sh.sp;
  for (int64_t i = 0; i < d2; ++i) {
    uint32_t* dst = kout + i * sh.sp;
    for (int64_t s = 0; s < sh.s; ++s) dst[s] = krows[s * d2 + i];
    std::fill(dst + sh.s, dst + sh.sp, 0u);
  }
  const uint16_t* vrows = v + bk * sh.s * sh.d;
  uint32_t* vout = vp + bk * (sh.sp / 2) * sh.d;
  for (int64_t s2 = 0; s2 < sh.sp / 2; ++s2) {
    const int64_t s = 2 * s2;
    for (int64_t j = 0; j < sh.d; ++j) {
      uint32_t lo = s < sh.s ? vrows[s * sh.d + j] : 0, hi = s + 1 < sh.s ? vrows[(s + 1) * sh.d + j] : 0;
      vout[s2 * sh.d + j] = lo | (hi << 16);
    }
  }
}

// [lo, hi]: the first and last unmasked key of a mask row of s keys (lo > hi when none).
inline void UnmaskedRange(const uint8_t* row, int64_t s, int64_t& lo, int64_t& hi) {
  lo = 0, hi = s - 1;
  while (lo <= hi && !row[lo]) ++lo;
  while (hi >= lo && !row[hi]) --hi;
}

// Scores of keys [lo, lo + n) (n a multiple of 16) with masked keys and keys past s set to -FLT_MAX; their max.
inline float MaskScores(float* scores, const uint8_t* mask_row, int64_t lo, int64_t n, int64_t s) {
  const __m512 neg = _mm512_set1_ps(-FLT_MAX);
  __m512 top = neg;
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t key = lo + j;
    const __mmask16 in_range = key + 16 <= s ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(s - key, 0)) - 1);
    __m128i mb = _mm_maskz_loadu_epi8(in_range, mask_row + key);
    __m512 x = _mm512_mask_blend_ps(_mm_test_epi8_mask(mb, mb), neg, _mm512_loadu_ps(scores + j));
    _mm512_storeu_ps(scores + j, x);
    top = _mm512_max_ps(top, x);
  }
  return _mm512_reduce_max_ps(top);
}

// out[r][16c .. 16c+16) = sum over i of the bf16 pairs a[r][i] . b[i * stride + 16c ..]: R rows x C vectors of
// 16 in registers. Scores: a = queries (pairs along D), b = packed keys; values: a = weights (pairs along
// keys), b = packed values.
template <int R, int C>
inline void PairBlock(const uint32_t* const* a, const uint32_t* b, int64_t stride, int64_t pairs, float* out,
                      int64_t ld) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh bv[C];
    for (int c = 0; c < C; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + i * stride + 16 * c);
    for (int r = 0; r < R; ++r) {
      __m512bh ab = (__m512bh)_mm512_set1_epi32(int(a[r][i]));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ab, bv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * ld + 16 * c, acc[r][c]);
}

template <int R>
void Scores(const uint32_t* const* q, const uint32_t* kp, int64_t sp, int64_t d2, int64_t n, float* out, int64_t ld) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) PairBlock<R, 4>(q, kp + j, sp, d2, out + j, ld);
  for (; j < n; j += 16) PairBlock<R, 1>(q, kp + j, sp, d2, out + j, ld);
}

template <int R>
void Values(const uint32_t* const* w, const uint32_t* vp, int64_t pairs, int64_t d, float* out) {
  for (int64_t c = 0; c < d; c += 64) {
    if (d - c >= 64) PairBlock<R, 4>(w, vp + c, d, pairs, out + c, d);
    else PairBlock<R, 2>(w, vp + c, d, pairs, out + c, d);  // d is a multiple of 32
  }
}

struct Scratch {
  std::vector<float> scores, acc, total;
  std::vector<uint16_t> weights;
  std::vector<uint8_t> uniform;
  std::vector<const uint32_t*> qrows, wrows;
};

// One tile: query tokens [t0, t1) of row b, the G heads of kv head `kv`.
void Tile(const Shape& sh, const uint16_t* q, const bool* mask, const int32_t* first, const int32_t* last,
          const uint32_t* kp, const uint32_t* vp, uint16_t* out, int64_t b, int64_t kv, int64_t t0, int64_t t1,
          Scratch& sc) {
  int64_t lo = sh.s, hi = -1;
  for (int64_t t = t0; t < t1; ++t) {
    if (first[b * sh.t + t] <= last[b * sh.t + t]) {
      lo = std::min<int64_t>(lo, first[b * sh.t + t]);
      hi = std::max<int64_t>(hi, last[b * sh.t + t]);
    }
  }
  const int64_t m = (t1 - t0) * sh.g, d2 = sh.d / 2;
  int64_t n = 0;
  if (hi >= lo) {
    lo = lo / 16 * 16;
    n = (hi + 1 - lo + 15) / 16 * 16;
  } else {
    lo = 0;
  }
  const int64_t ld = std::max<int64_t>(n, 16);
  sc.scores.resize(m * ld);
  sc.weights.resize(m * ld);
  sc.acc.resize(m * sh.d);
  sc.total.resize(m);
  sc.uniform.assign(m, 0);
  const uint32_t* bkp = kp + (b * sh.kv + kv) * d2 * sh.sp;
  const uint32_t* bvp = vp + (b * sh.kv + kv) * (sh.sp / 2) * sh.d;
  sc.qrows.resize(m);
  sc.wrows.resize(m);
  const uint32_t** qrows = sc.qrows.data();
  const uint32_t** wrows = sc.wrows.data();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t t = t0 + i / sh.g, h = kv * sh.g + i % sh.g;
    qrows[i] = reinterpret_cast<const uint32_t*>(q + ((b * sh.t + t) * sh.h + h) * sh.d);
    wrows[i] = reinterpret_cast<const uint32_t*>(sc.weights.data() + i * ld);
  }
  if (n > 0) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) Scores<4>(qrows + i, bkp + lo, sh.sp, d2, n, sc.scores.data() + i * ld, ld);
    for (; i < m; ++i) Scores<1>(qrows + i, bkp + lo, sh.sp, d2, n, sc.scores.data() + i * ld, ld);
  }
  const __m512 neg = _mm512_set1_ps(-FLT_MAX);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t t = t0 + i / sh.g;
    const uint8_t* mrow = reinterpret_cast<const uint8_t*>(mask + (b * sh.t + t) * sh.s);
    float* srow = sc.scores.data() + i * ld;
    const float mx = MaskScores(srow, mrow, lo, n, sh.s);
    uint16_t* wrow = sc.weights.data() + i * ld;
    if (n == 0 || mx == -FLT_MAX) {  // every key masked: equal weights over all keys
      sc.uniform[i] = 1;
      std::fill(wrow, wrow + ld, uint16_t(0));
      continue;
    }
    const __m512 mxv = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      __m512 x = _mm512_loadu_ps(srow + j);
      __mmask16 live = _mm512_cmp_ps_mask(x, neg, _CMP_NEQ_OQ);
      __m512 e = _mm512_maskz_mov_ps(live, Exp(_mm512_sub_ps(x, mxv)));
      __m256bh eb = _mm512_cvtneps_pbh(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wrow + j), (__m256i)eb);
      sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(eb));
    }
    sc.total[i] = _mm512_reduce_add_ps(sum);
  }
  if (n > 0) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) Values<4>(wrows + i, bvp + lo / 2 * sh.d, n / 2, sh.d, sc.acc.data() + i * sh.d);
    for (; i < m; ++i) Values<1>(wrows + i, bvp + lo / 2 * sh.d, n / 2, sh.d, sc.acc.data() + i * sh.d);
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t t = t0 + i / sh.g, h = kv * sh.g + i % sh.g;
    uint16_t* orow = out + ((b * sh.t + t) * sh.h + h) * sh.d;
    float* arow = sc.acc.data() + i * sh.d;
    if (sc.uniform[i]) {
      std::fill(arow, arow + sh.d, 0.0f);
      for (int64_t s = 0; s < sh.s; ++s) {
        const uint32_t* pair = bvp + (s / 2) * sh.d;
        for (int64_t j = 0; j < sh.d; ++j) arow[j] += Bf16ToFloat(uint16_t(pair[j] >> (16 * (s % 2))));
      }
      sc.total[i] = float(sh.s);
    }
    const __m512 inv = _mm512_set1_ps(sc.total[i]);
    for (int64_t j = 0; j < sh.d; j += 16) {
      __m256bh r = _mm512_cvtneps_pbh(_mm512_div_ps(_mm512_loadu_ps(arow + j), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + j), (__m256i)r);
    }
  }
}

ffi::Error AttentionBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                         ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::BF16> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("attention: expected q [B,T,H,D], k/v [B,K,S,D], mask [B,T,S]");
  Shape sh{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3], qd[2] / kd[1], (kd[2] + kPad - 1) / kPad * kPad};
  if (sh.d % 32 != 0 || sh.h % sh.kv != 0 || kd[0] != sh.b || kd[3] != sh.d || md[0] != sh.b || md[1] != sh.t ||
      md[2] != sh.s)
    return ffi::Error::InvalidArgument("attention: shapes do not match (head size must be a multiple of 32)");
  const uint16_t* qp = q.typed_data();
  const bool* mp = mask.typed_data();
  // every entry is written by Pack, so not zero-filled first
  std::unique_ptr<uint32_t[]> kp(new uint32_t[sh.b * sh.kv * (sh.d / 2) * sh.sp]);
  std::unique_ptr<uint32_t[]> vp(new uint32_t[sh.b * sh.kv * (sh.sp / 2) * sh.d]);
  std::vector<int32_t> first(sh.b * sh.t), last(sh.b * sh.t);
  const int64_t packs = sh.b * sh.kv;
  ParallelFor(pool, packs + sh.b, [&](int64_t i) {
    if (i < packs) {
      Pack(sh, k.typed_data(), v.typed_data(), kp.get(), vp.get(), i);
    } else {
      for (int64_t bt = (i - packs) * sh.t; bt < (i - packs + 1) * sh.t; ++bt) {
        int64_t lo, hi;
        UnmaskedRange(reinterpret_cast<const uint8_t*>(mp + bt * sh.s), sh.s, lo, hi);
        first[bt] = int32_t(lo), last[bt] = int32_t(hi);
      }
    }
  });
  const int64_t tiles = (sh.t + kTileTokens - 1) / kTileTokens;
  ParallelFor(pool, sh.b * sh.kv * tiles, [&](int64_t i) {
    thread_local Scratch scratch;
    const int64_t tile = i % tiles, bk = i / tiles;
    Tile(sh, qp, mp, first.data(), last.data(), kp.get(), vp.get(), out->typed_data(), bk / sh.kv, bk % sh.kv,
         tile * kTileTokens, std::min(sh.t, (tile + 1) * kTileTokens), scratch);
  });
  return ffi::Error::Success();
}


// ---- f32 decode: one query per row against the KV cache (the sampler's step on CPU) ----

// lane j of the result = the sum of p[j]'s 16 lanes (the 16 dot products of a block of keys).
inline __m512 SumLanes16(__m512* p) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: [key 2i: 8 partials | key 2i+1: 8 partials]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit blocks: keys 4i .. 4i+3, 4 partials each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // block j: keys (j, 4+j) of b[2i], (j, 4+j) of b[2i+1] -> 2 partials each
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xee));
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xdd));
  // block j now holds keys (j, 4+j, 8+j, 12+j): back to key order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

struct DecodeShape {
  int64_t b, h, kv, s, d, g;
};

template <int G>
void DecodeRow(const DecodeShape& sh, const float* q, const float* k, const float* v, const bool* mask, float* out,
               int64_t row, std::vector<float>& buf) {
  const int64_t b = row / sh.kv, kv = row % sh.kv, d = sh.d;
  const uint8_t* mrow = reinterpret_cast<const uint8_t*>(mask + b * sh.s);
  int64_t lo, hi;
  UnmaskedRange(mrow, sh.s, lo, hi);
  const float* qs = q + (b * sh.h + kv * G) * d;  // the G query heads of this kv head
  float* o = out + (b * sh.h + kv * G) * d;
  const float* kb = k + (b * sh.kv + kv) * sh.s * d;
  const float* vb = v + (b * sh.kv + kv) * sh.s * d;
  if (hi < lo) {  // every key masked: equal weights over all keys
    lo = 0, hi = sh.s - 1;
    for (int64_t j = 0; j < d; ++j) {
      float acc = 0;
      for (int64_t s = 0; s < sh.s; ++s) acc += vb[s * d + j];
      for (int g = 0; g < G; ++g) o[g * d + j] = acc / float(sh.s);
    }
    return;
  }
  lo = lo / 16 * 16;
  const int64_t n = (hi + 1 - lo + 15) / 16 * 16;
  buf.resize(G * n + d);
  float* scores = buf.data();
  float* zero = buf.data() + G * n;  // the key row read for positions past the cache's end
  std::fill(zero, zero + d, 0.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const float* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = lo + j + i < sh.s ? kb + (lo + j + i) * d : zero;
    for (int g = 0; g < G; ++g) {
      __m512 p[16];
      for (int i = 0; i < 16; ++i) p[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 16) {
        const __m512 qc = _mm512_loadu_ps(qs + g * d + c);
        for (int i = 0; i < 16; ++i) p[i] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[i] + c), qc, p[i]);
      }
      _mm512_storeu_ps(scores + g * n + j, SumLanes16(p));
    }
  }
  const __m512 neg = _mm512_set1_ps(-FLT_MAX);
  for (int g = 0; g < G; ++g) {  // softmax over the unmasked keys, as jax.nn.softmax
    float* sr = scores + g * n;
    const __m512 mx = _mm512_set1_ps(MaskScores(sr, mrow, lo, n, sh.s));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      __m512 x = _mm512_loadu_ps(sr + j);
      __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, neg, _CMP_NEQ_OQ), Exp(_mm512_sub_ps(x, mx)));
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(sr + j, _mm512_div_ps(_mm512_loadu_ps(sr + j), total));
  }
  const int64_t end = std::min(lo + n, sh.s);
  for (int64_t c = 0; c < d; c += 32) {  // out_g = sum_s p_g[s] v_s, 32 dims at a time
    __m512 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t s = lo; s < end; ++s) {
      const __m512 v0 = _mm512_loadu_ps(vb + s * d + c), v1 = _mm512_loadu_ps(vb + s * d + c + 16);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * n + (s - lo)]);
        acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(o + g * d + c, acc[g][0]);
      _mm512_storeu_ps(o + g * d + c + 16, acc[g][1]);
    }
  }
}

ffi::Error DecodeF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || qd[1] != 1)
    return ffi::Error::InvalidArgument("decode attention: expected q [B,1,H,D], k/v [B,K,S,D], mask [B,1,S]");
  DecodeShape sh{qd[0], qd[2], kd[1], kd[2], qd[3], qd[2] / kd[1]};
  if (sh.d % 32 != 0 || sh.h % sh.kv != 0 || sh.g > 8 || kd[0] != sh.b || kd[3] != sh.d || md[0] != sh.b ||
      md[2] != sh.s)
    return ffi::Error::InvalidArgument("decode attention: shapes do not match (head size a multiple of 32, <= 8 "
                                       "query heads per kv head)");
  ParallelFor(pool, sh.b * sh.kv, [&](int64_t row) {
    thread_local std::vector<float> buf;
    auto run = [&](auto g) {
      DecodeRow<decltype(g)::value>(sh, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                                    out->typed_data(), row, buf);
    };
    switch (sh.g) {
      case 1: run(std::integral_constant<int, 1>()); break;
      case 2: run(std::integral_constant<int, 2>()); break;
      case 3: run(std::integral_constant<int, 3>()); break;
      case 4: run(std::integral_constant<int, 4>()); break;
      case 5: run(std::integral_constant<int, 5>()); break;
      case 6: run(std::integral_constant<int, 6>()); break;
      case 7: run(std::integral_constant<int, 7>()); break;
      default: run(std::integral_constant<int, 8>()); break;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrmAttentionBf16, AttentionBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrmDecodeAttentionF32, DecodeF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
