// Paged decode attention for the CPU (float32), read straight from the KV blocks: shared by the Python bindings
// (paged_attention_cpu.cpp) and the fused decoder (models/csrc/llama_decoder_cpu.cpp). Every multiply-add is an
// explicit fma, so that both compute the same bits whatever their -ffp-contract. Keys are stored transposed
// per block, [num_blocks, Hkv, head_dim, block_size], so that the dot products run across a block's tokens in SIMD
// lanes with no horizontal sums; values [num_blocks, block_size, Hkv, head_dim].
//
// Split-KV decode (Flash-Decoding) with FlashDecoding++'s asynchronous softmax: each (run of rows, KV head) pair's
// tokens are cut into chunks of whole blocks, so that even one request keeps every core busy. A chunk's task scores
// its tokens for the query heads of the KV head (into a buffer that stays in L1/L2), weights them by exp(s - phi)
// and sums the weighted values; a second pass merges each row's chunks. phi is one subtrahend for all the chunks of
// a (row, head), the unified max: a chunk whose max lies within kUnifiedBand of phi needs no max of its own, and
// such chunks merge by plain sums (their factors e^(phi - phi) are exactly 1). A chunk outside the band (its exps
// would overflow, or all lose their precision) is weighted with its own max instead and rescaled by log-sum-exp in
// the merge, so the result is exact either way. Its scores are still in the buffer, so the fallback costs only the
// other subtrahend. Consecutive rows with the same block table (a request's chain of tokens to verify, each seeing
// one more token) are one task: its keys and values come from memory once and from the core's caches for the other
// rows. Each row's arithmetic is the same whatever its task holds.
#pragma once

#include <immintrin.h>
#include <sleef.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace foreseer_attn {

constexpr int64_t kLanes = 16;  // tokens of a key block that the tiled kernels take in two registers

// Any block size and group: one query head at a time.
inline void block_scores(const float* q, const float* kb, int64_t head_dim, int64_t block_size, float scale,
                         int64_t n, float* out) {
  float acc[256] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const float qd = q[d];
    const float* kd = kb + d * block_size;
#pragma omp simd
    for (int64_t t = 0; t < block_size; ++t) acc[t] = std::fma(qd, kd[t], acc[t]);
  }
  for (int64_t t = 0; t < n; ++t) out[t] = acc[t] * scale;
}

// Scores of the kGroup query heads that share a KV head against kBlocks key blocks of kLanes tokens, each stored
// [head_dim, kLanes]: a tiny GEMM (heads x head_dim x tokens) by outer products. Per dimension, the heads' query
// values are broadcast into kGroup registers and each key vector is loaded once for all of them, so that the
// kGroup * 2 * kBlocks accumulators (at most 12 of the 16 registers) are fed with one load per kGroup multiply-adds.
// Each lane sums its token's products in dimension order, as one-head-at-a-time code does.
template <int64_t kGroup, int kBlocks>
inline void tile_scores(const float* q, const float* const* blocks, int64_t head_dim, float scale, float* out,
                        int64_t out_stride) {
  __m256 acc[kGroup][2 * kBlocks];
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int v = 0; v < 2 * kBlocks; ++v) acc[g][v] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    __m256 qd[kGroup];
    for (int64_t g = 0; g < kGroup; ++g) qd[g] = _mm256_broadcast_ss(q + g * head_dim + d);
    for (int v = 0; v < 2 * kBlocks; ++v) {
      const __m256 k = _mm256_loadu_ps(blocks[v / 2] + d * kLanes + 8 * (v % 2));
      for (int64_t g = 0; g < kGroup; ++g) acc[g][v] = _mm256_fmadd_ps(qd[g], k, acc[g][v]);
    }
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int v = 0; v < 2 * kBlocks; ++v) _mm256_storeu_ps(out + g * out_stride + 8 * v, _mm256_mul_ps(acc[g][v], vscale));
  }
}

