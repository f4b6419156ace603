// Paged decode attention for the CPU (float32), read straight from the KV blocks: no gather, no padding
// copies. Two paths. The reference: scores and the weighted sum of values are two kernels, with PyTorch's softmax
// between them; each (request, KV head) pair is one task. The split-KV kernel (paged_decode_split, the default) fuses
// them and also cuts each pair's tokens into chunks, so that one request keeps every core busy; see its section.
// Both handle the query heads that share a KV head together, so every key and value vector is loaded once.
// Consecutive rows with the same block table (a request's chain of tokens to verify, each seeing one more token) are
// one task too: its keys and values come from memory once and from the core's caches for the other rows. Each row's
// arithmetic is the same whatever its task holds.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#endif

namespace {

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

// Scores of the `kGroup` query heads that share a KV head against one key block stored
// [head_dim, kLanes]: each key row is loaded once for all of them, and the kGroup * kLanes accumulators
// are independent chains that stay in registers.
constexpr int64_t kLanes = 16;

template <int64_t kGroup>
inline void group_block_scores(const float* q, const float* kb, int64_t head_dim, float scale, int64_t n,
                               float* out, int64_t out_stride) {
  float acc[kGroup][kLanes] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const float* kd = kb + d * kLanes;
    for (int64_t g = 0; g < kGroup; ++g) {
      const float qd = q[g * head_dim + d];
#pragma omp simd
      for (int64_t t = 0; t < kLanes; ++t) acc[g][t] += qd * kd[t];
    }
  }
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t t = 0; t < n; ++t) out[g * out_stride + t] = acc[g][t] * scale;
  }
}

// Any block size and group: one query head at a time.
inline void block_scores(const float* q, const float* kb, int64_t head_dim, int64_t block_size, float scale,
                         int64_t n, float* out) {
  float acc[256] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const float qd = q[d];
    const float* kd = kb + d * block_size;
#pragma omp simd
    for (int64_t t = 0; t < block_size; ++t) acc[t] += qd * kd[t];
  }
  for (int64_t t = 0; t < n; ++t) out[t] = acc[t] * scale;
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
              block_scores(qh + g * head_dim, kb, head_dim, block_size, fscale, n, out + g * max_len);
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
      for (int64_t d = 0; d < hd; ++d) acc[d] += p * v[d];
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
  const int64_t row = num_kv_heads * head_dim;
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t block = sp[i] / block_size, offset = sp[i] % block_size;
      std::copy(vp + i * row, vp + (i + 1) * row, vc + sp[i] * row);
      float* kb = kc + block * block_size * row;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t d = 0; d < head_dim; ++d) {
          kb[(h * head_dim + d) * block_size + offset] = kp[i * row + h * head_dim + d];
        }
      }
    }
  });
}


