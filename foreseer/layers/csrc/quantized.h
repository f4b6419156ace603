// Weights kept in their checkpoint's format (GGUF blocks, F16, BF16), multiplied on the CPU: shared by the linear
// layers' bindings (quantized_cpu.cpp) and the fused decoder (models/csrc/llama_decoder_cpu.cpp).
// Each block is dequantized in registers to the exact fp32 values the checkpoint defines, bit for bit the gguf
// package's dequantize: a scale times a quant is exact in fp32 (at most 11 + 6 + 6 significant bits), so
// fusing it with the offset that follows rounds once, as the two steps of the reference do; nothing else is fused
// (includers compile with -ffp-contract=off). The weights then multiply fp32 activations. Only the order of the
// arithmetic differs from dequantize-then-matmul, as between any two BLAS libraries: the summation order, and, in
// the factored dataflow of a decode step's few rows, the distributive law (scale * (x . q) + offset * sum(x)).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace foreseer_quant {

// ggml's type numbers.
enum : int64_t { kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13,
                 kQ6_K = 14, kBF16 = 30 };

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The two float16 values at p and p + 2 (a block's scale and min), converted together.
inline __m128 halves_at(const uint8_t* p) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
}

// Bit i of `bits` >> shift, for 8 lanes, as int32 0/1.
inline __m256i bit_lanes(uint32_t bits) {
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                          _mm256_set1_epi32(1));
}

// The 32 nibbles of 16 bytes as int32 lanes, 8 a register: low nibbles are elements 0..15, high nibbles 16..31
// (ggml's order). Each half of the 16 bytes is spread to one byte a lane by one shuffle, which serves both nibbles.
inline void nibble_lanes(const uint8_t* p, __m256i out[4]) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i first = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(
      0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1,
      -1, -1));
  const __m256i second = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(
      8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1, 12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15,
      -1, -1, -1));
  const __m256i mask = _mm256_set1_epi32(0x0F);
  out[0] = _mm256_and_si256(first, mask);
  out[1] = _mm256_and_si256(second, mask);
  out[2] = _mm256_srli_epi32(first, 4);
  out[3] = _mm256_srli_epi32(second, 4);
}

// The 32 nibbles of 16 bytes (nibble_lanes) as floats.
inline void nibble_floats(const uint8_t* p, __m256 q[4]) {
  __m256i n[4];
  nibble_lanes(p, n);
  for (int v = 0; v < 4; ++v) q[v] = _mm256_cvtepi32_ps(n[v]);
}

// How a block format's 32-weight piece maps its integer quants q to weights: w = scale * q + offset, where scale is
// `lo` for the piece's first 16 weights and `hi` for the rest (they differ in Q6_K only). Each product and offset is
// exact in fp32 (at most 11 + 6 + 6 significant bits), so w rounds once, as the gguf reference's steps do.
struct Scales {
  float lo, hi, offset;
};

// Block formats: kElems weights in kBytes; quants(row, s, q) gives the integer quants of elements [32 s, 32 s + 32)
// of a row as floats (exact), scales(row, s) their Scales. kTwoScales: lo and hi may differ; kOffset: offset may
// be nonzero.
struct Q4_0 {
  static constexpr int64_t kElems = 32, kBytes = 18;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) { nibble_floats(row + s * kBytes + 2, q); }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const float d = half_at(row + s * kBytes);
    return {d, d, -8.0f * d};  // d (q - 8)
  }
};

struct Q4_1 {
  static constexpr int64_t kElems = 32, kBytes = 20;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) { nibble_floats(row + s * kBytes + 4, q); }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const __m128 dm = halves_at(row + s * kBytes);
    const float d = _mm_cvtss_f32(dm);
    return {d, d, _mm_cvtss_f32(_mm_movehdup_ps(dm))};  // d q + m
  }
};

// Q5_0 and Q5_1: a fifth bit per weight in a 32-bit word.
inline void five_bit(const uint8_t* qh_bytes, const uint8_t* qs, __m256 q[4]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  __m256i n[4];
  nibble_lanes(qs, n);
  for (int v = 0; v < 4; ++v) {
    q[v] = _mm256_cvtepi32_ps(_mm256_or_si256(n[v], _mm256_slli_epi32(bit_lanes(qh >> (8 * v)), 4)));
  }
}

