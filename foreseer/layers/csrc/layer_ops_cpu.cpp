// The small per-layer operations of a decoder, each one call instead of the five to ten PyTorch ops (and their
// temporaries) it takes in Python: at batch 1 those ops cost more than the layer's matmuls. The Python bindings of
// layer_ops.h.
#include "layers/csrc/layer_ops.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.stride(1) == 1,
              what, ": expected float32 [tokens, features] with contiguous rows");
}

// Rows per parallel task: one decode token is far too little work to wake a second thread.
constexpr int64_t kRowGrain = 16;

}  // namespace

// out = weight * (r * rsqrt(mean(r^2) + eps)) per row, where r = x, or, given `residual`, r = residual + x stored
// back into `residual` (the decoder's skip connection, added in the same pass). Returns out.
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
  check_rows(x, "rms_norm");
  weight = weight.contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.numel() == H, "rms_norm: weight must be float32 [",
              H, "]");
  float* rp = nullptr;
  int64_t r_stride = 0;
  if (residual.has_value()) {
    check_rows(*residual, "rms_norm");
    TORCH_CHECK(residual->size(0) == T && residual->size(1) == H, "rms_norm: residual must match x");
    rp = residual->data_ptr<float>();
    r_stride = residual->stride(0);
  }
  auto out = torch::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      foreseer_ops::rms_norm_row(xp + t * x_stride, rp == nullptr ? nullptr : rp + t * r_stride, wp, feps, H,
                                 op + t * H);
    }
  });
  return out;
}

// In place on q [T, Hq, D] and k [T, Hk, D] (rows may be strided views of a fused qkv output; each head's D values
// contiguous): x * cos + rotate_half(x) * sin with cos, sin [max_positions, D] rows taken at `positions` [T].
void apply_rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions) {
  for (const auto* t : {&q, &k}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->dim() == 3 && t->stride(2) == 1,
                "apply_rotary_: q and k must be float32 [tokens, heads, head_dim] with contiguous heads");
  }
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2,
              "apply_rotary_: cos and sin must be contiguous [max_positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1, "apply_rotary_: positions: 1-D int64");
  positions = positions.contiguous();
  const int64_t T = q.size(0), D = q.size(2), max_pos = cos.size(0);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && cos.size(1) == D && positions.numel() == T && D % 2 == 0,
              "apply_rotary_: shapes of q, k, cos and positions disagree");
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "apply_rotary_: position ", pp[t], " is outside [0, ", max_pos, ")");
  }
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (const auto* x : {&q, &k}) {
      float* base = x->data_ptr<float>();
      for (int64_t t = begin; t < end; ++t) {
        foreseer_ops::rotary_heads(base + t * x->stride(0), x->size(1), x->stride(1), cp + pp[t] * D, sp + pp[t] * D,
                                   D);
      }
    }
  });
}

// silu(gate) * up for gate_up [T, 2 I] (gate first): [T, I].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "silu_and_mul");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_and_mul: the last dimension must be even");
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) foreseer_ops::silu_and_mul_range(gp + t * stride, gp + t * stride + I,
                                                                           op + t * I, I);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after adding x into the residual (CPU, float32)");
  m.def("apply_rotary_", &apply_rotary_, "rotary embedding of q and k, in place (CPU, float32)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up (CPU, float32)");
}
