// Linear layers over weights kept in their checkpoint's format (GGUF blocks, F16, BF16), for the CPU.
// Each block is dequantized in registers to the exact fp32 values the checkpoint defines, bit for bit the gguf
// package's dequantize: a scale times a quant is exact in fp32 (at most 11 + 6 + 6 significant bits), so
// fusing it with the offset that follows rounds once, as the two steps of the reference do; nothing else is fused
// (the file is compiled with -ffp-contract=off). The weights then multiply fp32 activations. Only the summation order differs
// from dequantize-then-matmul, as between any two BLAS libraries.
//
// Two dataflows (FlashDecoding++'s flat GEMM and its heuristic choice; the choice is made in Python from timings
// taken at start-up): `flat_matmul` streams each weight row once for all rows of the step, for the few rows of a
// decode step; `tiled_matmul` dequantizes tiles of weight rows into a buffer and hands them to BLAS, for prefill.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// ggml's type numbers.
enum : int64_t { kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13,
                 kQ6_K = 14, kBF16 = 30 };

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256 u8_to_ps(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// The 32 nibbles of 16 bytes: low nibbles are elements 0..15, high nibbles 16..31 (ggml's order), as 4 x 8 u8.
inline void nibbles(__m128i q, __m128i out[4]) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  out[0] = lo;
  out[1] = _mm_srli_si128(lo, 8);
  out[2] = hi;
  out[3] = _mm_srli_si128(hi, 8);
}

// Bit i of `bits` >> shift, for 8 lanes, as int32 0/1.
inline __m256i bit_lanes(uint32_t bits) {
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                          _mm256_set1_epi32(1));
}

// Each format: kElems weights in kBytes; load(row, s, w) puts elements [32 s, 32 s + 32) of a row into w[0..3].
struct Q4_0 {
  static constexpr int64_t kElems = 32, kBytes = 18;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + s * kBytes;
    const __m256 d = _mm256_set1_ps(half_at(b));
    __m128i q[4];
    nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)), q);
    for (int v = 0; v < 4; ++v) {
      const __m256i qi = _mm256_sub_epi32(_mm256_cvtepu8_epi32(q[v]), _mm256_set1_epi32(8));
      w[v] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(qi));
    }
  }
};

struct Q4_1 {
  static constexpr int64_t kElems = 32, kBytes = 20;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + s * kBytes;
    const __m256 d = _mm256_set1_ps(half_at(b)), m = _mm256_set1_ps(half_at(b + 2));
    __m128i q[4];
    nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)), q);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_fmadd_ps(d, u8_to_ps(q[v]), m);  // d * q is exact: one rounding
  }
};

// Q5_0 and Q5_1: a fifth bit per weight in a 32-bit word.
inline void five_bit(const uint8_t* qh_bytes, const uint8_t* qs, __m256i q[4]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  __m128i lo[4];
  nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), lo);
  for (int v = 0; v < 4; ++v) {
    const __m256i high = _mm256_slli_epi32(bit_lanes(qh >> (8 * v)), 4);
    q[v] = _mm256_or_si256(_mm256_cvtepu8_epi32(lo[v]), high);
  }
}

struct Q5_0 {
  static constexpr int64_t kElems = 32, kBytes = 22;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + s * kBytes;
    const __m256 d = _mm256_set1_ps(half_at(b));
    __m256i q[4];
    five_bit(b + 2, b + 6, q);
    for (int v = 0; v < 4; ++v) {
      w[v] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[v], _mm256_set1_epi32(16))));
    }
  }
};

struct Q5_1 {
  static constexpr int64_t kElems = 32, kBytes = 24;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + s * kBytes;
    const __m256 d = _mm256_set1_ps(half_at(b)), m = _mm256_set1_ps(half_at(b + 2));
    __m256i q[4];
    five_bit(b + 4, b + 8, q);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[v]), m);  // d * q is exact
  }
};

struct Q8_0 {
  static constexpr int64_t kElems = 32, kBytes = 34;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + s * kBytes;
    const __m256 d = _mm256_set1_ps(half_at(b));
    for (int v = 0; v < 4; ++v) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v));
      w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
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

// The 32 low (even j) or high (odd j) nibbles of 32 bytes, as 4 x 8 u8.
inline void nibbles32(const uint8_t* qs, int64_t j, __m128i out[4]) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i shifted = (j & 1) ? _mm256_srli_epi16(bytes, 4) : bytes;
  const __m256i nib = _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
  const __m128i lo = _mm256_castsi256_si128(nib), hi = _mm256_extracti128_si256(nib, 1);
  out[0] = lo;
  out[1] = _mm_srli_si128(lo, 8);
  out[2] = hi;
  out[3] = _mm_srli_si128(hi, 8);
}