struct Q5_0 {
  static constexpr int64_t kElems = 32, kBytes = 22;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + s * kBytes;
    five_bit(b + 2, b + 6, q);
  }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const float d = half_at(row + s * kBytes);
    return {d, d, -16.0f * d};  // d (q - 16)
  }
};

struct Q5_1 {
  static constexpr int64_t kElems = 32, kBytes = 24;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + s * kBytes;
    five_bit(b + 4, b + 8, q);
  }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const __m128 dm = halves_at(row + s * kBytes);
    const float d = _mm_cvtss_f32(dm);
    return {d, d, _mm_cvtss_f32(_mm_movehdup_ps(dm))};
  }
};

struct Q8_0 {
  static constexpr int64_t kElems = 32, kBytes = 34;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = false;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + s * kBytes + 2;
    for (int v = 0; v < 4; ++v) {
      q[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * v))));
    }
  }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const float d = half_at(row + s * kBytes);
    return {d, d, 0.0f};
  }
};

// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
inline void scale_min_k4(int64_t j, const uint8_t* q, float* scale, float* min) {
  if (j < 4) {
    *scale = static_cast<float>(q[j] & 63);
    *min = static_cast<float>(q[j + 4] & 63);
  } else {
    *scale = static_cast<float>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<float>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// A Q4_K/Q5_K block's sub-block j: its scale d * sc and offset -dmin * m, each product exact in fp32.
inline Scales k_scales(const uint8_t* b, int64_t j) {
  float sc, mn;
  scale_min_k4(j, b + 4, &sc, &mn);
  const __m128 dm = halves_at(b);
  const float d = _mm_cvtss_f32(dm) * sc;
  return {d, d, -(_mm_cvtss_f32(_mm_movehdup_ps(dm)) * mn)};
}

// The 32 low (even j) or high (odd j) nibbles of 32 bytes as int32 lanes, 8 a register.
inline void nibbles32(const uint8_t* qs, int64_t j, __m256i out[4]) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int v = 0; v < 4; ++v) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * v)));
    out[v] = _mm256_and_si256((j & 1) ? _mm256_srli_epi32(bytes, 4) : bytes, mask);
  }
}

struct Q4_K {
  static constexpr int64_t kElems = 256, kBytes = 144;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7;
    __m256i n[4];
    nibbles32(b + 16 + 32 * (j >> 1), j, n);
    for (int v = 0; v < 4; ++v) q[v] = _mm256_cvtepi32_ps(n[v]);
  }
  static inline Scales scales(const uint8_t* row, int64_t s) { return k_scales(row + (s >> 3) * kBytes, s & 7); }
};

struct Q5_K {
  static constexpr int64_t kElems = 256, kBytes = 176;
  static constexpr bool kBlockQuant = true, kTwoScales = false, kOffset = true;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7;
    __m256i n[4];
    nibbles32(b + 48 + 32 * (j >> 1), j, n);
    const uint8_t* qh = b + 16;
    for (int v = 0; v < 4; ++v) {
      const __m256i high = _mm256_and_si256(
          _mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qh + 8 * v))),
                            static_cast<int>(j)),
          _mm256_set1_epi32(1));
      q[v] = _mm256_cvtepi32_ps(_mm256_or_si256(n[v], _mm256_slli_epi32(high, 4)));
    }
  }
  static inline Scales scales(const uint8_t* row, int64_t s) { return k_scales(row + (s >> 3) * kBytes, s & 7); }
};