// The `group` heads' scores against key blocks blocks[0 .. available) (at least one) into out (kLanes or
// block_size scores a block, every lane of the last block written); returns how many blocks it scored.
inline int64_t score_blocks(const float* q, const float* const* blocks, int64_t available, int64_t group,
                            int64_t head_dim, int64_t block_size, float scale, float* out, int64_t out_stride) {
  if (block_size == kLanes) {
    switch (group) {
      case 1:
        if (available >= 4) return tile_scores<1, 4>(q, blocks, head_dim, scale, out, out_stride), 4;
        return tile_scores<1, 1>(q, blocks, head_dim, scale, out, out_stride), 1;
      case 2:
        if (available >= 2) return tile_scores<2, 2>(q, blocks, head_dim, scale, out, out_stride), 2;
        return tile_scores<2, 1>(q, blocks, head_dim, scale, out, out_stride), 1;
      case 3:
        if (available >= 2) return tile_scores<3, 2>(q, blocks, head_dim, scale, out, out_stride), 2;
        return tile_scores<3, 1>(q, blocks, head_dim, scale, out, out_stride), 1;
      case 4:
        return tile_scores<4, 1>(q, blocks, head_dim, scale, out, out_stride), 1;
      default:
        break;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    block_scores(q + g * head_dim, blocks[0], head_dim, block_size, scale, block_size, out + g * out_stride);
  }
  return 1;
}

// A layer's paged cache.
struct PagedKv {
  const float* k;  // [num_blocks, Hkv, head_dim, block_size]
  const float* v;  // [num_blocks, block_size, Hkv, head_dim] with the strides below
  int64_t num_kv_heads, head_dim, block_size;
  int64_t v_block_stride, v_token_stride, v_head_stride;
  int64_t head_size() const { return head_dim * block_size; }
  int64_t k_block_stride() const { return num_kv_heads * head_size(); }
};

// Store one token's keys (transposed into their block) and values at cache slot `slot`; k and v hold
// [Hkv, head_dim] contiguously, the caches are contiguous.
inline void write_kv_token(const float* k, const float* v, float* k_cache, float* v_cache, int64_t slot,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size) {
  const int64_t row = num_kv_heads * head_dim, block = slot / block_size, offset = slot % block_size;
  std::copy(v, v + row, v_cache + slot * row);
  float* kb = k_cache + block * block_size * row;
  for (int64_t i = 0; i < row; ++i) kb[i * block_size + offset] = k[i];
}

// One step's decode rows: a query token each, over its block table.
struct DecodeRows {
  const float* q;  // [batch, num_heads, head_dim], each row's heads contiguous
  int64_t q_stride;  // floats from one row's query to the next
  int64_t batch, num_heads;
  const int64_t* block_tables;  // [batch, max_blocks]
  int64_t max_blocks;
  const int64_t* lens;  // tokens each row sees, itself included
  float scale;
  float phi;  // the unified max for every (row, head), or NaN for each one's score against its row's first token
};

// e^32 ~ 8e13: sums of billions of terms stay finite; e^-32 ~ 1e-14: the largest terms stay normal floats.
constexpr float kUnifiedBand = 32.0f;
constexpr int64_t kMinChunkTokens = 256;   // shorter chunks: the partials' writes and merge start to show
constexpr int64_t kMaxChunkTokens = 1024;  // a chunk's keys and values stay in L2 for a chain's other rows
constexpr int64_t kPrefetchBlocks = 8;     // how far ahead to ask for blocks (2 to 32 measured; 8 to 16 best)

// Blocks per chunk for a row of `len` tokens: enough chunks that a lone request gives each thread ~4 tasks, none
// under kMinChunkTokens. A power of two, so that the rows of a chain (lengths a few tokens apart) nearly always
// agree; a function of the row's own length and the thread count only, so a row's arithmetic ignores its batch-mates.
inline int64_t chunk_blocks_for(int64_t len, int64_t block_size, int64_t num_kv_heads, int64_t threads) {
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
  for (; t < n; ++t) {
    w[t] = std::exp(w[t] - sub);
    sum += w[t];
  }
  return sum;
}

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

// o[d] += sum_t w[t] * v_t[d] over one block's n tokens, v_t at vb + t * token_stride.
inline void block_values(const float* w, const float* vb, int64_t token_stride, int64_t n, int64_t head_dim,
                         float* o) {
  if (head_dim % 32 == 0) {  // slices of 64 dims (8 registers), then one of 32
    int64_t d = 0;
    for (; d + 64 <= head_dim; d += 64) values_slice<8>(w, vb + d, token_stride, n, o + d);
    if (d < head_dim) values_slice<4>(w, vb + d, token_stride, n, o + d);
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* v = vb + t * token_stride;
    const float p = w[t];
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) o[d] = std::fma(p, v[d], o[d]);
  }
}

