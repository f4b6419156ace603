// Paged decode attention for the CPU (float32), read straight from the KV blocks: no gather, no padding
// copies. Two paths. The reference: scores and the weighted sum of values are two kernels, with PyTorch's softmax
// between them; each (request, KV head) pair is one task. The split-KV kernel (paged_decode_split, the default; see
// paged_attention.h) fuses them and also cuts each pair's tokens into chunks, so that one request keeps every core
// busy. Both handle the query heads that share a KV head together, so every key and value vector is loaded once.
// Consecutive rows with the same block table (a request's chain of tokens to verify) are one task too.
#include "attention/csrc/paged_attention.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <tuple>

using foreseer_attn::kLanes;

namespace {

// Scores of the `kGroup` query heads that share a KV head against one key block stored [head_dim, kLanes]: each
// key row is loaded once for all of them, and the kGroup * kLanes accumulators are independent chains that stay in
// registers.
template <int64_t kGroup>
inline void group_block_scores(const float* q, const float* kb, int64_t head_dim, float scale, int64_t n,
                               float* out, int64_t out_stride) {
  static_assert(kLanes == 16, "two 8-lane registers per head");
  __m256 acc[kGroup][2];
  for (int64_t g = 0; g < kGroup; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < head_dim; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kb + d * kLanes), k1 = _mm256_loadu_ps(kb + d * kLanes + 8);
    for (int64_t g = 0; g < kGroup; ++g) {
      const __m256 qd = _mm256_set1_ps(q[g * head_dim + d]);
      acc[g][0] = _mm256_fmadd_ps(qd, k0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(qd, k1, acc[g][1]);
    }
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t g = 0; g < kGroup; ++g) {
    float lanes[kLanes];
    _mm256_storeu_ps(lanes, _mm256_mul_ps(acc[g][0], vscale));
    _mm256_storeu_ps(lanes + 8, _mm256_mul_ps(acc[g][1], vscale));
    std::copy(lanes, lanes + n, out + g * out_stride);
  }
}


struct Layout {
  int64_t batch, num_heads, head_dim, block_size, num_kv_heads, group, max_blocks;
  int64_t block_stride, token_stride, head_stride;
};

Layout layout_of(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && cache.scalar_type() == torch::kFloat32,
              "paged decode attention: float32 tensors only");
  TORCH_CHECK(cache.stride(3) == 1, "paged decode attention: head_dim must be contiguous in the cache");
  Layout s;
  s.batch = q.size(0);
  s.num_heads = q.size(1);
  s.head_dim = q.size(2);
  s.block_size = cache.size(1);
  s.num_kv_heads = cache.size(2);
  s.group = s.num_heads / s.num_kv_heads;
  s.max_blocks = block_tables.size(1);
  s.block_stride = cache.stride(0);
  s.token_stride = cache.stride(1);
  s.head_stride = cache.stride(2);
  return s;
}

// Row ranges [runs[i], runs[i + 1]) of consecutive rows whose block tables are equal.
std::vector<int64_t> table_runs(const torch::Tensor& block_tables) {
  const int64_t rows = block_tables.size(0), width = block_tables.size(1);
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  std::vector<int64_t> runs{0};
  for (int64_t r = 1; r < rows; ++r) {
    if (!std::equal(bt + r * width, bt + (r + 1) * width, bt + (r - 1) * width)) runs.push_back(r);
  }
  runs.push_back(rows);
  return runs;
}

}  // namespace