// A Q4_K/Q5_K block's sub-block j: its scale d * sc and offset dmin * m, each product exact in fp32.
inline void k_scale_min(const uint8_t* b, int64_t j, __m256* d, __m256* dm) {
  float sc, mn;
  scale_min_k4(j, b + 4, &sc, &mn);
  *d = _mm256_set1_ps(half_at(b) * sc);
  *dm = _mm256_set1_ps(half_at(b + 2) * mn);
}

struct Q4_K {
  static constexpr int64_t kElems = 256, kBytes = 144;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7;
    __m256 d, dm;
    k_scale_min(b, j, &d, &dm);
    __m128i q[4];
    nibbles32(b + 16 + 32 * (j >> 1), j, q);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_fmsub_ps(d, u8_to_ps(q[v]), dm);  // (d * sc) * q is exact
  }
};

struct Q5_K {
  static constexpr int64_t kElems = 256, kBytes = 176;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7;
    __m256 d, dm;
    k_scale_min(b, j, &d, &dm);
    __m128i q[4];
    nibbles32(b + 48 + 32 * (j >> 1), j, q);
    const uint8_t* qh = b + 16;
    for (int v = 0; v < 4; ++v) {
      const __m256i high = _mm256_and_si256(
          _mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qh + 8 * v))),
                            static_cast<int>(j)),
          _mm256_set1_epi32(1));
      const __m256i qi = _mm256_or_si256(_mm256_cvtepu8_epi32(q[v]), _mm256_slli_epi32(high, 4));
      w[v] = _mm256_fmsub_ps(d, _mm256_cvtepi32_ps(qi), dm);  // (d * sc) * q is exact
    }
  }
};

struct Q6_K {
  static constexpr int64_t kElems = 256, kBytes = 210;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int64_t j = s & 7, half = j >> 2, g = j & 3;
    const uint8_t* ql = b + 64 * half + 32 * (g & 1);
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_at(b + 208);
    const __m256 d0 = _mm256_set1_ps(d * static_cast<float>(scales[2 * j]));
    const __m256 d1 = _mm256_set1_ps(d * static_cast<float>(scales[2 * j + 1]));
    for (int v = 0; v < 4; ++v) {
      const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ql + 8 * v)));
      const __m256i nib = _mm256_and_si256(g < 2 ? low : _mm256_srli_epi32(low, 4), _mm256_set1_epi32(0x0F));
      const __m256i high = _mm256_and_si256(
          _mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qh + 8 * v))),
                            static_cast<int>(2 * g)),
          _mm256_set1_epi32(3));
      const __m256i qi = _mm256_sub_epi32(_mm256_or_si256(nib, _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(32));
      w[v] = _mm256_mul_ps(v < 2 ? d0 : d1, _mm256_cvtepi32_ps(qi));
    }
  }
};

// F16 and BF16 rows: any length; elements past the last whole 32 are read one by one (`at`).
struct F16 {
  static constexpr int64_t kElems = 1, kBytes = 2;
  static inline void load(const uint8_t* row, int64_t s, __m256 w[4]) {
    const __m128i* p = reinterpret_cast<const __m128i*>(row + 64 * s);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_cvtph_ps(_mm_loadu_si128(p + v));
  }
  static inline float at(const uint8_t* row, int64_t k) { return half_at(row + 2 * k); }
};

struct BF16 {
  static constexpr int64_t kElems = 1, kBytes = 2;
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
    F::load(row, s, w);
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

template <class F>
void dequantize_row(const uint8_t* row, int64_t K, float* out) {
  const int64_t pieces = K / 32;
  for (int64_t s = 0; s < pieces; ++s) {
    __m256 w[4];
    F::load(row, s, w);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 32 * s + 8 * v, w[v]);
  }
  for (int64_t k = 32 * pieces; k < K; ++k) out[k] = tail_at<F>(row, k);
}

void check_weight(const torch::Tensor& weight, int64_t in_features) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "quantized linear: the weight must be a contiguous [out_features, row_bytes] uint8 tensor");
  TORCH_CHECK(in_features > 0, "quantized linear: in_features must be positive");
}

template <class F>
void check_row_bytes(const torch::Tensor& weight, int64_t K) {
  if constexpr (!kHasTail<F>) {
    TORCH_CHECK(K % F::kElems == 0, "quantized linear: in_features ", K, " is not a multiple of the block size ",
                F::kElems);
  }
  TORCH_CHECK(weight.size(1) == K / F::kElems * F::kBytes, "quantized linear: rows of ", weight.size(1),
              " bytes do not hold ", K, " weights of this type");
}