// ---- Split-KV decode (Flash-Decoding) with FlashDecoding++'s asynchronous softmax ----
// Each (run of rows, KV head) pair's tokens are cut into chunks of whole blocks, so that even one request keeps
// every core busy. A chunk's task scores its tokens for the query heads of the KV head (into a buffer that stays in
// L1/L2), weights them by exp(s - phi) and sums the weighted values; a second pass merges each row's chunks.
// phi is one subtrahend for all the chunks of a (row, head), the unified max: a chunk whose max lies within
// kUnifiedBand of phi needs no max of its own, and such chunks merge by plain sums (their factors e^(phi - phi) are
// exactly 1). A chunk outside the band (its exps would overflow, or all lose their precision) is weighted with its
// own max instead and rescaled by log-sum-exp in the merge, so the result is exact either way. Its scores are still
// in the buffer, so the fallback costs only the other subtrahend.
namespace {

// e^32 ~ 8e13: sums of billions of terms stay finite; e^-32 ~ 1e-14: the largest terms stay normal floats.
constexpr float kUnifiedBand = 32.0f;
constexpr int64_t kMinChunkTokens = 256;   // shorter chunks: the partials' writes and merge start to show
constexpr int64_t kMaxChunkTokens = 1024;  // a chunk's keys and values stay in L2 for a chain's other rows
constexpr int64_t kPrefetchBlocks = 2;     // how far ahead to ask for blocks (1, 2 and 4 measured alike)

// Blocks per chunk for a row of `len` tokens: enough chunks that a lone request gives each thread ~4 tasks, none
// under kMinChunkTokens. A power of two, so that the rows of a chain (lengths a few tokens apart) nearly always
// agree; a function of the row's own length and the thread count only, so a row's arithmetic ignores its batch-mates.
int64_t chunk_blocks_for(int64_t len, int64_t block_size, int64_t num_kv_heads, int64_t threads) {
  const int64_t wanted = std::max<int64_t>(1, (4 * threads + num_kv_heads - 1) / num_kv_heads);
  const int64_t blocks = (len + block_size - 1) / block_size;
  const int64_t lo = std::max<int64_t>(1, kMinChunkTokens / block_size);
  const int64_t hi = std::max<int64_t>(lo, kMaxChunkTokens / block_size);
  int64_t chunk = lo;
  while (chunk * 2 <= std::min(hi, blocks / wanted)) chunk *= 2;
  return chunk;
}

// w[t] = exp(w[t] - sub) for t < n; returns their sum. The 8-lane exp is Sleef's 1-ULP expf, the one PyTorch's own
// softmax uses on AVX2 (libtorch_cpu exports it): the reference path's exp, without std::exp's scalar calls.
inline float exp_sum(float* w, int64_t n, float sub) {
  int64_t t = 0;
  float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vsub = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(w + t), vsub));
    _mm256_storeu_ps(w + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float lane : lanes) sum += lane;
#endif
  for (; t < n; ++t) {
    w[t] = std::exp(w[t] - sub);
    sum += w[t];
  }
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// o[0, 8 * kVecs) += sum_t w[t] * v_t over n tokens, the accumulators in registers while the tokens go by.
template <int kVecs>
inline void values_slice(const float* w, const float* v, int64_t token_stride, int64_t n, float* o) {
  __m256 acc[kVecs];
  for (int i = 0; i < kVecs; ++i) acc[i] = _mm256_loadu_ps(o + 8 * i);
  for (int64_t t = 0; t < n; ++t) {
    const __m256 p = _mm256_broadcast_ss(w + t);
    const float* vt = v + t * token_stride;
    for (int i = 0; i < kVecs; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * i), acc[i]);
  }
  for (int i = 0; i < kVecs; ++i) _mm256_storeu_ps(o + 8 * i, acc[i]);
}
#endif

// o[d] += sum_t w[t] * v_t[d] over one block's n tokens, v_t at vb + t * token_stride.
inline void block_values(const float* w, const float* vb, int64_t token_stride, int64_t n, int64_t head_dim,
                         float* o) {
#if defined(__AVX2__) && defined(__FMA__)
  if (head_dim % 32 == 0) {  // slices of 64 dims (8 registers), then one of 32
    int64_t d = 0;
    for (; d + 64 <= head_dim; d += 64) values_slice<8>(w, vb + d, token_stride, n, o + d);
    if (d < head_dim) values_slice<4>(w, vb + d, token_stride, n, o + d);
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const float* v = vb + t * token_stride;
    const float p = w[t];
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
  }
}

// Ask for `rows` rows of `row` floats, `stride` floats apart, ahead of their use: a chunk's blocks lie anywhere in
// the cache, so the hardware prefetcher cannot run ahead across them.
inline void prefetch_rows(const float* p, int64_t rows, int64_t row, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < row; x += 16) __builtin_prefetch(p + r * stride + x);
  }
}

