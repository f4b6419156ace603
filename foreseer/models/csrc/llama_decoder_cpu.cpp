// A whole decode step of a Llama-family decoder in one call, for the CPU: the embedding lookup, every layer
// (RMSNorm, qkv, rotary, KV write, split-KV attention, o_proj, RMSNorm, gate_up, SiLU-mul, down) and the final norm,
// for a batch whose every token is a decode row. It runs the same kernels as the PyTorch modules do one call at a
// time (quantized.h, layer_ops.h, paged_attention.h), row for row in the same order, so its output is bit for bit
// theirs; what it removes is the Python and dispatch between them, and the thread pool's start and stop around each
// kernel: the step is one OpenMP parallel region whose threads meet at a barrier between phases.
#include "attention/csrc/paged_attention.h"
#include "layers/csrc/layer_ops.h"
#include "layers/csrc/quantized.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <atomic>
#include <memory>
#include <tuple>
#include <vector>

namespace {

using foreseer_quant::StoredMatrix;

// y = x W^T (+ b), W as row-stacked parts in their stored formats.
struct Linear {
  std::vector<StoredMatrix> parts;
  std::vector<int64_t> first_row;  // of each part in the output
  int64_t in = 0, out = 0;
  const float* bias = nullptr;

  // Output columns [begin, end) of y [M, out] for the M rows of x [M, in].
  void columns(const float* x, int64_t M, float* y, int64_t begin, int64_t end) const {
    for (size_t p = 0; p < parts.size(); ++p) {
      const int64_t first = first_row[p], lo = std::max(begin, first), hi = std::min(end, first + parts[p].rows);
      if (lo < hi) foreseer_quant::flat_rows(parts[p], x, M, y + first, out, lo - first, hi - first);
    }
    if (bias != nullptr) {
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = begin; n < end; ++n) y[m * out + n] += bias[n];
      }
    }
  }
};

struct Layer {
  const float* input_norm;
  const float* post_norm;
  Linear qkv, o, gate_up, down;
  float* k_cache;
  float* v_cache;
};

// This thread's share [begin, end) of n items, cut at multiples of `align`.
std::pair<int64_t, int64_t> share(int64_t n, int64_t align) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * t / nt * align), std::min(n, units * (t + 1) / nt * align)};
}

constexpr int64_t kOutputAlign = 8;  // output columns per share of a matmul: whole 32-byte stores

