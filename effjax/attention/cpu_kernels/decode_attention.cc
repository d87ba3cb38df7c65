// Decode attention on CPU as an XLA FFI custom call: a few query rows per (batch row, kv head) -
// or a prefill's many, 128 at a time - against that head's contiguous [S, H] slice of the LM's
// heads-major KV cache, under a per-row range of visible slots plus an optional tree bitmask
// (Medusa's tree attention).
//
// Why: XLA:CPU runs the two batched [G*T, H] x [H, S] matmuls of decode attention as one small
// Eigen call per batch element, 4-5x slower than torch's bmm on the same shapes (RESULTS.md), and
// over every slot of the allocated cache. Here each (row, kv head) block reads its keys and values
// once for all G*T query rows, only over the slots some row can see, with a vectorisable exp,
// split over XLA's intra-op thread pool. Under Medusa's dense [B, T, S] tree mask a 33-token pass
// spent more time in XLA's attention and its mask fusions than in the weight matmuls; here the tree
// is a few bits per query row.
//
// Operands (float32):  q [B, T, N, H] as the LM's projection makes it; block b * K + k (BK = B * K)
//                        works on its M = G * T rows m = g * T + t: query head k * G + g at token t
//                      k, v [BK, S, H]
//                      lo, hi [BK, M] int32: row m sees key slots lo <= j < hi (empty if lo >= hi)
//                      tree [BK, M, W] int32 (W may be 0): row m also sees slot hi + i for every
//                        bit i (bit i % 32 of word i / 32) set in its words
// Attributes:          scale, softcap (0: none)
// Results:             out [B, T, N, H] (zeros for rows that see no key): the layout of q, so
//                        neither needs a transposing copy around the call
//                      lse [BK, M] = [B, N, T] (natural log; mask_value for rows that see no key)
// Two handlers: EffjaxCpuDecodeAttention (q, k, v, out float32) and EffjaxCpuDecodeAttentionBf16
// (q, k, v, out bfloat16 - a bfloat16 model's cache; lse float32): keys and values are widened to
// float32 as they are read, the arithmetic is the float32 kernel's, each output rounded once.
//
// Exactness: a row's numbers depend only on its own query, mask and the cache - never on which
// other rows share the call (each row's softmax runs over its own slot range; masked slots get
// exact zeros and are skipped) - so speculative verification reproduces one-token decoding bit for
// bit (tests/test_cpu_decode.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bfloat16.h"
#include "exp_nonpositive.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Masked slots of tree rows hold this before the exp (finite, far below any real logit; the kernel
// is built with -ffast-math, which may assume there are no infinities).
constexpr float kMasked = -1e30f;

// Keys and values are float32, or bfloat16 (its bits, uint16_t) widened to float32 as they are
// read - exactly: a bfloat16 is the top half of the float32 with the same value. The arithmetic
// is float32 either way.
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return effjax::bf16_to_float(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Horizontal sums of 16 vectors at once: lane u of the result is the sum of p[u]'s 16 lanes. Every
// sum is the same tree (lanes 8 apart, then 4, 2, 1), so a key's logit does not depend on its place
// among the 16. About 3 instructions per sum where one reduction each takes ~8.
inline __m512 sum16(const __m512 (&p)[16]) {
  __m512 c[8], d[4], e[2];
  for (int u = 0; u < 8; ++u)  // Lanes 0-7: key u (8 partials), 8-15: key u + 8.
    c[u] = _mm512_add_ps(_mm512_shuffle_f32x4(p[u], p[u + 8], 0x44),
                         _mm512_shuffle_f32x4(p[u], p[u + 8], 0xEE));
  for (int u = 0; u < 4; ++u)  // Quarters: keys u, u + 8, u + 4, u + 12 (4 partials each).
    d[u] = _mm512_add_ps(_mm512_shuffle_f32x4(c[u], c[u + 4], 0x88),
                         _mm512_shuffle_f32x4(c[u], c[u + 4], 0xDD));
  for (int u = 0; u < 2; ++u)  // Per quarter: 2 partials of base u, then 2 of base u + 2.
    e[u] = _mm512_add_ps(_mm512_shuffle_ps(d[u], d[u + 2], 0x44),
                         _mm512_shuffle_ps(d[u], d[u + 2], 0xEE));
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88),
                                 _mm512_shuffle_ps(e[0], e[1], 0xDD));
  // f's lane 4Q + i holds key {0, 8, 4, 12}[Q] + {0, 2, 1, 3}[i]; put key u in lane u.
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, f);
}