// o[g][d] += sum_t w[g][t] * v_t[d] for the kGroup heads that share the values of one block's n tokens (w[g] at
// g * w_stride, o[g] at g * o_stride): per slice of kVecs registers of dimensions, each value vector is loaded once
// for all heads, their weights broadcast into kGroup registers. Each accumulator sums in token order, as block_values.
template <int64_t kGroup, int kVecs>
inline void group_values(const float* w, int64_t w_stride, const float* vb, int64_t token_stride, int64_t n,
                         int64_t head_dim, float* o, int64_t o_stride) {
  for (int64_t d = 0; d < head_dim; d += 8 * kVecs) {
    __m256 acc[kGroup][kVecs];
    for (int64_t g = 0; g < kGroup; ++g) {
      for (int i = 0; i < kVecs; ++i) acc[g][i] = _mm256_loadu_ps(o + g * o_stride + d + 8 * i);
    }
    for (int64_t t = 0; t < n; ++t) {
      __m256 p[kGroup];
      for (int64_t g = 0; g < kGroup; ++g) p[g] = _mm256_broadcast_ss(w + g * w_stride + t);
      const float* v = vb + t * token_stride + d;
      for (int i = 0; i < kVecs; ++i) {
        const __m256 x = _mm256_loadu_ps(v + 8 * i);
        for (int64_t g = 0; g < kGroup; ++g) acc[g][i] = _mm256_fmadd_ps(p[g], x, acc[g][i]);
      }
    }
    for (int64_t g = 0; g < kGroup; ++g) {
      for (int i = 0; i < kVecs; ++i) _mm256_storeu_ps(o + g * o_stride + d + 8 * i, acc[g][i]);
    }
  }
}

// The `group` heads' weighted values of one block: group_values where a register tile fits, else head by head.
inline void weigh_values(const float* w, int64_t w_stride, const float* vb, int64_t token_stride, int64_t n,
                         int64_t group, int64_t head_dim, float* o, int64_t o_stride) {
  if (head_dim % 32 == 0 && group <= 3) {
    if (group == 1) return group_values<1, 4>(w, w_stride, vb, token_stride, n, head_dim, o, o_stride);
    if (group == 2) return group_values<2, 4>(w, w_stride, vb, token_stride, n, head_dim, o, o_stride);
    return group_values<3, 4>(w, w_stride, vb, token_stride, n, head_dim, o, o_stride);
  }
  if (head_dim % 16 == 0 && (group == 4 || group == 5)) {
    if (group == 4) return group_values<4, 2>(w, w_stride, vb, token_stride, n, head_dim, o, o_stride);
    return group_values<5, 2>(w, w_stride, vb, token_stride, n, head_dim, o, o_stride);
  }
  for (int64_t g = 0; g < group; ++g) block_values(w + g * w_stride, vb, token_stride, n, head_dim, o + g * o_stride);
}

// Ask for `rows` rows of `row` floats, `stride` floats apart, ahead of their use: a chunk's blocks lie anywhere in
// the cache, so the hardware prefetcher cannot run ahead across them. Into L2 (prefetcht1), whose miss queue is
// deeper than L1's: with kPrefetchBlocks blocks in flight, a core streams scattered blocks from memory about twice
// as fast as with 2 blocks into L1.
inline void prefetch_rows(const float* p, int64_t rows, int64_t row, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < row; x += 16) __builtin_prefetch(p + r * stride + x, 0, 2);
  }
}

