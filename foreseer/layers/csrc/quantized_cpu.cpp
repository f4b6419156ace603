// Linear layers over weights kept in their checkpoint's format, for the CPU: the Python bindings of the kernels in
// quantized.h. Two dataflows (FlashDecoding++'s flat GEMM and its heuristic choice; the choice is made in Python from
// timings taken at start-up): `flat_matmul` streams each weight row once for all rows of the step, for the few rows
// of a decode step; `tiled_matmul` dequantizes tiles of weight rows into a buffer and hands them to BLAS, for prefill.
#include "layers/csrc/quantized.h"

#include <ATen/Parallel.h>

using foreseer_quant::StoredMatrix;

namespace {

StoredMatrix stored(const torch::Tensor& weight, int64_t type, int64_t in_features) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "quantized linear: the weight must be a contiguous [out_features, row_bytes] uint8 tensor");
  TORCH_CHECK(in_features > 0, "quantized linear: in_features must be positive");
  StoredMatrix w{weight.data_ptr<uint8_t>(), type, weight.size(0), weight.size(1), in_features};
  foreseer_quant::check_row_bytes(w);
  return w;
}

torch::Tensor activations(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K,
              "quantized linear: activations must be float32 [rows, in_features]");
  return x.contiguous();
}

}  // namespace

// y = x W^T, W streamed once: output rows are split among threads, and each weight row serves every row of x.
torch::Tensor flat_matmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in_features) {
  const StoredMatrix w = stored(weight, type, in_features);
  x = activations(x, in_features);
  const int64_t M = x.size(0);
  auto out = torch::empty({M, w.rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.rows, 8, [&](int64_t begin, int64_t end) {
    foreseer_quant::flat_rows(w, xp, M, op, w.rows, begin, end);
  });
  return out;
}

// W's rows `rows` (int64) as float32 [len(rows), in_features]: the embedding lookup.
torch::Tensor dequantize_rows(torch::Tensor weight, int64_t type, int64_t in_features, torch::Tensor rows) {
  const StoredMatrix w = stored(weight, type, in_features);
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 1, "dequantize_rows: rows must be 1-D int64");
  rows = rows.contiguous();
  const int64_t n = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < w.rows, "dequantize_rows: row ", rp[i], " is out of range [0, ", w.rows, ")");
  }
  auto out = torch::empty({n, in_features}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    foreseer_quant::dequantize_rows(w, rp, begin, end, op + begin * in_features);
  });
  return out;
}

// The whole weight as float32 [out_features, in_features].
torch::Tensor dequantize(torch::Tensor weight, int64_t type, int64_t in_features) {
  const StoredMatrix w = stored(weight, type, in_features);
  auto out = torch::empty({w.rows, in_features}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.rows, 16, [&](int64_t begin, int64_t end) {
    foreseer_quant::dequantize_rows(w, nullptr, begin, end, op + begin * in_features);
  });
  return out;
}

// y = x W^T for many rows: tiles of `tile_rows` weight rows are dequantized into one buffer (small enough to stay
// in cache) and multiplied by BLAS, whose GEMM runs near the machine's peak once x has enough rows.
torch::Tensor tiled_matmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in_features,
                           int64_t tile_rows) {
  const StoredMatrix w = stored(weight, type, in_features);
  x = activations(x, in_features);
  TORCH_CHECK(tile_rows >= 1, "tiled_matmul: tile_rows must be >= 1");
  const int64_t M = x.size(0), N = w.rows;
  auto out = torch::empty({M, N}, x.options());
  // The tile's memory is kept from call to call: a fresh 2 MB buffer costs 512 page faults, about as long as
  // dequantizing a small weight and multiplying it.
  thread_local std::vector<float> scratch;
  scratch.resize(std::max<size_t>(scratch.size(), std::min(tile_rows, N) * in_features));
  auto tile = torch::from_blob(scratch.data(), {std::min(tile_rows, N), in_features}, x.options());
  float* tp = scratch.data();
  for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, N - n0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      foreseer_quant::dequantize_rows(w, nullptr, n0 + begin, n0 + end, tp + begin * in_features);
    });
    auto out_tile = out.narrow(1, n0, rows);
    at::mm_out(out_tile, x, tile.narrow(0, 0, rows).t());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("flat_matmul", &flat_matmul, "x @ W^T, W in its stored format, streamed once (decode steps)");
  m.def("tiled_matmul", &tiled_matmul, "x @ W^T by dequantized tiles and BLAS (prefill)");
  m.def("dequantize_rows", &dequantize_rows, "rows of W as float32 (embedding lookup)");
  m.def("dequantize", &dequantize, "W as float32");
}