// Asks for slots [first, last) of a [S, kHeadDim] slice (`locality` 3: into L1, 2: into L2).
template <int64_t kHeadDim, typename KV>
inline void prefetch_slots(const KV* slice, int64_t first, int64_t last, int locality) {
  const char* line = reinterpret_cast<const char*>(slice + first * kHeadDim);
  const char* end = reinterpret_cast<const char*>(slice + last * kHeadDim);
  for (; line < end; line += 64) {
    if (locality == 3) __builtin_prefetch(line, 0, 3);
    else __builtin_prefetch(line, 0, 2);
  }
}

// logits[r * width + j - first] = scale * q[r] . k[j] for every row (at q + rows[r]) and j in
// [first, last), 16 keys at a time (the last group repeats the last key; its extra sums are not
// stored). With `v` (the block's values; nullptr: no prefetching), each group also asks for the
// keys two groups ahead (into L1) and for its own slots' values (into L2, for the values pass).
template <int64_t kHeadDim, typename KV>
void logits_avx512(const float* q, const int64_t* rows, const KV* k, int64_t m, int64_t first,
                   int64_t last, float scale, float* logits, const KV* v) {
  constexpr int kVecs = kHeadDim / 16;
  const int64_t width = last - first;
  for (int64_t j0 = first; j0 < last; j0 += 16) {
    if (v != nullptr) {
      prefetch_slots<kHeadDim>(k, std::min(j0 + 32, last), std::min(j0 + 48, last), 3);
      prefetch_slots<kHeadDim>(v, j0, std::min(j0 + 16, last), 2);
    }
    const KV* keys[16];
    for (int u = 0; u < 16; ++u) keys[u] = k + std::min(j0 + u, last - 1) * kHeadDim;
    const int n = static_cast<int>(std::min<int64_t>(16, last - j0));
    for (int64_t r = 0; r < m; ++r) {
      __m512 qv[kVecs];
      for (int i = 0; i < kVecs; ++i) qv[i] = _mm512_loadu_ps(q + rows[r] + 16 * i);
      __m512 partial[16];
      for (int u = 0; u < 16; ++u) {
        __m512 acc = _mm512_mul_ps(qv[0], load16(keys[u]));
        for (int i = 1; i < kVecs; ++i)
          acc = _mm512_fmadd_ps(qv[i], load16(keys[u] + 16 * i), acc);
        partial[u] = acc;
      }
      const __m512 dots = _mm512_mul_ps(sum16(partial), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(logits + r * width + (j0 - first),
                            static_cast<__mmask16>((1u << n) - 1u), dots);
    }
  }
}
#endif

template <typename KV>
struct Problem {
  const float* q;  // float32 (a bfloat16 call's q, widened)
  const KV *k, *v;
  const int32_t *lo, *hi, *tree;
  float *out, *lse;
  int64_t m, s, h, words;
  int64_t t, n, kv_heads;  // q's T and N, and K (so G = N / K rows of each token per block)
  int64_t blocks;          // B * K
  bool prefetch;           // Ask for keys and values ahead of use (see kPrefetchBytes).
  float scale, softcap, mask_value;
};

// Offsets in q and out of block's rows r0 <= m < r0 + count (m = g * T + t: query head k * G + g
// of token t of row b), as rows[m - r0].
template <typename KV>
inline void row_offsets(const Problem<KV>& p, int64_t block, int64_t r0, int64_t count,
                        std::vector<int64_t>& rows) {
  const int64_t b = block / p.kv_heads, k = block % p.kv_heads, g_heads = p.n / p.kv_heads;
  rows.resize(count);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t g = (r0 + r) / p.t, t = (r0 + r) % p.t;
    rows[r] = ((b * p.t + t) * p.n + k * g_heads + g) * p.h;
  }
}