// The tasks of one split-KV call and where their partials go. Built by one thread; its tasks (run_task) may then
// run on any threads in any order, and merge_rows after all of them. A plan serves every layer of a step: the
// layers' caches differ, their shapes and the rows' block tables do not.
class SplitKvPlan {
 public:
  // kv: the shape of the caches; chunk_tokens: 0 for the automatic size; threads: how many will run the tasks.
  SplitKvPlan(const DecodeRows& rows, const PagedKv& kv, int64_t chunk_tokens, int64_t threads)
      : rows_(rows), kv_(kv), chunk_of_(rows.batch), part_of_(rows.batch + 1, 0), runs_{0} {
    const int64_t bs = kv.block_size, width = rows.max_blocks;
    const int64_t* bt = rows.block_tables;
    for (int64_t b = 0; b < rows.batch; ++b) {
      chunk_of_[b] = chunk_tokens ? chunk_tokens / bs : chunk_blocks_for(rows.lens[b], bs, kv.num_kv_heads, threads);
      const int64_t chunk_len = chunk_of_[b] * bs;
      part_of_[b + 1] = part_of_[b] + (rows.lens[b] + chunk_len - 1) / chunk_len;
      if (b && (chunk_of_[b] != chunk_of_[b - 1] || !std::equal(bt + b * width, bt + (b + 1) * width,
                                                                bt + (b - 1) * width))) {
        runs_.push_back(b);
      }
    }
    runs_.push_back(rows.batch);
    for (int64_t r = 0; r + 1 < static_cast<int64_t>(runs_.size()); ++r) {
      const int64_t longest = *std::max_element(rows.lens + runs_[r], rows.lens + runs_[r + 1]);
      const int64_t chunk_len = chunk_of_[runs_[r]] * bs;
      for (int64_t h = 0; h < kv.num_kv_heads; ++h) {
        for (int64_t c = 0; c * chunk_len < longest; ++c) tasks_.push_back({r, h, c});
      }
    }
  }

  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  // Floats of the partials buffer: per (row, chunk, head), o[head_dim], subtrahend, sum, chunk max.
  int64_t partial_floats() const { return part_of_[rows_.batch] * rows_.num_heads * record(); }

