// exp for the softmaxes of effjax's CPU kernels (decode_attention.cc, fused_lm_step.cc).
#ifndef EFFJAX_EXP_NONPOSITIVE_H_
#define EFFJAX_EXP_NONPOSITIVE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace

#endif  // EFFJAX_EXP_NONPOSITIVE_H_