// Row r's visible slots lie in [a, b) (a >= b: it sees none). `has_tree`: some tree bit is set.
template <typename KV>
inline void row_extent(const Problem<KV>& p, const int32_t* lo, const int32_t* hi,
                       const int32_t* tree, int64_t r, int64_t& a, int64_t& b, bool& has_tree) {
  a = std::clamp<int64_t>(lo[r], 0, p.s);
  b = std::clamp<int64_t>(hi[r], 0, p.s);
  if (a >= b) a = p.s, b = 0;
  has_tree = false;
  for (int64_t w = 0; w < p.words; ++w) {
    const uint32_t word = static_cast<uint32_t>(tree[r * p.words + w]);
    if (word == 0) continue;
    const int64_t low = std::clamp<int64_t>(hi[r] + 32 * w + __builtin_ctz(word), 0, p.s);
    const int64_t high = std::clamp<int64_t>(hi[r] + 32 * w + 32 - __builtin_clz(word), 0, p.s);
    if (low < high) a = std::min(a, low), b = std::max(b, high), has_tree = true;
  }
}

template <typename KV>
inline bool tree_bit(const Problem<KV>& p, const int32_t* tree_row, int64_t i) {
  return i >= 0 && i < 32 * p.words &&
         ((static_cast<uint32_t>(tree_row[i >> 5]) >> (i & 31)) & 1u) != 0;
}

// acc[0:h] += weights[j] * v[j] for j in [first, last), in slot order, zero weights skipped.
template <int64_t kHeadDim, typename KV>
inline void add_weighted_values(const float* weights, const KV* v, int64_t first, int64_t last,
                                int64_t h, float* acc) {
  const int64_t dim = kHeadDim > 0 ? kHeadDim : h;
  for (int64_t j = first; j < last; ++j) {
    const float w = weights[j];
    if (w == 0.0f) continue;
    const KV* vj = v + j * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += w * to_float(vj[d]);
  }
}

#if defined(__AVX512F__)
// out[r] = sum_j weights[r][j] * v[j] for kRows rows at once, j over [first, last) in slot order:
// each value row is loaded once for the group. A zero weight leaves its row's accumulator as it
// was (a masked multiply-add), exactly as if the slot were skipped, so a row's sum never depends on
// which rows share its group - or on the values in slots it cannot see. `next_k` (nullptr: none):
// a [S, kHeadDim] slice whose slots j to ask for into L2 meanwhile (the next block's keys).
template <int64_t kHeadDim, int kRows, typename KV>
void values_rows_avx512(const float* weights, int64_t width, const KV* v, int64_t first,
                        int64_t last, float* out, const int64_t* rows, const KV* next_k) {
  constexpr int kVecs = kHeadDim / 16;
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kVecs; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t j = first; j < last; ++j) {
    float w[kRows];
    bool any = false;
    for (int r = 0; r < kRows; ++r) {
      w[r] = weights[r * width + (j - first)];
      any |= w[r] != 0.0f;
    }
    if (next_k != nullptr) prefetch_slots<kHeadDim>(next_k, j, j + 1, 2);
    if (!any) continue;
    __m512 vj[kVecs];
    for (int i = 0; i < kVecs; ++i) vj[i] = load16(v + j * kHeadDim + 16 * i);
    for (int r = 0; r < kRows; ++r) {
      const __mmask16 live = w[r] != 0.0f ? 0xFFFF : 0;
      const __m512 wv = _mm512_set1_ps(w[r]);
      for (int i = 0; i < kVecs; ++i)
        acc[r][i] = _mm512_mask3_fmadd_ps(wv, vj[i], acc[r][i], live);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kVecs; ++i) _mm512_storeu_ps(out + rows[r] + 16 * i, acc[r][i]);
}

