// Micro-kernels that measure the machine's limits (float32, AVX2 + FMA), one OpenMP thread per core:
//   fma_chains:  kChains independent __m256 FMA chains per thread, enough to cover the FMA latency on every port,
//                so the loop runs at the FMA issue rate (2 * 8 * 2 FLOP per cycle per core on two 256-bit ports).
//   read_sum:    each thread streams its contiguous share of a float32 buffer with 256-bit loads into
//                kLoadAccumulators independent sums: a pure read, no stores.
// Both return a checksum that depends on every operation, so the compiler cannot drop the work.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <vector>

namespace {

constexpr int kChains = 12;
constexpr int kLoadAccumulators = 8;
constexpr int64_t kLanes = 8;

float horizontal_sum(__m256 v) {
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, v);
  float total = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

// `iterations` rounds of kChains independent FMAs (acc = acc * b + c) on each of `threads` threads:
// threads * iterations * kChains * 8 lanes * 2 FLOP in all.
double fma_chains(int64_t iterations, int64_t threads) {
  std::vector<double> partial(threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    __m256 acc[kChains];
    for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(1.0f + 0.001f * static_cast<float>(j + t));
    // acc converges to c / (1 - b): no overflow, no denormals.
    const __m256 b = _mm256_set1_ps(0.999999f);
    const __m256 c = _mm256_set1_ps(1e-6f);
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
      for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], b, c);
    }
    __m256 total = acc[0];
    for (int j = 1; j < kChains; ++j) total = _mm256_add_ps(total, acc[j]);
    partial[t] = horizontal_sum(total);
  }
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// The sum of a contiguous float32 tensor whose length is a multiple of block_floats, each of `threads` threads
// reading its own contiguous share of whole blocks.
double read_sum(const torch::Tensor& buffer, int64_t threads) {
  TORCH_CHECK(buffer.scalar_type() == torch::kFloat32 && buffer.is_contiguous(), "read_sum: contiguous float32");
  const float* data = buffer.data_ptr<float>();
  const int64_t step = kLanes * kLoadAccumulators;
  TORCH_CHECK(buffer.numel() % step == 0, "read_sum: length must be a multiple of ", step);
  const int64_t blocks = buffer.numel() / step;
  std::vector<double> partial(threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    const int64_t begin = blocks * t / threads, end = blocks * (t + 1) / threads;
    __m256 acc[kLoadAccumulators];
    for (int j = 0; j < kLoadAccumulators; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t block = begin; block < end; ++block) {
      const float* p = data + block * step;
#pragma GCC unroll 8
      for (int j = 0; j < kLoadAccumulators; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(p + j * kLanes));
    }
    __m256 total = acc[0];
    for (int j = 1; j < kLoadAccumulators; ++j) total = _mm256_add_ps(total, acc[j]);
    partial[t] = horizontal_sum(total);
  }
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fma_chains", &fma_chains, "independent AVX2 FMA chains on each thread; returns a checksum");
  m.def("read_sum", &read_sum, "parallel AVX2 streaming sum of a float32 buffer; returns the sum");
  m.attr("chains") = kChains;
  m.attr("block_floats") = kLanes * kLoadAccumulators;
}
