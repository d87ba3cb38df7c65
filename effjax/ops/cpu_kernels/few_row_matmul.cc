// Few-row float32 (or bfloat16) matmul on CPU as an XLA FFI custom call: out = x[M, K] @ W.
//
// Why: a decode step multiplies a handful of rows (batch x new tokens) by every weight matrix.
// There XLA:CPU takes 1.5-2.4x as long as torch (RESULTS.md, "Where the time goes": 72 us vs 30 us
// at [5, 256] x [256, 768]); the step is a stream over the weights, and this kernel reads each
// weight panel once for up to kMaxRows rows whose accumulators stay in registers.
//
// Operands:   x [M, K];  w [K, N] ("nn", a Dense kernel) or [N, K] ("nt", a tied embedding)
// Attributes: transpose_w (bool): w is [N, K]
//             stream (bool): read each block of weight rows (kKBlock; kKBlockFewRows for up
//               to kFewRows rows) once, wide, for the first rows, then reuse it from L1 for
//               the others while prefetching the next block
//               (pays off for weights from DRAM, and for packed weights: 5-12% at 5-33 rows of
//               lm/small's shapes, RESULTS.md)
//             packed (bool, "nn" only): w holds the K x N elements panel by panel (`kPanel`
//               columns each, the last one N % kPanel): panel j is a row-major [K, width] block
//               at offset j * kPanel * K (effjax.ops.few_row_matmul.pack). A tile then reads its
//               panel front to back instead of pieces of weight rows N floats apart: 1.05-1.22x
//               faster generation when the weights stream from DRAM (RESULTS.md).
// Result:     out [M, N]
//
// Two handlers: EffjaxFewRowMatmul (float32 x, w, out) and EffjaxFewRowMatmulBf16 (bfloat16 x, w,
// out - a bfloat16 model's cached calls). The bfloat16 one widens x to float32 once, the weights as
// it loads them (exactly), accumulates in float32 like the float32 kernel, and rounds each output
// to the nearest bfloat16 (ties to even), as XLA:CPU's bfloat16 dot does with its float32
// accumulation: the same values up to the order of the sums. It reads half the weight bytes.
//
// Exactness contract (speculative and Medusa decoding compare their outputs with plain greedy
// decoding bit for bit): every output element is computed by the same sequence of float
// operations whatever M, the row's position in the batch, or the panel it falls in - "nn": one
// fused multiply-add per k, in k order, from zero; "nt": per-lane fused multiply-adds over k in
// steps of kLanes, then one fixed horizontal sum. Built without -ffast-math so the compiler cannot
// reassociate them.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "bfloat16.h"
#include "few_row_matmul.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs problem p (whose x and out are float32) over XLA's intra-op threads.
template <typename W>
void run(ffi::ThreadPool& pool, const ProblemT<W>& problem, bool transpose_w, bool stream) {
  const int64_t unit = transpose_w ? kDotUnit : kUnit;  // Columns per work unit.
  // Below ~64K multiply-adds the work is a few microseconds: waking helpers would cost more.
  const bool use_helpers = problem.m * problem.k * problem.n >= (int64_t{1} << 16);
  effjax::parallel_for(pool, (problem.n + unit - 1) / unit, use_helpers,
                       [problem, transpose_w, stream](int64_t i) {
                         if (transpose_w) nt_unit(problem, i);
                         else nn_unit(problem, i, stream);
                       });
}

// Why the operand shapes or flags cannot be served (empty: they can); n is set to N.
template <typename Dims>
const char* check_shapes(const Dims& xd, const Dims& wd, bool transpose_w, bool packed,
                         int64_t& n) {
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[transpose_w ? 1 : 0]) {
    return "effjax_few_row_matmul: x must be [M, K] and w [K, N] (or [N, K] with transpose_w)";
  }
  if (packed && transpose_w) {
    return "effjax_few_row_matmul: packed weights are [K, N] panels; transpose_w must be false";
  }
  n = wd[transpose_w ? 0 : 1];
  return "";
}

ffi::Error FewRowMatmulBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                ffi::Buffer<ffi::BF16> w, bool transpose_w, bool stream,
                                bool packed, ffi::ResultBuffer<ffi::BF16> out) {
  int64_t n = 0;
  const char* error = check_shapes(x.dimensions(), w.dimensions(), transpose_w, packed, n);
  if (*error) return ffi::Error::InvalidArgument(error);
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  thread_local std::vector<float> x32, out32;  // Scratch, reused across calls on each thread.
  out32.resize(m * n);
  run(pool,
      ProblemT<uint16_t>{effjax::widen(x.typed_data(), m * k, x32), w.typed_data(), out32.data(),
                         m, k, n, packed},
      transpose_w, stream);
  effjax::narrow(out32, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error FewRowMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, bool transpose_w, bool stream, bool packed,
                            ffi::ResultBuffer<ffi::F32> out) {
  int64_t n = 0;
  const char* error = check_shapes(x.dimensions(), w.dimensions(), transpose_w, packed, n);
  if (*error) return ffi::Error::InvalidArgument(error);
  run(pool, Problem{x.typed_data(), w.typed_data(), out->typed_data(), x.dimensions()[0],
                    x.dimensions()[1], n, packed},
      transpose_w, stream);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxFewRowMatmul, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_w")
                                  .Attr<bool>("stream")
                                  .Attr<bool>("packed")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxFewRowMatmulBf16, FewRowMatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("transpose_w")
                                  .Attr<bool>("stream")
                                  .Attr<bool>("packed")
                                  .Ret<ffi::Buffer<ffi::BF16>>());