// scores[b, h, t] = scale * q[b, h] . k[b, t, h / group] for t < seq_lens[b], -inf beyond.
// Keys are stored transposed per block, [num_blocks, Hkv, head_dim, block_size], so the inner loop runs
// across the tokens of a block in SIMD lanes with no horizontal sums.
torch::Tensor paged_decode_scores(torch::Tensor q, torch::Tensor k_cache, torch::Tensor block_tables,
                                  torch::Tensor seq_lens, int64_t max_len, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged decode attention: float32 tensors only");
  TORCH_CHECK(k_cache.is_contiguous(), "paged decode attention: the key cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(3);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  auto scores = torch::full({batch, num_heads, max_len}, -std::numeric_limits<float>::infinity(), q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  TORCH_CHECK(block_size <= 256, "paged decode attention: block_size above 256 is not supported");
  const int64_t head_size = head_dim * block_size, block_stride = num_kv_heads * head_size;
  const std::vector<int64_t> runs = table_runs(block_tables);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
  at::parallel_for(0, num_runs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t first = runs[run], last = runs[run + 1];
      const int64_t longest = *std::max_element(lens + first, lens + last);
      // Block by block, so that each key block serves every row of the run while it is in L1.
      for (int64_t j = 0; j * block_size < longest; ++j) {
        const float* kb = kp + bt[first * max_blocks + j] * block_stride + h * head_size;
        for (int64_t b = first; b < last; ++b) {
          if (j * block_size >= lens[b]) continue;
          const int64_t n = std::min(block_size, lens[b] - j * block_size);
          const float* qh = qp + (b * num_heads + h * group) * head_dim;
          float* out = sp + (b * num_heads + h * group) * max_len + j * block_size;
          if (block_size == kLanes && group == 1) {
            group_block_scores<1>(qh, kb, head_dim, fscale, n, out, max_len);
          } else if (block_size == kLanes && group == 2) {
            group_block_scores<2>(qh, kb, head_dim, fscale, n, out, max_len);
          } else if (block_size == kLanes && group == 3) {
            group_block_scores<3>(qh, kb, head_dim, fscale, n, out, max_len);
          } else if (block_size == kLanes && group == 4) {
            group_block_scores<4>(qh, kb, head_dim, fscale, n, out, max_len);
          } else {
            for (int64_t g = 0; g < group; ++g) {
              foreseer_attn::block_scores(qh + g * head_dim, kb, head_dim, block_size, fscale, n, out + g * max_len);
            }
          }
        }
      }
    }
  });
  return scores;
}

// One query head's weighted sum over its request's value vectors. With a compile-time head size the
// accumulator stays in registers while the values stream past (they stay in L2 across the group's heads).
template <int64_t kHead>
inline void head_values(const float* probs, const float* vp, const int64_t* table, int64_t len, int64_t block_size,
                        int64_t block_stride, int64_t token_stride, float* out, int64_t head_dim = kHead) {
  const int64_t hd = kHead ? kHead : head_dim;
  float acc[kHead ? kHead : 512] = {};
  for (int64_t start = 0, j = 0; start < len; start += block_size, ++j) {
    const float* block = vp + table[j] * block_stride;
    const int64_t n = std::min(block_size, len - start);
    for (int64_t t = 0; t < n; ++t) {
      const float* v = block + t * token_stride;
      const float p = probs[start + t];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(p, v[d], acc[d]);
    }
  }
  std::copy(acc, acc + hd, out);
}

// out[b, h] = sum_t probs[b, h, t] * v[b, t, h / group] over t < seq_lens[b].
torch::Tensor paged_decode_values(torch::Tensor probs, torch::Tensor v_cache, torch::Tensor block_tables,
                                  torch::Tensor seq_lens) {
  probs = probs.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t max_len = probs.size(2);
  const int64_t head_dim = v_cache.size(3);
  TORCH_CHECK(head_dim <= 512, "paged decode attention: head_dim above 512 is not supported");
  auto out = torch::empty({probs.size(0), probs.size(1), head_dim}, probs.options());
  const Layout s = layout_of(out, v_cache, block_tables);
  const float* pp = probs.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const std::vector<int64_t> runs = table_runs(block_tables);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
  at::parallel_for(0, num_runs * s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / s.num_kv_heads, h = task % s.num_kv_heads;
      const int64_t* table = bt + runs[run] * s.max_blocks;
      const float* vh = vp + h * s.head_stride;
      // Row after row: the run's values, read from memory for its first row, stay in L2 for the others.
      for (int64_t b = runs[run]; b < runs[run + 1]; ++b) {
        for (int64_t g = 0; g < s.group; ++g) {
          const int64_t row = b * s.num_heads + h * s.group + g;
          const float* probs_row = pp + row * max_len;
          float* out_row = op + row * s.head_dim;
          if (s.head_dim == 64) {
            head_values<64>(probs_row, vh, table, lens[b], s.block_size, s.block_stride, s.token_stride, out_row);
          } else if (s.head_dim == 128) {
            head_values<128>(probs_row, vh, table, lens[b], s.block_size, s.block_stride, s.token_stride, out_row);
          } else {
            head_values<0>(probs_row, vh, table, lens[b], s.block_size, s.block_stride, s.token_stride, out_row,
                           s.head_dim);
          }
        }
      }
    }
  });
  return out;
}