// Q6_K: 16 sub-blocks of 16 with int8 scales; its quants are given as q - 32 (signed), with no offset.
struct Q6_K {
  static constexpr int64_t kElems = 256, kBytes = 210;
  static constexpr bool kBlockQuant = true, kTwoScales = true, kOffset = false;
  static inline void quants(const uint8_t* row, int64_t s, __m256 q[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7, half = j >> 2, g = j & 3;
    const uint8_t* ql = b + 64 * half + 32 * (g & 1);
    const uint8_t* qh = b + 128 + 32 * half;
    for (int v = 0; v < 4; ++v) {
      const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ql + 8 * v)));
      const __m256i nib = _mm256_and_si256(g < 2 ? low : _mm256_srli_epi32(low, 4), _mm256_set1_epi32(0x0F));
      const __m256i high = _mm256_and_si256(
          _mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qh + 8 * v))),
                            static_cast<int>(2 * g)),
          _mm256_set1_epi32(3));
      q[v] = _mm256_cvtepi32_ps(
          _mm256_sub_epi32(_mm256_or_si256(nib, _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(32)));
    }
  }
  static inline Scales scales(const uint8_t* row, int64_t s) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_at(b + 208);
    return {d * static_cast<float>(sc[2 * j]), d * static_cast<float>(sc[2 * j + 1]), 0.0f};
  }
};

// F16 and BF16 rows: any length; elements past the last whole 32 are read one by one (`at`).
struct F16 {
  static constexpr int64_t kElems = 1, kBytes = 2;
  static constexpr bool kBlockQuant = false;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const __m128i* p = reinterpret_cast<const __m128i*>(row + 64 * s);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_cvtph_ps(_mm_loadu_si128(p + v));
  }
  static inline float at(const uint8_t* row, int64_t k) { return half_at(row + 2 * k); }
};

struct BF16 {
  static constexpr int64_t kElems = 1, kBytes = 2;
  static constexpr bool kBlockQuant = false;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const __m128i* p = reinterpret_cast<const __m128i*>(row + 64 * s);
    for (int v = 0; v < 4; ++v) {
      w[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p + v)), 16));
    }
  }
  static inline float at(const uint8_t* row, int64_t k) {
    uint32_t bits = static_cast<uint32_t>(row[2 * k] | (row[2 * k + 1] << 8)) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

// Elements [32 s, 32 s + 32) of a row as their exact fp32 weights, in w[0..3].
template <class F>
inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
  if constexpr (F::kBlockQuant) {
    __m256 q[4];
    F::quants(row, s, q);
    const Scales sc = F::scales(row, s);
    const __m256 lo = _mm256_set1_ps(sc.lo), hi = F::kTwoScales ? _mm256_set1_ps(sc.hi) : lo;
    for (int v = 0; v < 4; ++v) {
      if constexpr (F::kOffset) {
        w[v] = _mm256_fmadd_ps(v < 2 ? lo : hi, q[v], _mm256_set1_ps(sc.offset));  // one rounding
      } else {
        w[v] = _mm256_mul_ps(v < 2 ? lo : hi, q[v]);
      }
    }
  } else {
    F::load(row, s, w);
  }
}

template <class F>
constexpr bool kHasTail = F::kElems == 1;

template <class F>
inline float tail_at(const uint8_t* row, int64_t k) {
  if constexpr (kHasTail<F>) {
    return F::at(row, k);
  } else {
    return 0.0f;
  }
}

