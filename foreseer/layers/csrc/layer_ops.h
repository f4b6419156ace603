// The small per-layer operations of a decoder, on one row (token) at a time: shared by the Python bindings
// (layer_ops_cpu.cpp) and the fused decoder (models/csrc/llama_decoder_cpu.cpp). float32 only; each computes what
// the PyTorch reference computes, in the same order per element (includers compile with -ffp-contract=off, so no
// product is fused into a sum), except the order of the RMSNorm's sum of squares.
#pragma once

#include <immintrin.h>
#include <sleef.h>

#include <cmath>
#include <cstdint>

namespace foreseer_ops {

inline float sum_of_squares(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  for (; i < n; ++i) sum += x[i] * x[i];
  return sum;
}

// out = weight * (r * rsqrt(mean(r^2) + eps)), where r = x, or, given `residual`, r = residual + x stored back into
// `residual` (the decoder's skip connection, added in the same pass).
inline void rms_norm_row(const float* x, float* residual, const float* weight, float eps, int64_t H, float* out) {
  const float* src = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < H; ++i) residual[i] += x[i];
    src = residual;
  }
  const float inv = 1.0f / std::sqrt(sum_of_squares(src, H) / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = weight[i] * (src[i] * inv);
}

// In place on `heads` heads of D values, `head_stride` floats apart: x * cos + rotate_half(x) * sin, with the
// position's rows c and s of the cos and sin tables.
inline void rotary_heads(float* x, int64_t heads, int64_t head_stride, const float* c, const float* s, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_stride;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * c[i] + (-x2) * s[i];
      v[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
  }
}

// o[i] = silu(g[i]) * u[i] for i < n; silu(g) = g / (1 + e^-g), with Sleef's 1-ULP expf, the exp PyTorch's own
// vectorized silu uses.
inline void silu_and_mul_range(const float* g, const float* u, float* o, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(zero, x));
    const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace foreseer_ops