// Write the step's new keys and values into their cache slots (keys transposed per block).
void write_kv_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                    torch::Tensor slots) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "write_kv_cache: float32 tensors and contiguous caches only");
  k = k.contiguous();
  v = v.contiguous();
  slots = slots.contiguous();
  const int64_t num_tokens = k.size(0), num_kv_heads = k.size(1), head_dim = k.size(2);
  const int64_t block_size = v_cache.size(1);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = num_kv_heads * head_dim;
      foreseer_attn::write_kv_token(kp + i * row, vp + i * row, kc, vc, sp[i], num_kv_heads, head_dim, block_size);
    }
  });
}

// Attention of one query token per row over its paged keys and values, split over chunks of its tokens. phi: the
// unified max for every (row, head), or NaN for each (row, head)'s score against the row's first token (the
// attention sink, usually near the top of a row's scores; a function of the row alone). chunk_tokens: 0 for the
// automatic size. Returns (out [B, H, D], the largest score seen, how many (row, head, chunk) partials fell back to
// their own max).
std::tuple<torch::Tensor, double, int64_t> paged_decode_split(torch::Tensor q, torch::Tensor k_cache,
                                                              torch::Tensor v_cache, torch::Tensor block_tables,
                                                              torch::Tensor seq_lens, double scale, double phi,
                                                              int64_t chunk_tokens) {
  TORCH_CHECK(k_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32,
              "paged decode attention: the key cache must be contiguous float32");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const Layout s = layout_of(q, v_cache, block_tables);
  TORCH_CHECK(s.block_size <= 256, "paged decode attention: block_size above 256 is not supported");
  TORCH_CHECK(chunk_tokens >= 0 && chunk_tokens % s.block_size == 0,
              "paged decode attention: chunk_tokens must be a whole number of blocks");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(lens[b] >= 1, "paged decode attention: every row must see at least one token");
  }
  const foreseer_attn::PagedKv kv{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), s.num_kv_heads, s.head_dim,
                                  s.block_size, s.block_stride, s.token_stride, s.head_stride};
  const foreseer_attn::DecodeRows rows{q.data_ptr<float>(), s.num_heads * s.head_dim, s.batch, s.num_heads, block_tables.data_ptr<int64_t>(),
                                       s.max_blocks, lens, static_cast<float>(scale), static_cast<float>(phi)};
  const foreseer_attn::SplitKvPlan plan(rows, kv, chunk_tokens, at::get_num_threads());
  auto partials = torch::empty({plan.partial_floats()}, q.options());
  float* pp = partials.data_ptr<float>();
  std::atomic<int64_t> fallbacks{0};
  at::parallel_for(0, plan.num_tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    int64_t local_fallbacks = 0;
    for (int64_t i = begin; i < end; ++i) plan.run_task(i, kv, rows.q, pp, scores, local_fallbacks);
    fallbacks += local_fallbacks;
  });
  auto out = torch::empty({s.batch, s.num_heads, s.head_dim}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.batch * s.num_heads, 16, [&](int64_t begin, int64_t end) {
    plan.merge_rows(begin, end, pp, op);
  });
  return {out, static_cast<double>(plan.max_score(pp)), fallbacks.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_scores", &paged_decode_scores, "q.k over paged keys (CPU, float32)");
  m.def("write_kv_cache", &write_kv_cache, "store new keys (transposed per block) and values (CPU, float32)");
  m.def("paged_decode_split", &paged_decode_split, "split-KV decode attention with a unified max (CPU, float32)");
  m.def("paged_decode_values", &paged_decode_values, "probs-weighted sum over paged values (CPU, float32)");
}