// Every row's output through values_rows_avx512, in groups of up to 6 rows and at most 16
// accumulator registers; the first group asks for `next_k`'s slots.
template <int64_t kHeadDim, typename KV>
void values_avx512(const float* weights, int64_t m, int64_t width, const KV* v, int64_t first,
                   int64_t last, float* out, const int64_t* rows, const KV* next_k) {
  constexpr int kGroup = std::max<int>(1, std::min<int>(6, 16 / (kHeadDim / 16)));
  int64_t r = 0;
  for (; r + kGroup <= m; r += kGroup)
    values_rows_avx512<kHeadDim, kGroup, KV>(weights + r * width, width, v, first, last, out,
                                             rows + r, r == 0 ? next_k : nullptr);
  for (; r < m; ++r)
    values_rows_avx512<kHeadDim, 1, KV>(weights + r * width, width, v, first, last, out, rows + r,
                                    r == 0 ? next_k : nullptr);
}
#endif

// Software prefetching (keys two 16-key groups ahead, each group's values during the logits, the
// next block's keys during the values) pays only where the cache comes from memory: the hardware
// prefetchers restart at every block and every switch from keys to values, and the few query rows
// of decoding leave little arithmetic to hide that behind. Gated on the call's keys and values
// being larger than two cores' L2 (a bigger cache rarely stays in L3 behind a model's weights) and
// on few rows per block. One layer of `large` at batch 8 (4 MB, 192 of 256 slots; 40 layers'
// caches cycled so each comes from DRAM): 144 -> 119 us; lm/small at batch 16 from L3: 64 -> 59
// us; below the gate, prefetches only cost: lm/small at batch 1, 13.8 -> 16.2 us (RESULTS.md,
// "Prefill attention through the kernel; prefetching from DRAM").
constexpr int64_t kPrefetchBytes = int64_t{2} << 20;
constexpr int64_t kPrefetchRows = 32;

// Query rows per work unit: a block's rows are split into chunks of this many, so a prefill's
// hundreds of rows per block spread over the cores even with one block (batch 1, one kv head), its
// logits scratch stays at kRowChunk * S floats, and a causal chunk of early tokens reads only the
// keys its rows can see. Decoding, verification and Medusa's trees (<= 128 rows) stay one unit.
constexpr int64_t kRowChunk = 128;