torch::Tensor activations(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K,
              "quantized linear: activations must be float32 [rows, in_features]");
  return x.contiguous();
}

}  // namespace

constexpr int64_t kRowBlock = 32;  // weight rows per block of flat_matmul

// y = x W^T, W streamed once: output rows are split among threads, and each weight row serves every row of x.
torch::Tensor flat_matmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in_features) {
  check_weight(weight, in_features);
  x = activations(x, in_features);
  const int64_t M = x.size(0), N = weight.size(0), K = in_features, row_bytes = weight.size(1);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_format(type, [&](auto format) {
    using F = decltype(format);
    check_row_bytes<F>(weight, K);
    at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
      // Blocks of kRowBlock weight rows, each swept by every group of 8 rows of x in turn: the group (8 x K
      // floats) stays in L1 across the block, and the block's stored bytes in L2 across the groups, where
      // walking one weight row across all of x would stream x from L2 for every weight row.
      for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
        const int64_t n1 = std::min(end, n0 + kRowBlock);
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) {
          for (int64_t n = n0; n < n1; ++n) dot_rows<F, 8>(wp + n * row_bytes, K, xp + m * K, K, op + m * N + n, N);
        }
        const int64_t rest = M - m;
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* row = wp + n * row_bytes;
          int64_t r = m;
          if (rest & 4) { dot_rows<F, 4>(row, K, xp + r * K, K, op + r * N + n, N); r += 4; }
          if (rest & 2) { dot_rows<F, 2>(row, K, xp + r * K, K, op + r * N + n, N); r += 2; }
          if (rest & 1) dot_rows<F, 1>(row, K, xp + r * K, K, op + r * N + n, N);
        }
      }
    });
  });
  return out;
}

// W's rows `rows` (int64) as float32 [len(rows), in_features]: the embedding lookup.
torch::Tensor dequantize_rows(torch::Tensor weight, int64_t type, int64_t in_features, torch::Tensor rows) {
  check_weight(weight, in_features);
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 1, "dequantize_rows: rows must be 1-D int64");
  rows = rows.contiguous();
  const int64_t n = rows.size(0), N = weight.size(0), K = in_features, row_bytes = weight.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "dequantize_rows: row ", rp[i], " is out of range [0, ", N, ")");
  }
  auto out = torch::empty({n, K}, torch::dtype(torch::kFloat32));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_format(type, [&](auto format) {
    using F = decltype(format);
    check_row_bytes<F>(weight, K);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dequantize_row<F>(wp + rp[i] * row_bytes, K, op + i * K);
    });
  });
  return out;
}

// The whole weight as float32 [out_features, in_features].
torch::Tensor dequantize(torch::Tensor weight, int64_t type, int64_t in_features) {
  check_weight(weight, in_features);
  const int64_t N = weight.size(0), K = in_features, row_bytes = weight.size(1);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_format(type, [&](auto format) {
    using F = decltype(format);
    check_row_bytes<F>(weight, K);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) dequantize_row<F>(wp + n * row_bytes, K, op + n * K);
    });
  });
  return out;
}

// y = x W^T for many rows: tiles of `tile_rows` weight rows are dequantized into one buffer (small enough to stay
// in cache) and multiplied by BLAS, whose GEMM runs near the machine's peak once x has enough rows.
torch::Tensor tiled_matmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in_features,
                           int64_t tile_rows) {
  check_weight(weight, in_features);
  x = activations(x, in_features);
  TORCH_CHECK(tile_rows >= 1, "tiled_matmul: tile_rows must be >= 1");
  const int64_t M = x.size(0), N = weight.size(0), K = in_features, row_bytes = weight.size(1);
  auto out = torch::empty({M, N}, x.options());
  auto tile = torch::empty({std::min(tile_rows, N), K}, x.options());
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* tp = tile.data_ptr<float>();
  with_format(type, [&](auto format) {
    using F = decltype(format);
    check_row_bytes<F>(weight, K);
    for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, N - n0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) dequantize_row<F>(wp + (n0 + n) * row_bytes, K, tp + n * K);
      });
      auto out_tile = out.narrow(1, n0, rows);
      at::mm_out(out_tile, x, tile.narrow(0, 0, rows).t());
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("flat_matmul", &flat_matmul, "x @ W^T, W in its stored format, streamed once (decode steps)");
  m.def("tiled_matmul", &tiled_matmul, "x @ W^T by dequantized tiles and BLAS (prefill)");
  m.def("dequantize_rows", &dequantize_rows, "rows of W as float32 (embedding lookup)");
  m.def("dequantize", &dequantize, "W as float32");
}