// The kGroup heads' scores against one key block, as group_block_scores, for any group and block size.
inline void chunk_block_scores(const float* q, const float* kb, int64_t group, int64_t head_dim, int64_t block_size,
                               float scale, int64_t n, float* out, int64_t out_stride) {
  if (block_size == kLanes && group == 1) {
    group_block_scores<1>(q, kb, head_dim, scale, n, out, out_stride);
  } else if (block_size == kLanes && group == 2) {
    group_block_scores<2>(q, kb, head_dim, scale, n, out, out_stride);
  } else if (block_size == kLanes && group == 3) {
    group_block_scores<3>(q, kb, head_dim, scale, n, out, out_stride);
  } else if (block_size == kLanes && group == 4) {
    group_block_scores<4>(q, kb, head_dim, scale, n, out, out_stride);
  } else {
    for (int64_t g = 0; g < group; ++g) {
      block_scores(q + g * head_dim, kb, head_dim, block_size, scale, n, out + g * out_stride);
    }
  }
}

}  // namespace

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
  const int64_t block_size = s.block_size, head_dim = s.head_dim, group = s.group, num_heads = s.num_heads;
  TORCH_CHECK(block_size <= 256, "paged decode attention: block_size above 256 is not supported");
  TORCH_CHECK(chunk_tokens >= 0 && chunk_tokens % block_size == 0,
              "paged decode attention: chunk_tokens must be a whole number of blocks");
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  const int64_t head_size = head_dim * block_size, key_block_stride = s.num_kv_heads * head_size;
  const int64_t threads = at::get_num_threads();

  // Each row's chunk size (in blocks) and first partial; runs: consecutive rows with one block table and chunk size.
  std::vector<int64_t> chunk_of(s.batch), part_of(s.batch + 1, 0), runs{0};
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(lens[b] >= 1, "paged decode attention: every row must see at least one token");
    chunk_of[b] = chunk_tokens ? chunk_tokens / block_size
                               : chunk_blocks_for(lens[b], block_size, s.num_kv_heads, threads);
    const int64_t chunk_len = chunk_of[b] * block_size;
    part_of[b + 1] = part_of[b] + (lens[b] + chunk_len - 1) / chunk_len;
    if (b && (chunk_of[b] != chunk_of[b - 1] ||
              !std::equal(bt + b * s.max_blocks, bt + (b + 1) * s.max_blocks, bt + (b - 1) * s.max_blocks))) {
      runs.push_back(b);
    }
  }
  runs.push_back(s.batch);
  struct Task {
    int64_t run, head, chunk;
  };
  std::vector<Task> tasks;
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(runs.size()); ++r) {
    const int64_t longest = *std::max_element(lens + runs[r], lens + runs[r + 1]);
    const int64_t chunk_len = chunk_of[runs[r]] * block_size;
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      for (int64_t c = 0; c * chunk_len < longest; ++c) tasks.push_back({r, h, c});
    }
  }
  // The partial of (row b, chunk c, head) at ((part_of[b] + c) * H + head) * rec: o[D], subtrahend, sum, chunk max.
  const int64_t rec = head_dim + 3;
  auto partials = torch::empty({part_of[s.batch] * num_heads * rec}, q.options());
  float* pp = partials.data_ptr<float>();
  std::atomic<int64_t> fallbacks{0};

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    int64_t local_fallbacks = 0;
    for (int64_t i = begin; i < end; ++i) {
      const Task task = tasks[i];
      const int64_t h = task.head, chunk_blocks = chunk_of[runs[task.run]];
      const int64_t chunk_len = chunk_blocks * block_size, start = task.chunk * chunk_len;
      scores.resize(group * chunk_len);
      float* w = scores.data();  // [group, chunk_len]
      // Row by row: the chunk's keys and values, read from memory for the run's first row, stay in L2.
      for (int64_t b = runs[task.run]; b < runs[task.run + 1]; ++b) {
        if (start >= lens[b]) continue;
        const int64_t n = std::min(chunk_len, lens[b] - start);
        const int64_t* table = bt + b * s.max_blocks + task.chunk * chunk_blocks;
        const float* qh = qp + (b * num_heads + h * group) * head_dim;
        const int64_t num_blocks = (n + block_size - 1) / block_size;
        auto keys = [&](int64_t j) { return kp + table[j] * key_block_stride + h * head_size; };
        auto values = [&](int64_t j) { return vp + table[j] * s.block_stride + h * s.head_stride; };
        for (int64_t j = 0; j < num_blocks; ++j) {
          if (j + kPrefetchBlocks < num_blocks) prefetch_rows(keys(j + kPrefetchBlocks), 1, head_size, 0);
          chunk_block_scores(qh, keys(j), group, head_dim, block_size, fscale, std::min(block_size, n - j * block_size),
                             w + j * block_size, chunk_len);
        }
        for (int64_t j = 0; j < std::min(kPrefetchBlocks, num_blocks); ++j) {
          prefetch_rows(values(j), block_size, head_dim, s.token_stride);  // on their way during the exps
        }
        float* part = pp + ((part_of[b] + task.chunk) * num_heads + h * group) * rec;
        const float* sink = kp + bt[b * s.max_blocks] * key_block_stride + h * head_size;  // first key, stride bs
        for (int64_t g = 0; g < group; ++g) {
          float* wg = w + g * chunk_len;
          float* pg = part + g * rec;
          float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
          for (int64_t t = 0; t < n; ++t) top = std::max(top, wg[t]);
          float unified = static_cast<float>(phi);
          if (std::isnan(phi)) {  // the same sum in every chunk of the row, so one subtrahend for all of them
            float dot = 0.0f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[g * head_dim + d] * sink[d * block_size];
            unified = dot * fscale;
          }
          const bool in_band = top - unified <= kUnifiedBand && top - unified >= -kUnifiedBand;
          local_fallbacks += !in_band;
          pg[head_dim] = in_band ? unified : top;
          pg[head_dim + 1] = exp_sum(wg, n, pg[head_dim]);
          pg[head_dim + 2] = top;
          std::fill(pg, pg + head_dim, 0.0f);
        }
        // Weighted values block by block: the block stays in L1 across the group's heads.
        for (int64_t j = 0; j < num_blocks; ++j) {
          if (j + kPrefetchBlocks < num_blocks) {
            prefetch_rows(values(j + kPrefetchBlocks), block_size, head_dim, s.token_stride);
          }
          const int64_t m = std::min(block_size, n - j * block_size);
          for (int64_t g = 0; g < group; ++g) {
            block_values(w + g * chunk_len + j * block_size, values(j), s.token_stride, m, head_dim, part + g * rec);
          }
        }
      }
    }
    fallbacks += local_fallbacks;
  });

  // Merge each (row, head)'s chunks in chunk order: out = sum_c e^(sub_c - M) o_c / sum_c e^(sub_c - M) l_c.
  auto out = torch::empty({s.batch, num_heads, head_dim}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.batch * num_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_heads, head = row % num_heads;
      const int64_t num_chunks = part_of[b + 1] - part_of[b], chunk_stride = num_heads * rec;
      const float* first = pp + (part_of[b] * num_heads + head) * rec;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < num_chunks; ++c) top = std::max(top, first[c * chunk_stride + head_dim]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const float* part = first + c * chunk_stride;
        const float factor = std::exp(part[head_dim] - top);  // exactly 1 for the chunks on the unified max
        sum += factor * part[head_dim + 1];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += factor * part[d];
      }
      float* dst = op + row * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = acc[d] / sum;
    }
  });
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < part_of[s.batch] * num_heads; ++p) top = std::max(top, pp[p * rec + head_dim + 2]);
  return {out, static_cast<double>(top), fallbacks.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_scores", &paged_decode_scores, "q.k over paged keys (CPU, float32)");
  m.def("write_kv_cache", &write_kv_cache, "store new keys (transposed per block) and values (CPU, float32)");
  m.def("paged_decode_split", &paged_decode_split, "split-KV decode attention with a unified max (CPU, float32)");
  m.def("paged_decode_values", &paged_decode_values, "probs-weighted sum over paged values (CPU, float32)");
}