template <class Fn>
void with_format(int64_t type, Fn&& fn) {
  switch (type) {
    case kF16: fn(F16{}); break;
    case kBF16: fn(BF16{}); break;
    case kQ4_0: fn(Q4_0{}); break;
    case kQ4_1: fn(Q4_1{}); break;
    case kQ5_0: fn(Q5_0{}); break;
    case kQ5_1: fn(Q5_1{}); break;
    case kQ8_0: fn(Q8_0{}); break;
    case kQ4_K: fn(Q4_K{}); break;
    case kQ5_K: fn(Q5_K{}); break;
    case kQ6_K: fn(Q6_K{}); break;
    default: TORCH_CHECK(false, "quantized linear: unsupported weight type ", type);
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// out[r * ldo] = x[r] . row for R rows of x: each 32-weight piece is dequantized once into registers for all of
// them. Few rows get several accumulators each, so that the FMA chains are long enough to hide its latency.
template <class F, int R>
inline void dot_rows(const uint8_t* row, int64_t K, const float* x, int64_t ldx, float* out, int64_t ldo) {
  constexpr int A = R == 1 ? 4 : (R == 2 ? 2 : 1);
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  const int64_t pieces = K / 32;
  for (int64_t s = 0; s < pieces; ++s) {
    __m256 w[4];
    load<F>(row, s, w);
    const float* xs = x + 32 * s;
    for (int v = 0; v < 4; ++v) {
      for (int r = 0; r < R; ++r) {
        acc[r][v % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + r * ldx + 8 * v), w[v], acc[r][v % A]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    float sum = hsum(total);
    for (int64_t k = 32 * pieces; k < K; ++k) sum += x[r * ldx + k] * tail_at<F>(row, k);
    out[r * ldo] = sum;
  }
}

// The factored dataflow for block formats, at the few rows of a decode step. A weight is w = scale * q + offset
// (Scales), so a row's dot product is, piece by piece, scale * (x . q) + offset * sum(x): the same real number as
// x . w, summed in another order, with one multiply-add per weight and row instead of two (the dequantization's and
// the product's), and sum(x) computed once per piece for every weight row. No value is rounded to fewer bits: the
// quants are small integers, exact in fp32, and the activations stay fp32. out[r * ldo] = x[r] . row for R rows of x;
// xsum[r * ldxs + s]: the sum of x[r]'s piece s (read only for formats with an offset).
template <class F, int R>
inline void factored_dot_rows(const uint8_t* row, int64_t K, const float* x, int64_t ldx, const float* xsum,
                              int64_t ldxs, float* out, int64_t ldo) {
  __m256 acc[R];
  float offsets[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    offsets[r] = 0.0f;
  }
  const int64_t pieces = K / 32;
  for (int64_t s = 0; s < pieces; ++s) {
    __m256 q[4];
    F::quants(row, s, q);
    const Scales sc = F::scales(row, s);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + 32 * s;
      const __m256 first = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), q[1], _mm256_mul_ps(_mm256_loadu_ps(xr), q[0]));
      const __m256 second =
          _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), q[3], _mm256_mul_ps(_mm256_loadu_ps(xr + 16), q[2]));
      if constexpr (F::kTwoScales) {
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc.lo), first, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc.hi), second, acc[r]);
      } else {
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc.lo), _mm256_add_ps(first, second), acc[r]);
      }
      if constexpr (F::kOffset) offsets[r] = std::fma(sc.offset, xsum[r * ldxs + s], offsets[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]) + offsets[r];
}

// Rows of x up to which flat_rows takes the factored dataflow: from 8 rows on, dequantizing each piece once for 8 rows
// costs less (measured on Q4_1 and Q8_0 at 1 to 8 rows).
constexpr int64_t kFactoredMaxRows = 7;

// The sums of each 32-float piece of the M rows of x [M, K]: sums[m * (K / 32) + s].
inline void piece_sums(const float* x, int64_t M, int64_t K, float* sums) {
  const int64_t pieces = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < pieces; ++s) {
      const float* p = x + m * K + 32 * s;
      const __m256 a = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
      const __m256 b = _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24));
      sums[m * pieces + s] = hsum(_mm256_add_ps(a, b));
    }
  }
}

template <class F>
void dequantize_row(const uint8_t* row, int64_t K, float* out) {
  const int64_t pieces = K / 32;
  for (int64_t s = 0; s < pieces; ++s) {
    __m256 w[4];
    load<F>(row, s, w);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 32 * s + 8 * v, w[v]);
  }
  for (int64_t k = 32 * pieces; k < K; ++k) out[k] = tail_at<F>(row, k);
}

// The packed dataflow, for many rows of x: BLAS's, with the dequantization inside the packing. Panels of kPanel weight
// rows are dequantized and transposed into [kc][kPanel] floats (k blocks of kPanelDepth, so that a panel stays in
// L1), then every strip of kStrip rows of x is multiplied by the panel with a kStrip x kPanel register tile: per k,
// two panel loads and kStrip broadcasts feed 2 * kStrip multiply-adds. Each weight is dequantized once per call.
constexpr int64_t kPanel = 16, kStrip = 6, kPanelDepth = 256, kXBlockBytes = 1 << 20;
constexpr int64_t kPackedMinRows = 12;  // from here on, packing costs less than dequantizing per 8 rows

