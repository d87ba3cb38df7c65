// bfloat16 <-> float32 for effjax's CPU kernels, which take bfloat16 operands as their bits
// (uint16_t, XLA FFI's native type for BF16) and compute in float32.
#ifndef EFFJAX_BFLOAT16_H_
#define EFFJAX_BFLOAT16_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace effjax {

// Exact: a bfloat16 is the top half of the float32 with the same value.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Round to nearest, ties to even (as XLA converts); NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// A bfloat16 operand widened into float32 scratch (resized to n): the kernels compute in float32.
inline const float* widen(const uint16_t* src, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = bf16_to_float(src[i]);
  return scratch.data();
}

// A float32 result rounded into a bfloat16 operand, element by element.
inline void narrow(const std::vector<float>& src, uint16_t* dst) {
  for (size_t i = 0; i < src.size(); ++i) dst[i] = float_to_bf16(src[i]);
}

}  // namespace effjax

#endif  // EFFJAX_BFLOAT16_H_