class LlamaDecoder {
 public:
  LlamaDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate,
               double eps, double scale, torch::Tensor cos, torch::Tensor sin, torch::Tensor embed,
               int64_t embed_type, torch::Tensor final_norm, int64_t block_size)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), hidden_(hidden),
        intermediate_(intermediate), block_size_(block_size), eps_(static_cast<float>(eps)),
        scale_(static_cast<float>(scale)) {
    TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "llama decoder: bad head counts");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == head_dim &&
                    cos.sizes() == sin.sizes() && cos.scalar_type() == torch::kFloat32,
                "llama decoder: cos and sin must be contiguous float32 [max_positions, head_dim]");
    cos_ = keep(cos).data_ptr<float>();
    sin_ = keep(sin).data_ptr<float>();
    max_positions_ = cos.size(0);
    embed_ = stored(embed, embed_type, hidden);
    final_norm_ = vector(final_norm, hidden, "final norm");
  }

  // Layers in order. Each linear is its stored parts (uint8 [rows, row_bytes]) with their ggml types, and a bias.
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, std::vector<torch::Tensor> qkv,
                 std::vector<int64_t> qkv_types, c10::optional<torch::Tensor> qkv_bias, std::vector<torch::Tensor> o,
                 std::vector<int64_t> o_types, std::vector<torch::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                 std::vector<torch::Tensor> down, std::vector<int64_t> down_types, torch::Tensor k_cache,
                 torch::Tensor v_cache) {
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    Layer layer;
    layer.input_norm = vector(input_norm, hidden_, "input norm");
    layer.post_norm = vector(post_norm, hidden_, "post-attention norm");
    layer.qkv = linear(qkv, qkv_types, hidden_, q_size + 2 * kv_size, qkv_bias);
    layer.o = linear(o, o_types, q_size, hidden_, c10::nullopt);
    layer.gate_up = linear(gate_up, gate_up_types, hidden_, 2 * intermediate_, c10::nullopt);
    layer.down = linear(down, down_types, intermediate_, hidden_, c10::nullopt);
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32 &&
                    v_cache.scalar_type() == torch::kFloat32 && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                    k_cache.size(1) == num_kv_heads_ && k_cache.size(2) == head_dim_ &&
                    k_cache.size(3) == block_size_ && v_cache.size(0) == k_cache.size(0) &&
                    v_cache.size(1) == block_size_ && v_cache.size(2) == num_kv_heads_ && v_cache.size(3) == head_dim_,
                "llama decoder: caches must be contiguous float32 keys [blocks, Hkv, D, block_size] and values "
                "[blocks, block_size, Hkv, D]");
    num_blocks_ = k_cache.size(0);
    layer.k_cache = keep(k_cache).data_ptr<float>();
    layer.v_cache = keep(v_cache).data_ptr<float>();
    layers_.push_back(layer);
  }

  // The final hidden states [T, hidden] of T decode rows (token ids, positions, cache slots, block tables
  // [T, max_blocks], tokens each row sees), the residual stream after each layer in `capture` (0-based), and how
  // many attention partials left the unified max's band (phi: as paged_decode_split takes it).
  std::tuple<torch::Tensor, std::vector<torch::Tensor>, int64_t> forward(
      torch::Tensor ids, torch::Tensor positions, torch::Tensor slots, torch::Tensor block_tables,
      torch::Tensor seq_lens, std::vector<int64_t> capture, double phi, int64_t chunk_tokens) {
    for (const auto* t : {&ids, &positions, &slots, &seq_lens}) {
      TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->is_contiguous(),
                  "llama decoder: ids, positions, slots and seq_lens must be contiguous 1-D int64");
    }
    TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.dim() == 2 &&
                    block_tables.is_contiguous(), "llama decoder: block tables must be contiguous 2-D int64");
    const int64_t T = ids.size(0), width = block_tables.size(1);
    TORCH_CHECK(positions.size(0) == T && slots.size(0) == T && seq_lens.size(0) == T && block_tables.size(0) == T,
                "llama decoder: one position, slot, seq_len and block table per row");
    const int64_t* id = ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const int64_t* table = block_tables.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(id[t] >= 0 && id[t] < embed_.rows, "llama decoder: token id ", id[t], " is out of range");
      TORCH_CHECK(pos[t] >= 0 && pos[t] < max_positions_, "llama decoder: position ", pos[t], " is outside [0, ",
                  max_positions_, ")");
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num_blocks_ * block_size_, "llama decoder: slot ", slot[t],
                  " is outside the cache");
      TORCH_CHECK(lens[t] >= 1 && lens[t] <= width * block_size_, "llama decoder: row ", t, " sees ", lens[t],
                  " tokens, its block table holds ", width * block_size_);
      for (int64_t j = 0; j < (lens[t] + block_size_ - 1) / block_size_; ++j) {
        TORCH_CHECK(table[t * width + j] >= 0 && table[t * width + j] < num_blocks_, "llama decoder: block ",
                    table[t * width + j], " is outside the cache");
      }
    }
    std::vector<bool> captured(layers_.size(), false);
    std::vector<torch::Tensor> outputs;
    for (int64_t layer : capture) {
      TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "llama decoder: no layer ", layer);
      captured[layer] = true;
    }
    std::vector<float*> capture_at(layers_.size(), nullptr);
    for (int64_t layer : capture) {
      outputs.push_back(torch::empty({T, hidden_}, torch::kFloat32));
      capture_at[layer] = outputs.back().data_ptr<float>();
    }

    const int64_t H = hidden_, I = intermediate_, D = head_dim_;
    const int64_t q_size = num_heads_ * D, kv_size = num_kv_heads_ * D, qkv_size = q_size + 2 * kv_size;
    auto out = torch::empty({T, H}, torch::kFloat32);
    std::vector<float> x(T * H), residual(T * H), h(T * H), qkv(T * qkv_size), attn(T * q_size), gate_up(T * 2 * I),
        act(T * I);
    const int64_t threads = at::get_num_threads();
    const foreseer_attn::PagedKv shape{nullptr, nullptr, num_kv_heads_, D, block_size_, block_size_ * kv_size,
                                       kv_size, D};
    const foreseer_attn::DecodeRows rows{qkv.data(), qkv_size, T, num_heads_, table, width, lens, scale_,
                                         static_cast<float>(phi)};
    const foreseer_attn::SplitKvPlan plan(rows, shape, chunk_tokens, threads);
    std::vector<float> partials(plan.partial_floats());
    std::atomic<int64_t> fallbacks{0};
    float* final_out = out.data_ptr<float>();

