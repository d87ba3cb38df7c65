// The few-row matmul's tiles (float32 rows, float32 or bfloat16 weights, float32 sums), shared by
// the FFI kernels that multiply a few rows by weight matrices: few_row_matmul.cc (one matmul per
// call) and fused_lm_step.cc (a whole small LM's decode step per call). The operands, layouts and
// exactness contract are few_row_matmul.cc's; entry points: nn_unit (x @ W, kUnit columns) and
// nt_unit (x @ W^T, kDotUnit columns), each for every row of a `ProblemT`.
#ifndef EFFJAX_FEW_ROW_MATMUL_H_
#define EFFJAX_FEW_ROW_MATMUL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bfloat16.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ---- One SIMD vector of floats: AVX-512, AVX2 + FMA, or scalar. ----
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kMaxRows = 6;   // 32 vector registers: 6 x 4 accumulators + 4 weight vectors,
constexpr int kNarrowVecs = 4;
constexpr int kWideRows = 3;  // or 3 x 8 accumulators + 8 weight vectors.
constexpr int kWideVecs = 8;
using Vec = __m512;
inline __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void vstore_n(float* p, Vec v, int n) { _mm512_mask_storeu_ps(p, lane_mask(n), v); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kMaxRows = 6;  // 16 vector registers: 6 x 2 accumulators + 2 weight vectors,
constexpr int kNarrowVecs = 2;
constexpr int kWideRows = 2;  // or 2 x 4 accumulators + 4 weight vectors.
constexpr int kWideVecs = 4;
using Vec = __m256;
inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload_n(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void vstore_n(float* p, Vec v, int n) { _mm256_maskstore_ps(p, lane_mask(n), v); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {  // A fixed tree: ((0+4)+(2+6)) + ((1+5)+(3+7)).
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
#else
constexpr int kLanes = 1;
constexpr int kMaxRows = 4;
constexpr int kNarrowVecs = 2;
constexpr int kWideRows = 2;
constexpr int kWideVecs = 4;
using Vec = float;
inline Vec vzero() { return 0.0f; }
inline Vec vload(const float* p) { return *p; }
inline Vec vload_n(const float* p, int n) { return n > 0 ? *p : 0.0f; }
inline void vstore(float* p, Vec v) { *p = v; }
inline void vstore_n(float* p, Vec v, int n) {
  if (n > 0) *p = v;
}
inline Vec vset(float x) { return x; }
inline Vec vfma(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
inline float vsum(Vec v) { return v; }
#endif

// Weights are float32, or bfloat16 (as its bits, uint16_t) widened to float32 as they are loaded: a
// bfloat16 weight is the top half of the float32 with the same value, so the widening is exact and
// the arithmetic is the float32 kernel's, on half the bytes.
inline Vec wload(const float* p) { return vload(p); }
inline Vec wload_n(const float* p, int n) { return vload_n(p, n); }
#if defined(__AVX512F__)
inline Vec wload(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline Vec wload(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#else
inline Vec wload(const uint16_t* p) { return effjax::bf16_to_float(*p); }
#endif
inline Vec wload_n(const uint16_t* p, int n) {  // Partial vectors (a narrow last panel) only.
  uint16_t lanes[kLanes] = {};
  std::copy(p, p + n, lanes);
  return wload(lanes);
}

// Pins a loaded weight vector in its register. Without it GCC folds the load into every row's FMA
// (`vfmadd231ps (mem), ...`) for tiles of 2-4 rows, re-reading each weight vector once per row; on
// AMD Zen 4, which loads one 512-bit vector per cycle, a [4, 256] x [256, 768] tile then ran at 61
// GFLOP/s from L2 instead of 111 (one core; 2 rows 62 -> 94, 9 rows 90 -> 110; RESULTS.md, "A new
// machine").
inline void keep_in_register(Vec& v) {
#if defined(__AVX512F__) || defined(__AVX2__)
  asm("" : "+v"(v));
#endif
}

// "nn" tiles: kRows rows x kVecs vectors of columns, the accumulators in registers while the
// tile's weight columns stream past once. Up to kWideRows rows use wide tiles (kWideVecs vectors:
// long contiguous reads of each weight row); more rows use narrower ones, up to kMaxRows rows
// sharing each weight load. Chosen by end-to-end decoding (benchmarks/decode.py), not by
// single-matmul timings, which on this machine mostly measured which weights stayed in L2.
//
// With `stream`, more than kWideRows rows walk the panel in blocks of weight rows (kKBlock, or
// kKBlockFewRows for up to kFewRows rows): the first kWideRows rows take each block in wide reads
// straight from DRAM, the other rows' narrow tiles then find it in L1 (accumulators go to `out`
// between blocks and come back exactly). The
// narrow tiles' 256-byte pieces of weight rows 6 KB apart were the slow part from DRAM: at 8 rows,
// [8, 512] x [512, 1536] over 189 MB of weights took 343 us against 210 us this way (in-process
// alternation); with weights in cache the blocking costs 10-25%, hence the flag.
constexpr int64_t kUnit = kWideVecs * kLanes;  // Columns per work unit (128 with AVX-512).
constexpr int64_t kKBlock = 64;  // Weight rows per block: 32 KB of a 128-column panel (L1).
// Up to kFewRows rows (M = batch x new tokens: one-token decoding at batch <= 12) take half-size
// blocks, and their wide tile asks for the next block too, not only the tiles after it (which at
// 1-9 rows are a short stretch of arithmetic to spread a block's requests over). Whole generations
// of benchmarks/decode.py's 126 MB `large` on AMD Zen 4 (in-process alternation): batch 8 13%
// faster (1305 -> 1139 ms), batch 4 8%, batch 6 7%, batch 12 5%, batch 16 3.5% slower - hence the
// bound; single-call timings had shown at most ~10%, within their spread (RESULTS.md, "Large batch
// 8 at 3x").
constexpr int64_t kKBlockFewRows = 32;
constexpr int64_t kFewRows = 12;
// Columns per panel of packed weights, whatever the vector width (a multiple of every kUnit).
constexpr int64_t kPanel = 128;
static_assert(kPanel % kUnit == 0, "a work unit must not straddle two packed panels");

// W: the weights' element type, float or uint16_t (bfloat16 bits); x and out are float32.
template <typename W>
struct ProblemT {
  const float* x;
  const W* w;
  float* out;
  int64_t m, k, n;
  bool packed;
};
using Problem = ProblemT<float>;

// Where weight row k0 of column c0 lives, and `ld`, the distance to the next weight row.
template <typename W>
inline const W* weight_row(const ProblemT<W>& p, int64_t k0, int64_t c0, int64_t& ld) {
  if (!p.packed) {
    ld = p.n;
    return p.w + k0 * p.n + c0;
  }
  const int64_t panel = c0 / kPanel;
  ld = std::min(kPanel, p.n - panel * kPanel);  // The last panel is narrower.
  return p.w + panel * kPanel * p.k + k0 * ld + (c0 - panel * kPanel);
}

// With `stream`, a block's first rows wait on memory while the others then compute from L1 with
// the memory bus idle. The tiles after the first kWideRows rows (and, for up to kFewRows rows, the
// wide tile of those first rows too) therefore ask for the next block's cache lines as they go,
// a few per k step (into L2: prefetching into L1 would evict the block they are using), so the
// next block's reads overlap this block's arithmetic: 20-23% less time at 8-20 rows on 3 MB
// weight matrices from DRAM, 6-8% at 9-20 rows on lm/small's 0.8 MB ones (RESULTS.md,
// "Prefetching the next block").
struct Prefetch {
  const char* row = nullptr;  // The weight row being fetched (nullptr: nothing left to fetch).
  int64_t row_bytes = 0;      // Bytes of it the tile reads.
  int64_t stride = 0;         // Bytes from one weight row to the next.
  int64_t rows_left = 0;
  int64_t offset = 0;         // Next line to ask for, in bytes from the line holding `row`.
  int64_t per_step = 0;       // Cache lines to ask for per k step.

  // `rows` weight rows from `first_row` on, `ld_bytes` apart, `width_bytes` of each, spread over
  // `steps` k steps.
  Prefetch(const char* first_row, int64_t ld_bytes, int64_t width_bytes, int64_t rows,
           int64_t steps)
      : row(rows > 0 ? first_row : nullptr), row_bytes(width_bytes), stride(ld_bytes),
        rows_left(rows) {
    const int64_t lines = rows * ((width_bytes + 63) / 64 + 1);  // + 1: rows may straddle a line.
    per_step = (lines + steps - 1) / std::max<int64_t>(steps, 1);
  }

  inline void step() {
    for (int64_t i = 0; i < per_step && row != nullptr; ++i) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(row);
      const uintptr_t line = (start & ~uintptr_t{63}) + static_cast<uintptr_t>(offset);
      __builtin_prefetch(reinterpret_cast<const void*>(line), /*rw=*/0, /*locality=*/2);
      offset += 64;
      if (line + 64 >= start + static_cast<uintptr_t>(row_bytes)) {  // Past the row's last byte.
        offset = 0;
        row = --rows_left > 0 ? row + stride : nullptr;
      }
    }
  }
};

// Rows [r0, r0 + kRows) x columns [c0, c0 + width) of out, width <= kVecs * kLanes.
// kFull: width == kVecs * kLanes (no masked loads).
// Over weight rows [k0, k1): k0 == 0 starts from zero, else from the partial sums in out.
template <int kRows, int kVecs, bool kFull, typename W>
void nn_tile(const ProblemT<W>& p, int64_t r0, int64_t c0, int64_t width, int64_t k0, int64_t k1,
             Prefetch* next) {
  int lanes[kVecs];  // Columns each vector covers (partial tiles only).
  for (int j = 0; j < kVecs; ++j)
    lanes[j] = static_cast<int>(std::clamp<int64_t>(width - j * kLanes, 0, kLanes));
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const float* o = p.out + (r0 + r) * p.n + c0;
    for (int j = 0; j < kVecs; ++j) {
      acc[r][j] = k0 == 0 ? vzero()
                  : kFull ? vload(o + j * kLanes)
                          : vload_n(o + j * kLanes, lanes[j]);
    }
  }
  const float* x = p.x + r0 * p.k;
  int64_t ld;
  const W* w = weight_row(p, k0, c0, ld);
  for (int64_t kk = k0; kk < k1; ++kk, w += ld) {
    if (next != nullptr) next->step();
    Vec wv[kVecs];
    for (int j = 0; j < kVecs; ++j)
      wv[j] = kFull ? wload(w + j * kLanes) : wload_n(w + j * kLanes, lanes[j]);
    if constexpr (kRows > 1) {
      for (int j = 0; j < kVecs; ++j) keep_in_register(wv[j]);
    }
    for (int r = 0; r < kRows; ++r) {
      const Vec xb = vset(x[r * p.k + kk]);
      for (int j = 0; j < kVecs; ++j) acc[r][j] = vfma(xb, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* o = p.out + (r0 + r) * p.n + c0;
    for (int j = 0; j < kVecs; ++j) {
      if (kFull) vstore(o + j * kLanes, acc[r][j]);
      else if (lanes[j] > 0) vstore_n(o + j * kLanes, acc[r][j], lanes[j]);
    }
  }
}

template <int kVecs, typename W>
void nn_rows(const ProblemT<W>& p, int64_t r0, int rows, int64_t c0, int64_t width, int64_t k0,
             int64_t k1, Prefetch* next = nullptr) {
  constexpr int64_t kCols = kVecs * kLanes;
  const bool full = width == kCols;
  switch (rows) {
#define EFFJAX_ROWS(R)                                                        \
  case R:                                                                     \
    if constexpr (R <= kMaxRows) {                                            \
      return full ? nn_tile<R, kVecs, true>(p, r0, c0, width, k0, k1, next)   \
                  : nn_tile<R, kVecs, false>(p, r0, c0, width, k0, k1, next); \
    }                                                                         \
    break;
    EFFJAX_ROWS(1) EFFJAX_ROWS(2) EFFJAX_ROWS(3) EFFJAX_ROWS(4) EFFJAX_ROWS(5) EFFJAX_ROWS(6)
#undef EFFJAX_ROWS
  }
}

// Rows [r0, m) over weight rows [k0, k1): narrow groups of up to kMaxRows rows, a wide last one.
// `next`: the block to prefetch meanwhile.
template <typename W>
void nn_row_groups(const ProblemT<W>& p, int64_t r0, int64_t c0, int64_t width, int64_t k0,
                   int64_t k1, Prefetch* next = nullptr) {
  constexpr int64_t kNarrow = kNarrowVecs * kLanes;
  while (r0 < p.m) {
    const int64_t left = p.m - r0;
    if (left <= kWideRows) {
      nn_rows<kWideVecs>(p, r0, static_cast<int>(left), c0, width, k0, k1, next);
      return;
    }
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, left));
    for (int64_t c = c0; c < c0 + width; c += kNarrow)
      nn_rows<kNarrowVecs>(p, r0, rows, c, std::min(kNarrow, c0 + width - c), k0, k1, next);
    r0 += rows;
  }
}

// One work unit of "nn": kUnit columns, every row.
template <typename W>
void nn_unit(const ProblemT<W>& p, int64_t unit, bool stream) {
  const int64_t c0 = unit * kUnit, width = std::min(kUnit, p.n - c0);
  if (!stream || p.m <= kWideRows) return nn_row_groups(p, 0, c0, width, 0, p.k);
  // Tiles the rows past the first kWideRows take per block (nn_row_groups' split), to spread the
  // next block's prefetches over their k steps (plus the first rows' wide tile for a few rows).
  constexpr int64_t kNarrow = kNarrowVecs * kLanes;
  int64_t tiles = 0;
  for (int64_t left = p.m - kWideRows; left > 0; left -= std::min<int64_t>(kMaxRows, left)) {
    if (left <= kWideRows) {
      tiles += 1;
      break;
    }
    tiles += (width + kNarrow - 1) / kNarrow;
  }
  const bool few = p.m <= kFewRows;
  const int64_t block = few ? kKBlockFewRows : kKBlock;
  for (int64_t k0 = 0; k0 < p.k; k0 += block) {
    const int64_t k1 = std::min(p.k, k0 + block);
    int64_t ld = 0;
    const W* next_row = k1 < p.k ? weight_row(p, k1, c0, ld) : nullptr;
    Prefetch next(reinterpret_cast<const char*>(next_row), ld * sizeof(W), width * sizeof(W),
                  std::min(p.k, k1 + block) - k1, (tiles + (few ? 1 : 0)) * (k1 - k0));
    // Reads the block from memory (and, for a few rows, asks for the next one meanwhile).
    nn_rows<kWideVecs>(p, 0, kWideRows, c0, width, k0, k1, few ? &next : nullptr);
    nn_row_groups(p, kWideRows, c0, width, k0, k1, &next);  // Finds it in L1.
  }
}

// "nt": rows [r0, r0 + kRows) x columns [c0, c0 + kCols); each a dot product of x's row and w's.
template <int kRows, int kCols, typename W>
void nt_tile(const ProblemT<W>& p, int64_t r0, int64_t c0) {
  Vec acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = vzero();
  const float* x = p.x + r0 * p.k;
  const W* w = p.w + c0 * p.k;
  int64_t kk = 0;
  for (; kk + kLanes <= p.k; kk += kLanes) {
    Vec wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = wload(w + c * p.k + kk);
    for (int r = 0; r < kRows; ++r) {
      const Vec xv = vload(x + r * p.k + kk);
      for (int c = 0; c < kCols; ++c) acc[r][c] = vfma(xv, wv[c], acc[r][c]);
    }
  }
  if (kk < p.k) {
    const int tail = static_cast<int>(p.k - kk);
    Vec wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = wload_n(w + c * p.k + kk, tail);
    for (int r = 0; r < kRows; ++r) {
      const Vec xv = vload_n(x + r * p.k + kk, tail);
      for (int c = 0; c < kCols; ++c) acc[r][c] = vfma(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) p.out[(r0 + r) * p.n + c0 + c] = vsum(acc[r][c]);
}

constexpr int kDotRows = 4;
constexpr int kDotCols = 4;  // "nt": 4 output columns per block.
constexpr int64_t kDotUnit = 64;

template <int kCols, typename W>
void nt_rows(const ProblemT<W>& p, int64_t r0, int rows, int64_t c0) {
  switch (rows) {
    case 1: return nt_tile<1, kCols>(p, r0, c0);
    case 2: return nt_tile<2, kCols>(p, r0, c0);
    case 3: return nt_tile<3, kCols>(p, r0, c0);
    default: return nt_tile<kDotRows, kCols>(p, r0, c0);
  }
}

// One work unit of "nt": 64 output columns, every row.
template <typename W>
void nt_unit(const ProblemT<W>& p, int64_t unit) {
  const int64_t c_end = std::min(p.n, (unit + 1) * kDotUnit);
  for (int64_t r0 = 0; r0 < p.m; r0 += kDotRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kDotRows, p.m - r0));
    int64_t c0 = unit * kDotUnit;
    for (; c0 + kDotCols <= c_end; c0 += kDotCols) nt_rows<kDotCols>(p, r0, rows, c0);
    for (; c0 < c_end; ++c0) nt_rows<1>(p, r0, rows, c0);
  }
}

}  // namespace

#endif  // EFFJAX_FEW_ROW_MATMUL_H_