// One work unit: rows [r0, r0 + kRowChunk) (at most) of one (batch row, kv head) block of q against
// keys lo..hi of the block's [S, H] slice. kHeadDim > 0 fixes the head dim at compile time (the
// inner loops unroll and the accumulators stay in registers); 0 reads it from the problem.
template <int64_t kHeadDim, typename KV>
void attend_block(const Problem<KV>& p, int64_t block, int64_t r0, std::vector<float>& logits,
                  std::vector<int64_t>& rows) {
  const int64_t m = std::min(kRowChunk, p.m - r0);
  const float* q = p.q;  // Row r at q + rows[r], as out's.
  const KV* k = p.k + block * p.s * p.h;
  const KV* v = p.v + block * p.s * p.h;
  const int32_t* lo = p.lo + block * p.m + r0;
  const int32_t* hi = p.hi + block * p.m + r0;
  const int32_t* tree = p.tree + (block * p.m + r0) * p.words;
  float* out = p.out;
  float* lse = p.lse + block * p.m + r0;
  const int64_t h = kHeadDim > 0 ? kHeadDim : p.h;
  row_offsets(p, block, r0, m, rows);

  int64_t first = p.s, last = 0;  // The union of the rows' visible slots.
  for (int64_t r = 0; r < m; ++r) {
    int64_t a, b;
    bool has_tree;
    row_extent(p, lo, hi, tree, r, a, b, has_tree);
    if (a < b) {
      first = std::min(first, a);
      last = std::max(last, b);
    }
  }
  for (int64_t r = 0; r < m; ++r) std::fill(out + rows[r], out + rows[r] + h, 0.0f);
  std::fill(lse, lse + m, p.mask_value);
  if (first >= last) return;
  const int64_t width = last - first;
  logits.resize(m * width);

  // Logits: each key row is loaded once for all query rows.
#if defined(__AVX512F__)
  if constexpr (kHeadDim > 0 && kHeadDim % 16 == 0) {
    logits_avx512<kHeadDim>(q, rows.data(), k, m, first, last, p.scale, logits.data(),
                            p.prefetch ? v : nullptr);
  } else
#endif
  for (int64_t j = first; j < last; ++j) {
    const KV* kj = k + j * h;
    for (int64_t r = 0; r < m; ++r) {
      const float* qr = q + rows[r];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < h; ++d) dot += qr[d] * to_float(kj[d]);
      logits[r * width + (j - first)] = dot * p.scale;
    }
  }
  // Softmax per row over its own visible range; probabilities overwrite the logits.
  for (int64_t r = 0; r < m; ++r) {
    int64_t a, b;
    bool has_tree;
    row_extent(p, lo, hi, tree, r, a, b, has_tree);
    float* row = logits.data() + r * width - first;
    if (a >= b) {
      std::fill(row + first, row + last, 0.0f);
      continue;
    }
    if (p.softcap > 0.0f) {
      for (int64_t j = a; j < b; ++j) row[j] = p.softcap * std::tanh(row[j] / p.softcap);
    }
    if (has_tree) {  // Slots in [a, b) outside both [lo, hi) and the tree bits: masked.
      const int64_t lo_r = lo[r], hi_r = hi[r];
      const int32_t* tree_row = tree + r * p.words;
      for (int64_t j = a; j < std::min(b, std::min(lo_r, hi_r)); ++j) row[j] = kMasked;
      for (int64_t j = std::max(a, hi_r); j < b; ++j) {  // Past the range: the tree's slots.
        if (!tree_bit(p, tree_row, j - hi_r)) row[j] = kMasked;
      }
    }
    float mx = row[a];
    for (int64_t j = a + 1; j < b; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = a; j < b; ++j) {
      const float x = row[j];
      const float e = exp_nonpositive(x - mx);
      row[j] = x > 0.5f * kMasked ? e : 0.0f;  // Masked slots: exact zeros.
      sum += row[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = a; j < b; ++j) row[j] *= inv;
    std::fill(row + first, row + a, 0.0f);
    std::fill(row + b, row + last, 0.0f);
    lse[r] = mx + std::log(sum);
  }
  // Output: each row accumulates its weighted value rows in slot order (zero weights skipped),
  // the accumulators in registers when the head dim is fixed; the block's values stay in L1/L2.
  // With AVX-512 a group of rows shares each value row's loads (3.5-13% faster for 2-66 rows).
#if defined(__AVX512F__)
  if constexpr (kHeadDim > 0 && kHeadDim % 16 == 0) {
    // A thread's next unit is usually the next block (parallel_for's contiguous ranges).
    const bool next = p.prefetch && block + 1 < p.blocks;
    values_avx512<kHeadDim>(logits.data(), m, width, v, first, last, out, rows.data(),
                            next ? p.k + (block + 1) * p.s * p.h : nullptr);
    return;
  }
#endif
  for (int64_t r = 0; r < m; ++r) {
    const float* weights = logits.data() + r * width - first;
    float* o = out + rows[r];
    if constexpr (kHeadDim > 0) {
      float acc[kHeadDim] = {};
      add_weighted_values<kHeadDim, KV>(weights, v, first, last, h, acc);
      std::copy(acc, acc + kHeadDim, o);
    } else {
      add_weighted_values<0, KV>(weights, v, first, last, h, o);  // o starts at zero.
    }
  }
}

// Shapes: q [B, T, N, H]; k, v [BK, S, H]; tree [BK, M, W] with K = BK / B kv heads and
// M = N / K * T. Empty when they fit, else what is wrong.
template <typename Dims>
const char* check_shapes(const Dims& qd, const Dims& kd, const Dims& td) {
  const bool ok = qd.size() == 4 && kd.size() == 3 && td.size() == 3 && qd[0] > 0 &&
                  kd[0] % qd[0] == 0 && qd[3] == kd[2] && qd[2] % (kd[0] / qd[0]) == 0 &&
                  td[0] == kd[0] && td[1] == qd[2] / (kd[0] / qd[0]) * qd[1];
  return ok ? ""
            : "effjax_cpu_decode_attention: q must be [B, T, N, H], k, v [B * K, S, H] with K "
              "dividing N, and tree [B * K, N / K * T, W]";
}