  // Task i over the cache `kv` (of the plan's shape), with the queries q (as rows.q, at rows.q_stride): its
  // chunk's scores, exps and weighted values for every row of its run, into `partials`. `scores` is the calling
  // thread's scratch; `fallbacks` counts the partials that left the unified max's band.
  void run_task(int64_t i, const PagedKv& kv, const float* q, float* partials, std::vector<float>& scores,
                int64_t& fallbacks) const {
    const Task task = tasks_[i];
    const int64_t bs = kv.block_size, head_dim = kv.head_dim, num_heads = rows_.num_heads;
    const int64_t group = num_heads / kv.num_kv_heads, rec = record(), h = task.head;
    const int64_t chunk_blocks = chunk_of_[runs_[task.run]];
    const int64_t chunk_len = chunk_blocks * bs, start = task.chunk * chunk_len;
    const int64_t head_size = kv.head_size(), key_block_stride = kv.k_block_stride();
    scores.resize(group * chunk_len);
    float* w = scores.data();  // [group, chunk_len]
    // Row by row: the chunk's keys and values, read from memory for the run's first row, stay in L2.
    for (int64_t b = runs_[task.run]; b < runs_[task.run + 1]; ++b) {
      const int64_t len = rows_.lens[b];
      if (start >= len) continue;
      const int64_t n = std::min(chunk_len, len - start);
      const int64_t* table = rows_.block_tables + b * rows_.max_blocks + task.chunk * chunk_blocks;
      const float* qh = q + b * rows_.q_stride + h * group * head_dim;
      const int64_t num_blocks = (n + bs - 1) / bs;
      auto keys = [&](int64_t j) { return kv.k + table[j] * key_block_stride + h * head_size; };
      auto values = [&](int64_t j) { return kv.v + table[j] * kv.v_block_stride + h * kv.v_head_stride; };
      for (int64_t j = 0; j < num_blocks;) {
        const float* tile[4];
        const int64_t available = std::min<int64_t>(4, num_blocks - j);
        for (int64_t i = 0; i < available; ++i) tile[i] = keys(j + i);
        const int64_t done = score_blocks(qh, tile, available, group, head_dim, bs, rows_.scale, w + j * bs,
                                          chunk_len);
        for (int64_t i = j + kPrefetchBlocks; i < std::min(num_blocks, j + done + kPrefetchBlocks); ++i) {
          prefetch_rows(keys(i), 1, head_size, 0);
        }
        j += done;
      }
      for (int64_t j = 0; j < std::min(kPrefetchBlocks, num_blocks); ++j) {
        prefetch_rows(values(j), bs, head_dim, kv.v_token_stride);  // on their way during the exps
      }
      float* part = partials + ((part_of_[b] + task.chunk) * num_heads + h * group) * rec;
      const float* sink = kv.k + rows_.block_tables[b * rows_.max_blocks] * key_block_stride + h * head_size;
      for (int64_t g = 0; g < group; ++g) {
        float* wg = w + g * chunk_len;
        float* pg = part + g * rec;
        float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < n; ++t) top = std::max(top, wg[t]);
        float unified = rows_.phi;
        if (std::isnan(unified)) {  // the same sum in every chunk of the row, so one subtrahend for all of them
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot = std::fma(qh[g * head_dim + d], sink[d * bs], dot);
          unified = dot * rows_.scale;
        }
        const bool in_band = top - unified <= kUnifiedBand && top - unified >= -kUnifiedBand;
        fallbacks += !in_band;
        pg[head_dim] = in_band ? unified : top;
        pg[head_dim + 1] = exp_sum(wg, n, pg[head_dim]);
        pg[head_dim + 2] = top;
        std::fill(pg, pg + head_dim, 0.0f);
      }
      // Weighted values block by block: the block stays in L1 across the group's heads.
      for (int64_t j = 0; j < num_blocks; ++j) {
        if (j + kPrefetchBlocks < num_blocks) prefetch_rows(values(j + kPrefetchBlocks), bs, head_dim,
                                                            kv.v_token_stride);
        weigh_values(w + j * bs, chunk_len, values(j), kv.v_token_stride, std::min(bs, n - j * bs), group, head_dim,
                     part, rec);
      }
    }
  }

  // Merge the chunks of output rows [begin, end) (row = b * num_heads + head) in chunk order into out [B, H, D]:
  // out = sum_c e^(sub_c - M) o_c / sum_c e^(sub_c - M) l_c.
  void merge_rows(int64_t begin, int64_t end, const float* partials, float* out) const {
    const int64_t head_dim = kv_.head_dim, num_heads = rows_.num_heads, rec = record();
    std::vector<float> acc(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_heads, head = row % num_heads;
      const int64_t num_chunks = part_of_[b + 1] - part_of_[b], chunk_stride = num_heads * rec;
      const float* first = partials + (part_of_[b] * num_heads + head) * rec;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < num_chunks; ++c) top = std::max(top, first[c * chunk_stride + head_dim]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const float* part = first + c * chunk_stride;
        const float factor = std::exp(part[head_dim] - top);  // exactly 1 for the chunks on the unified max
        sum = std::fma(factor, part[head_dim + 1], sum);
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] = std::fma(factor, part[d], acc[d]);
      }
      float* dst = out + row * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = acc[d] / sum;
    }
  }

  // The largest score any task saw.
  float max_score(const float* partials) const {
    float top = -std::numeric_limits<float>::infinity();
    const int64_t count = part_of_[rows_.batch] * rows_.num_heads, rec = record();
    for (int64_t p = 0; p < count; ++p) top = std::max(top, partials[p * rec + kv_.head_dim + 2]);
    return top;
  }

 private:
  struct Task {
    int64_t run, head, chunk;
  };
  int64_t record() const { return kv_.head_dim + 3; }

  DecodeRows rows_;
  PagedKv kv_;
  std::vector<int64_t> chunk_of_, part_of_, runs_;  // per row: chunk size (blocks), first partial; run starts
  std::vector<Task> tasks_;
};

}  // namespace foreseer_attn