#pragma omp parallel num_threads(threads)
    {
      std::vector<float> scores;
      int64_t local_fallbacks = 0;
#pragma omp for
      for (int64_t t = 0; t < T; ++t) {
        foreseer_quant::dequantize_rows(embed_, id, t, t + 1, x.data() + t * H);
        std::copy(x.data() + t * H, x.data() + (t + 1) * H, residual.data() + t * H);
      }
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& layer = layers_[l];
        // The first layer's residual stream is the embedding itself; later ones add the last layer's output.
#pragma omp for
        for (int64_t t = 0; t < T; ++t) {
          foreseer_ops::rms_norm_row(x.data() + t * H, l == 0 ? nullptr : residual.data() + t * H, layer.input_norm,
                                     eps_, H, h.data() + t * H);
        }
        auto [q0, q1] = share(qkv_size, kOutputAlign);
        layer.qkv.columns(h.data(), T, qkv.data(), q0, q1);
#pragma omp barrier
        const foreseer_attn::PagedKv kv{layer.k_cache, layer.v_cache, num_kv_heads_, D, block_size_,
                                        block_size_ * kv_size, kv_size, D};
#pragma omp for
        for (int64_t t = 0; t < T; ++t) {
          float* row = qkv.data() + t * qkv_size;
          const float* c = cos_ + pos[t] * D;
          const float* s = sin_ + pos[t] * D;
          foreseer_ops::rotary_heads(row, num_heads_, D, c, s, D);
          foreseer_ops::rotary_heads(row + q_size, num_kv_heads_, D, c, s, D);
          foreseer_attn::write_kv_token(row + q_size, row + q_size + kv_size, layer.k_cache, layer.v_cache, slot[t],
                                        num_kv_heads_, D, block_size_);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < plan.num_tasks(); ++i) {
          plan.run_task(i, kv, qkv.data(), partials.data(), scores, local_fallbacks);
        }
        auto [r0, r1] = share(T * num_heads_, 1);
        plan.merge_rows(r0, r1, partials.data(), attn.data());
#pragma omp barrier
        auto [o0, o1] = share(H, kOutputAlign);
        layer.o.columns(attn.data(), T, x.data(), o0, o1);
#pragma omp barrier
#pragma omp for
        for (int64_t t = 0; t < T; ++t) {
          foreseer_ops::rms_norm_row(x.data() + t * H, residual.data() + t * H, layer.post_norm, eps_, H,
                                     h.data() + t * H);
        }
        auto [g0, g1] = share(2 * I, kOutputAlign);
        layer.gate_up.columns(h.data(), T, gate_up.data(), g0, g1);
#pragma omp barrier
        auto [a0, a1] = share(I, kOutputAlign);
        for (int64_t t = 0; t < T; ++t) {
          const float* g = gate_up.data() + t * 2 * I;
          foreseer_ops::silu_and_mul_range(g + a0, g + I + a0, act.data() + t * I + a0, a1 - a0);
        }
#pragma omp barrier
        auto [d0, d1] = share(H, kOutputAlign);
        layer.down.columns(act.data(), T, x.data(), d0, d1);
#pragma omp barrier
        if (capture_at[l] != nullptr) {  // the residual stream after the layer, as the modules' hooks see it
          float* dst = capture_at[l];
#pragma omp for
          for (int64_t i = 0; i < T * H; ++i) dst[i] = x[i] + residual[i];
        }
      }
#pragma omp for
      for (int64_t t = 0; t < T; ++t) {
        foreseer_ops::rms_norm_row(x.data() + t * H, residual.data() + t * H, final_norm_, eps_, H,
                                   final_out + t * H);
      }
      fallbacks += local_fallbacks;
    }
    return {out, outputs, fallbacks.load()};
  }

 private:
  const torch::Tensor& keep(const torch::Tensor& t) {
    kept_.push_back(t);
    return kept_.back();
  }

  const float* vector(const torch::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, "llama decoder: the ",
                what, " weight must be contiguous float32 [", n, "]");
    return keep(t).data_ptr<float>();
  }

  StoredMatrix stored(const torch::Tensor& data, int64_t type, int64_t in) {
    TORCH_CHECK(data.scalar_type() == torch::kUInt8 && data.dim() == 2 && data.is_contiguous(),
                "llama decoder: stored weights must be contiguous uint8 [rows, row_bytes]");
    StoredMatrix w{keep(data).data_ptr<uint8_t>(), type, data.size(0), data.size(1), in};
    foreseer_quant::check_row_bytes(w);
    return w;
  }

  Linear linear(const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& types, int64_t in, int64_t out,
                const c10::optional<torch::Tensor>& bias) {
    TORCH_CHECK(!parts.empty() && parts.size() == types.size(), "llama decoder: one type per weight part");
    Linear linear;
    linear.in = in;
    for (size_t p = 0; p < parts.size(); ++p) {
      linear.first_row.push_back(linear.out);
      linear.parts.push_back(stored(parts[p], types[p], in));
      linear.out += parts[p].size(0);
    }
    TORCH_CHECK(linear.out == out, "llama decoder: a projection has ", linear.out, " outputs, expected ", out);
    if (bias.has_value()) linear.bias = vector(*bias, out, "bias");
    return linear;
  }

  int64_t num_heads_, num_kv_heads_, head_dim_, hidden_, intermediate_, block_size_;
  int64_t max_positions_ = 0, num_blocks_ = 0;
  float eps_, scale_;
  const float* cos_ = nullptr;
  const float* sin_ = nullptr;
  StoredMatrix embed_{};
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<torch::Tensor> kept_;  // every tensor the layers point into, alive as long as the decoder
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LlamaDecoder>(m, "LlamaDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor,
                          torch::Tensor, int64_t, torch::Tensor, int64_t>())
      .def("add_layer", &LlamaDecoder::add_layer)
      .def("forward", &LlamaDecoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