// Attention of q (float32, [B, T, N, H]) over k, v (float32 or bfloat16) into out (float32, q's
// layout) and lse, split over XLA's intra-op threads.
template <typename KV, typename Dims>
void attend_all(ffi::ThreadPool& pool, const float* q, const KV* k, const KV* v, const int32_t* lo,
                const int32_t* hi, const int32_t* tree, const Dims& qd, const Dims& kd,
                const Dims& td, float scale, float softcap, float mask_value, float* out,
                float* lse) {
  const int64_t bk = kd[0], kv_heads = kd[0] / qd[0], m = qd[2] / kv_heads * qd[1];
  const bool prefetch = 2 * bk * kd[1] * kd[2] * int64_t{sizeof(KV)} > kPrefetchBytes &&
                        m <= kPrefetchRows;
  const Problem<KV> problem{q,     k,     v,     lo,       hi,    tree,  out,
                            lse,   m,     kd[1], qd[3],    td[2], qd[1], qd[2],
                            kv_heads, bk, prefetch, scale, softcap, mask_value};
  auto attend = problem.h == 32    ? attend_block<32, KV>
                : problem.h == 64  ? attend_block<64, KV>
                : problem.h == 128 ? attend_block<128, KV>
                                   : attend_block<0, KV>;
  // Below ~128K multiply-adds per pass over the cache (one-token decoding of a small model) the
  // work is a few microseconds: waking helpers would cost more. Medusa's 66-row blocks need them.
  const int64_t work = bk * kd[1] * kd[2] * std::max<int64_t>(m, 2);
  const bool use_helpers = work >= (int64_t{1} << 17);
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;  // Work units per block.
  effjax::parallel_for(pool, bk * chunks, use_helpers, [problem, attend, chunks](int64_t unit) {
    thread_local std::vector<float> logits;  // Scratch, reused across calls on each thread.
    thread_local std::vector<int64_t> rows;
    attend(problem, unit / chunks, unit % chunks * kRowChunk, logits, rows);
  });
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                               ffi::Buffer<ffi::S32> tree, float scale, float softcap,
                               float mask_value,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const char* error = check_shapes(q.dimensions(), k.dimensions(), tree.dimensions());
  if (*error) return ffi::Error::InvalidArgument(error);
  attend_all(pool, q.typed_data(), k.typed_data(), v.typed_data(), lo.typed_data(),
             hi.typed_data(), tree.typed_data(), q.dimensions(), k.dimensions(),
             tree.dimensions(), scale, softcap, mask_value, out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

// A bfloat16 model's cache: q, k, v and out bfloat16 (lse float32). q is widened once, the keys
// and values as they are read; the sums are float32 and each output is rounded to bfloat16 once -
// what XLA computes for the same attention (it widens the cache to float32 first).
ffi::Error DecodeAttentionBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                                   ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                                   ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                                   ffi::Buffer<ffi::S32> tree, float scale, float softcap,
                                   float mask_value, ffi::ResultBuffer<ffi::BF16> out,
                                   ffi::ResultBuffer<ffi::F32> lse) {
  const char* error = check_shapes(q.dimensions(), k.dimensions(), tree.dimensions());
  if (*error) return ffi::Error::InvalidArgument(error);
  const int64_t size = q.element_count();
  thread_local std::vector<float> q32, out32;  // Scratch, reused across calls on each thread.
  out32.resize(size);
  attend_all(pool, effjax::widen(q.typed_data(), size, q32), k.typed_data(), v.typed_data(),
             lo.typed_data(), hi.typed_data(), tree.typed_data(), q.dimensions(), k.dimensions(),
             tree.dimensions(), scale, softcap, mask_value, out32.data(), lse->typed_data());
  effjax::narrow(out32, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxCpuDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxCpuDecodeAttentionBf16, DecodeAttentionBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