// c[r * ldc + j] (+)= sum_k x[r * ldx + k] * panel[k * kPanel + j] for R rows and j < kPanel; `accumulate`: add to c.
template <int R>
inline void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t kc, float* c, int64_t ldc,
                       bool accumulate) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel), b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// The 8 x 8 floats of rows r[0..7] as columns: out[i][j] = r[j][i].
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// panel[k * kPanel + j] = rows[j * ld + k] for k < kc, j < kPanel: 8 x 8 blocks transposed in registers.
inline void pack_panel(const float* rows, int64_t ld, int64_t kc, float* panel) {
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int64_t j0 = 0; j0 < kPanel; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + (j0 + i) * ld + k);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k + i) * kPanel + j0, r[i]);
    }
  }
  for (; k < kc; ++k) {
    for (int64_t j = 0; j < kPanel; ++j) panel[k * kPanel + j] = rows[j * ld + k];
  }
}

template <class F>
void packed_rows(const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* out, int64_t ldo,
                 int64_t n0, int64_t n1) {
  // Blocks of rows of x small enough (about 1 MB) to stay in L2 while every panel passes over them; each block
  // dequantizes the panels again, once per its many rows.
  const int64_t block = std::max<int64_t>(4 * kStrip, (kXBlockBytes / (4 * K)) / kStrip * kStrip);
  std::vector<float> rows(kPanel * K), panel(kPanelDepth * kPanel), tile(std::min(block, M) * kPanel);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t mb = std::min(block, M - m0);
    const float* xb = x + m0 * K;
    for (int64_t p = n0; p < n1; p += kPanel) {
      const int64_t width = std::min(kPanel, n1 - p);
      for (int64_t j = 0; j < width; ++j) dequantize_row<F>(w + (p + j) * row_bytes, K, rows.data() + j * K);
      std::fill(rows.begin() + width * K, rows.end(), 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kPanelDepth) {
        const int64_t kc = std::min(kPanelDepth, K - k0);
        pack_panel(rows.data() + k0, K, kc, panel.data());
        int64_t m = 0;
        for (; m + kStrip <= mb; m += kStrip) {
          panel_tile<kStrip>(xb + m * K + k0, K, panel.data(), kc, tile.data() + m * kPanel, kPanel, k0 > 0);
        }
        const float* xm = xb + m * K + k0;
        float* tm = tile.data() + m * kPanel;
        switch (mb - m) {
          case 5: panel_tile<5>(xm, K, panel.data(), kc, tm, kPanel, k0 > 0); break;
          case 4: panel_tile<4>(xm, K, panel.data(), kc, tm, kPanel, k0 > 0); break;
          case 3: panel_tile<3>(xm, K, panel.data(), kc, tm, kPanel, k0 > 0); break;
          case 2: panel_tile<2>(xm, K, panel.data(), kc, tm, kPanel, k0 > 0); break;
          case 1: panel_tile<1>(xm, K, panel.data(), kc, tm, kPanel, k0 > 0); break;
          default: break;
        }
      }
      for (int64_t r = 0; r < mb; ++r) {
        std::copy(tile.data() + r * kPanel, tile.data() + r * kPanel + width, out + (m0 + r) * ldo + p);
      }
    }
  }
}

constexpr int64_t kRowBlock = 32;  // weight rows per block of flat_rows

