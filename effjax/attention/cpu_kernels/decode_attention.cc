// Decode attention on CPU as an XLA FFI custom call: a few query rows per (batch row, kv head)
// against that head's contiguous [S, H] slice of the LM's heads-major KV cache.
//
// Why: XLA:CPU runs the two batched [G*T, H] x [H, S] matmuls of decode attention as one small
// Eigen call per batch element, 4-5x slower than torch's bmm on the same shapes (RESULTS.md), and
// over every slot of the allocated cache. Here each (row, kv head) block reads its keys and values
// once for all G*T query rows, only over the slots some row can see, with a vectorisable exp,
// split over XLA's intra-op thread pool.
//
// Operands (float32):  q [BK, M, H]  rows m = g * T + t of kv head k of batch row b (BK = B * K)
//                      k, v [BK, S, H]
//                      lo, hi [BK, M] int32: row m sees key slots lo <= j < hi (empty if lo >= hi)
// Attributes:          scale, softcap (0: none)
// Results:             out [BK, M, H] (zeros for rows that see no key)
//                      lse [BK, M] (natural log; mask_value for rows that see no key)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 (logits minus their row max), vectorisable: 2^n * p(r) with |r| <= ln2 / 2,
// a degree-6 polynomial (relative error ~2e-7, float32's own rounding). Below -87 it returns 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n * ln2, ln2 in two parts
  float p = 1.98756915e-4f;
  p = p * r + 1.39819994e-3f;
  p = p * r + 8.33345205e-3f;
  p = p * r + 4.16657962e-2f;
  p = p * r + 1.66666657e-1f;
  p = p * r + 5.00000012e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Problem {
  const float *q, *k, *v;
  const int32_t *lo, *hi;
  float *out, *lse;
  int64_t m, s, h;
  float scale, softcap, mask_value;
};

// One (batch row, kv head) block: rows [m] of q against keys lo..hi of its [S, H] slice.
// kHeadDim > 0 fixes the head dim at compile time (the inner loops unroll and the accumulators stay
// in registers); 0 reads it from the problem.
template <int64_t kHeadDim>
void attend_block(const Problem& p, int64_t block, std::vector<float>& logits) {
  const float* q = p.q + block * p.m * p.h;
  const float* k = p.k + block * p.s * p.h;
  const float* v = p.v + block * p.s * p.h;
  const int32_t* lo = p.lo + block * p.m;
  const int32_t* hi = p.hi + block * p.m;
  float* out = p.out + block * p.m * p.h;
  float* lse = p.lse + block * p.m;
  const int64_t h = kHeadDim > 0 ? kHeadDim : p.h;

  int64_t first = p.s, last = 0;  // The union of the rows' visible slots.
  for (int64_t r = 0; r < p.m; ++r) {
    const int64_t a = std::clamp<int64_t>(lo[r], 0, p.s), b = std::clamp<int64_t>(hi[r], 0, p.s);
    if (a < b) {
      first = std::min(first, a);
      last = std::max(last, b);
    }
  }
  std::fill(out, out + p.m * h, 0.0f);
  std::fill(lse, lse + p.m, p.mask_value);
  if (first >= last) return;
  const int64_t width = last - first;
  logits.resize(p.m * width);

  // Logits: each key row is loaded once for all query rows.
  for (int64_t j = first; j < last; ++j) {
    const float* kj = k + j * h;
    for (int64_t r = 0; r < p.m; ++r) {
      const float* qr = q + r * h;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < h; ++d) dot += qr[d] * kj[d];
      logits[r * width + (j - first)] = dot * p.scale;
    }
  }
  // Softmax per row over its own visible range; probabilities overwrite the logits.
  for (int64_t r = 0; r < p.m; ++r) {
    const int64_t a = std::clamp<int64_t>(lo[r], 0, p.s), b = std::clamp<int64_t>(hi[r], 0, p.s);
    float* row = logits.data() + r * width - first;
    if (a >= b) {
      std::fill(row + first, row + last, 0.0f);
      continue;
    }
    if (p.softcap > 0.0f) {
      for (int64_t j = a; j < b; ++j) row[j] = p.softcap * std::tanh(row[j] / p.softcap);
    }
    float mx = row[a];
    for (int64_t j = a + 1; j < b; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = a; j < b; ++j) {
      row[j] = exp_nonpositive(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = a; j < b; ++j) row[j] *= inv;
    std::fill(row + first, row + a, 0.0f);
    std::fill(row + b, row + last, 0.0f);
    lse[r] = mx + std::log(sum);
  }
  // Output: each value row is loaded once for all query rows.
  for (int64_t j = first; j < last; ++j) {
    const float* vj = v + j * h;
    for (int64_t r = 0; r < p.m; ++r) {
      const float w = logits[r * width + (j - first)];
      if (w == 0.0f) continue;
      float* o = out + r * h;
#pragma omp simd
      for (int64_t d = 0; d < h; ++d) o[d] += w * vj[d];
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, float scale,
                               float softcap, float mask_value,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || qd[0] != kd[0] || qd[2] != kd[2]) {
    return ffi::Error::InvalidArgument("effjax_cpu_decode_attention: q must be [BK, M, H] and "
                                       "k, v [BK, S, H]");
  }
  const Problem problem{q.typed_data(),  k.typed_data(),    v.typed_data(), lo.typed_data(),
                        hi.typed_data(), out->typed_data(), lse->typed_data(), qd[1],
                        kd[1],           qd[2],             scale,            softcap,
                        mask_value};
  auto attend = problem.h == 32    ? attend_block<32>
                : problem.h == 64  ? attend_block<64>
                : problem.h == 128 ? attend_block<128>
                                   : attend_block<0>;
  // Below ~64K cached floats the work is a few microseconds: waking helpers would cost more.
  const bool use_helpers = qd[0] * kd[1] * kd[2] >= (int64_t{1} << 16);
  effjax::parallel_for(pool, qd[0], use_helpers, [problem, attend](int64_t block) {
    thread_local std::vector<float> logits;  // Scratch, reused across calls on each thread.
    attend(problem, block, logits);
  });
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
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
