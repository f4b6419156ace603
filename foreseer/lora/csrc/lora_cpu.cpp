// Batched multi-LoRA for the CPU (float32): every adapter group of one projection in one call.
//
// y[rows of group g] += (x[rows] A_s^T) B_s^T, shard by shard, where s is the group's device slot. A group of a
// few rows (decode tokens, short verification chains) runs a hand-written shrink and expand that stream its
// adapter's weights once per row with no per-operation overhead; the groups run in parallel, as they write
// disjoint rows. A group of many rows (a prefill segment) takes two BLAS calls, which are efficient there.
// Adapter weights are not copied into the call: `slots` holds each slot's tensors' addresses, built once per
// slot change and kept alive by the caller (vLLM's LoRA kernels take pointer tables the same way).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kSmallGroup = 8;  // rows up to which a group takes the hand-written path
constexpr int64_t kSlotHeader = 2;  // per slot: address of A^T [in, R], R (0: no adapter in the slot)
constexpr int64_t kShardFields = 5;  // per shard: address of B^T [rank, out], rank, column in h, out offset, out size

struct Shard {
  const float* b_t;
  int64_t rank, column, out_offset, out_size;
};

inline Shard shard_of(const int64_t* meta, int64_t index) {
  const int64_t* f = meta + kSlotHeader + index * kShardFields;
  return {reinterpret_cast<const float*>(f[0]), f[1], f[2], f[3], f[4]};
}

// One row: h = x a_t (a_t [in, R], row-major: the inner loop runs over R in SIMD lanes), then out += h b_t
// per shard (b_t [rank, out]: the inner loop runs over the output columns).
void small_row(const float* x, float* y, const float* a_t, int64_t in, int64_t total_rank, const int64_t* meta,
               int64_t num_shards, float* h) {
  std::fill(h, h + total_rank, 0.0f);
  for (int64_t k = 0; k < in; ++k) {
    const float xk = x[k];
    const float* a = a_t + k * total_rank;
#pragma omp simd
    for (int64_t j = 0; j < total_rank; ++j) h[j] += xk * a[j];
  }
  for (int64_t s = 0; s < num_shards; ++s) {
    const Shard shard = shard_of(meta, s);
    if (shard.rank == 0) continue;
    float* out = y + shard.out_offset;
    for (int64_t j = 0; j < shard.rank; ++j) {
      const float hj = h[shard.column + j];
      const float* b = shard.b_t + j * shard.out_size;
#pragma omp simd
      for (int64_t o = 0; o < shard.out_size; ++o) out[o] += hj * b[o];
    }
  }
}

}  // namespace

// y [T, out_total] += LoRA deltas, in place; x [T, in]. rows: int64 row indices, group after group; starts,
// lengths, group_slots: int64 [G], each group's first entry in `rows`, row count and device slot. slots: int64
// [S, 2 + 5 * num_shards] (see above).
void lora_add(torch::Tensor y, torch::Tensor x, torch::Tensor rows, torch::Tensor starts, torch::Tensor lengths,
              torch::Tensor group_slots, torch::Tensor slots) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && y.scalar_type() == torch::kFloat32,
              "lora_add: float32 tensors only");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "lora_add: x and y must be row-major");
  rows = rows.contiguous();
  slots = slots.contiguous();
  // (slot, first entry in rows, row count) per group
  const auto groups = torch::stack({group_slots, starts, lengths}, 1).contiguous();
  const int64_t in = x.size(1), num_groups = groups.size(0);
  const int64_t num_shards = (slots.size(1) - kSlotHeader) / kShardFields;
  const int64_t* gp = groups.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t slot_stride = slots.size(1);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);

  std::vector<int64_t> small, large;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (sp[gp[g * 3] * slot_stride + 1] == 0) continue;  // the slot's adapter does not adapt this projection
    (gp[g * 3 + 2] <= kSmallGroup ? small : large).push_back(g);
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* group = gp + small[i] * 3;
      const int64_t* meta = sp + group[0] * slot_stride;
      h.resize(meta[1]);
      for (int64_t r = 0; r < group[2]; ++r) {
        const int64_t row = rp[group[1] + r];
        small_row(xp + row * x_stride, yp + row * y_stride, reinterpret_cast<const float*>(meta[0]), in, meta[1],
                  meta, num_shards, h.data());
      }
    }
  });
  const auto options = x.options();
  for (const int64_t g : large) {
    const int64_t* group = gp + g * 3;
    const int64_t* meta = sp + group[0] * slot_stride;
    const int64_t first = rp[group[1]], count = group[2];
    const bool contiguous = rp[group[1] + count - 1] - first == count - 1;
    auto index = rows.narrow(0, group[1], count);
    auto xs = contiguous ? x.narrow(0, first, count) : x.index_select(0, index);
    auto a_t = torch::from_blob(const_cast<float*>(reinterpret_cast<const float*>(meta[0])), {in, meta[1]}, options);
    auto h = xs.mm(a_t);
    for (int64_t s = 0; s < num_shards; ++s) {
      const Shard shard = shard_of(meta, s);
      if (shard.rank == 0) continue;
      auto b_t = torch::from_blob(const_cast<float*>(shard.b_t), {shard.rank, shard.out_size}, options);
      auto hs = h.narrow(1, shard.column, shard.rank);
      if (contiguous) {
        y.narrow(0, first, count).narrow(1, shard.out_offset, shard.out_size).addmm_(hs, b_t);
      } else {
        y.narrow(1, shard.out_offset, shard.out_size).index_add_(0, index, hs.mm(b_t));
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add", &lora_add, "batched multi-LoRA deltas of one projection, added in place (CPU, float32)");
}