// out[m * ldo + n] = x[m] . W[n] for the M rows of x (K floats apart) and weight rows n in [n0, n1) (row_bytes
// apart): FlashDecoding++'s flat GEMM, which streams each weight row once for every row of x. A block format at up
// to kFactoredMaxRows rows takes the factored dataflow (factored_dot_rows). Otherwise each piece is dequantized once
// for all rows: blocks of kRowBlock weight rows are swept by every group of 8 rows of x in turn, so that the group
// (8 x K floats) stays in L1 across the block and the block's stored bytes in L2 across the groups, where walking
// one weight row across all of x would stream x from L2 for every weight row.
template <class F>
void flat_rows(const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* out, int64_t ldo,
               int64_t n0, int64_t n1) {
  if constexpr (F::kBlockQuant) {
    if (M <= kFactoredMaxRows) {
      const int64_t pieces = K / 32;
      float sums[kFactoredMaxRows * 1024];
      std::vector<float> large;
      float* xsum = sums;
      if (F::kOffset && M * pieces > kFactoredMaxRows * 1024) {
        large.resize(M * pieces);
        xsum = large.data();
      }
      if (F::kOffset) piece_sums(x, M, K, xsum);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = w + n * row_bytes;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) factored_dot_rows<F, 4>(row, K, x + m * K, K, xsum + m * pieces, pieces,
                                                           out + m * ldo + n, ldo);
        if (M - m >= 2) {
          factored_dot_rows<F, 2>(row, K, x + m * K, K, xsum + m * pieces, pieces, out + m * ldo + n, ldo);
          m += 2;
        }
        if (m < M) factored_dot_rows<F, 1>(row, K, x + m * K, K, xsum + m * pieces, pieces, out + m * ldo + n, ldo);
      }
      return;
    }
  }
  if (M >= kPackedMinRows) return packed_rows<F>(w, row_bytes, K, x, M, out, ldo, n0, n1);
  for (int64_t b0 = n0; b0 < n1; b0 += kRowBlock) {
    const int64_t b1 = std::min(n1, b0 + kRowBlock);
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) {
      for (int64_t n = b0; n < b1; ++n) dot_rows<F, 8>(w + n * row_bytes, K, x + m * K, K, out + m * ldo + n, ldo);
    }
    const int64_t rest = M - m;
    for (int64_t n = b0; n < b1; ++n) {
      const uint8_t* row = w + n * row_bytes;
      int64_t r = m;
      if (rest & 4) { dot_rows<F, 4>(row, K, x + r * K, K, out + r * ldo + n, ldo); r += 4; }
      if (rest & 2) { dot_rows<F, 2>(row, K, x + r * K, K, out + r * ldo + n, ldo); r += 2; }
      if (rest & 1) dot_rows<F, 1>(row, K, x + r * K, K, out + r * ldo + n, ldo);
    }
  }
}

// A weight in its stored format: `rows` rows of `row_bytes` bytes, each holding K weights of ggml type `type`.
struct StoredMatrix {
  const uint8_t* data;
  int64_t type, rows, row_bytes, K;
};

inline void check_row_bytes(const StoredMatrix& w) {
  with_format(w.type, [&](auto format) {
    using F = decltype(format);
    if constexpr (!kHasTail<F>) {
      TORCH_CHECK(w.K % F::kElems == 0, "quantized linear: in_features ", w.K, " is not a multiple of the block size ",
                  F::kElems);
    }
    TORCH_CHECK(w.row_bytes == w.K / F::kElems * F::kBytes, "quantized linear: rows of ", w.row_bytes,
                " bytes do not hold ", w.K, " weights of this type");
  });
}

// flat_rows for a StoredMatrix's rows [n0, n1), its format chosen at run time.
inline void flat_rows(const StoredMatrix& w, const float* x, int64_t M, float* out, int64_t ldo, int64_t n0,
                      int64_t n1) {
  with_format(w.type, [&](auto format) {
    flat_rows<decltype(format)>(w.data, w.row_bytes, w.K, x, M, out, ldo, n0, n1);
  });
}

// Rows [n0, n1) of W as float32, K floats apart from out.
inline void dequantize_rows(const StoredMatrix& w, const int64_t* rows, int64_t n0, int64_t n1, float* out) {
  with_format(w.type, [&](auto format) {
    for (int64_t i = n0; i < n1; ++i) {
      const int64_t row = rows == nullptr ? i : rows[i];
      dequantize_row<decltype(format)>(w.data + row * w.row_bytes, w.K, out + (i - n0) * w.K);
    }
  });
}

}  // namespace foreseer_quant
