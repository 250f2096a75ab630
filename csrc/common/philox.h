// Philox4x32-10 as a host/device function: the counter-based generator of lub_fast's attention
// dropout (lub_fast/ops/_philox.py is the PyTorch reference, lub_fast/ops/attention.py states the
// dropout contract). Philox is from Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers: As
// Easy as 1, 2, 3" (SC'11), as in Random123 and cuRAND's curand_Philox4x32_10.
//
// Torch-free and CUDA-optional: plain C++ compilers see inline host functions (the CMake test
// csrc/tests/test_philox.cpp checks them against the Python generator's outputs), nvcc sees
// __host__ __device__ functions that use __umulhi on the device.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace lub_fast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w[4];
};

LUB_FAST_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1).
LUB_FAST_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                       uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t hi0 = mulhi(kM0, c0);
    const uint32_t lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi(kM1, c2);
    const uint32_t lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;  // the bump after the last round is unused
    k1 += kW1;
  }
  return Words{{c0, c1, c2, c3}};
}

// Bit w (w = 0..3) set when word w is below `threshold`: keep(b, h, i, 4 * c0 + w) of one call.
LUB_FAST_HD uint32_t keep_bits(const Words& r, uint32_t threshold) {
  return static_cast<uint32_t>(r.w[0] < threshold) | (static_cast<uint32_t>(r.w[1] < threshold) << 1) |
         (static_cast<uint32_t>(r.w[2] < threshold) << 2) |
         (static_cast<uint32_t>(r.w[3] < threshold) << 3);
}

// floor((1 - p) * 2**32) in IEEE double: a word r is kept when r < threshold (2**32 for p = 0).
inline uint64_t keep_threshold(double p) { return static_cast<uint64_t>((1.0 - p) * 4294967296.0); }

}  // namespace philox
}  // namespace lub_fast
