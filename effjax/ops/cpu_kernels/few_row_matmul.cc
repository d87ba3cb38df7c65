// Few-row float32 matmul on CPU as an XLA FFI custom call: out[M, N] = x[M, K] @ W.
//
// Why: a decode step multiplies a handful of rows (batch x new tokens) by every weight matrix.
// There XLA:CPU takes 1.5-2.4x as long as torch (RESULTS.md, "Where the time goes": 72 us vs 30 us
// at [5, 256] x [256, 768]); the step is a stream over the weights, and this kernel reads each
// weight panel once for up to kMaxRows rows whose accumulators stay in registers.
//
// Operands:   x [M, K];  w [K, N] ("nn", a Dense kernel) or [N, K] ("nt", a tied embedding)
// Attributes: transpose_w (bool): w is [N, K]
//             stream (bool): read each block of kKBlock weight rows once, wide, for the first
//               rows, then reuse it from L1 for the others while prefetching the next block
//               (pays off for weights from DRAM, and for packed weights: 5-12% at 5-33 rows of
//               lm/small's shapes, RESULTS.md)
//             packed (bool, "nn" only): w holds the K x N elements panel by panel (`kPanel`
//               columns each, the last one N % kPanel): panel j is a row-major [K, width] block
//               at offset j * kPanel * K (effjax.ops.few_row_matmul.pack). A tile then reads its
//               panel front to back instead of pieces of weight rows N floats apart: 1.05-1.22x
//               faster generation when the weights stream from DRAM (RESULTS.md).
// Result:     out [M, N]
//
// Exactness contract (speculative and Medusa decoding compare their outputs with plain greedy
// decoding bit for bit): every output element is computed by the same sequence of float
// operations whatever M, the row's position in the batch, or the panel it falls in - "nn": one
// fused multiply-add per k, in k order, from zero; "nt": per-lane fused multiply-adds over k in
// steps of kLanes, then one fixed horizontal sum. Built without -ffast-math so the compiler cannot
// reassociate them.
#include <algorithm>
#include <cstdint>

#include "few_row_matmul.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error FewRowMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, bool transpose_w, bool stream, bool packed,
                            ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[transpose_w ? 1 : 0]) {
    return ffi::Error::InvalidArgument(
        "effjax_few_row_matmul: x must be [M, K] and w [K, N] (or [N, K] with transpose_w)");
  }
  if (packed && transpose_w) {
    return ffi::Error::InvalidArgument(
        "effjax_few_row_matmul: packed weights are [K, N] panels; transpose_w must be false");
  }
  const int64_t n = wd[transpose_w ? 0 : 1];
  const Problem problem{x.typed_data(), w.typed_data(), out->typed_data(), xd[0], xd[1], n,
                        packed};
  const int64_t unit = transpose_w ? kDotUnit : kUnit;  // Columns per work unit.
  // Below ~64K multiply-adds the work is a few microseconds: waking helpers would cost more.
  const bool use_helpers = xd[0] * xd[1] * n >= (int64_t{1} << 16);
  effjax::parallel_for(pool, (n + unit - 1) / unit, use_helpers,
                       [problem, transpose_w, stream](int64_t i) {
                         if (transpose_w) nt_unit(problem, i);
                         else nn_unit(problem, i, stream);
                       });
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
