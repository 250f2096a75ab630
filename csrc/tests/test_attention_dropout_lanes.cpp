// ctest program for csrc/attention/attention_dropout.h: simulates one warp of the CUDA attention
// kernels' dropout (each lane's Philox call, the shuffles, the bit selection) on the host and checks
// every accumulator element's keep bit against the scalar specification keep(b, h, i, j) of
// lub_fast/ops/attention.py, for the forward tile (rows = queries, columns = keys) and the backward
// tile (rows = keys, columns = queries), at several tile origins. Needs no GPU.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "attention/attention_dropout.h"
#include "common/philox.h"

namespace {

namespace ac = lub_fast::attention_cuda;
namespace ph = lub_fast::philox;

constexpr uint32_t kSeedLo = 0x9ABCDEF0u, kSeedHi = 0x12345u, kStream = 29, kOffset = 7;

uint32_t keep_spec(uint32_t row, uint32_t col, uint32_t threshold) {
  const ph::Words w = ph::philox4x32_10(col >> 2, row, kStream, kOffset, kSeedLo, kSeedHi);
  return w.w[col & 3] < threshold ? 1u : 0u;
}

uint32_t nibble(uint32_t group, uint32_t row, uint32_t threshold) {
  return ph::keep_bits(ph::philox4x32_10(group, row, kStream, kOffset, kSeedLo, kSeedHi), threshold);
}

int failures = 0;

void expect(bool ok, const char* what, int lane, int e, uint32_t a, uint32_t b) {
  if (!ok && ++failures <= 10) {
    std::fprintf(stderr, "%s: lane %d element %d: got %u, spec %u\n", what, lane, e, a, b);
  }
}

// Forward: the warp's 16 query rows start at m0, the 8-key tile at n0 (n0 % 8 == 0).
void check_forward(uint32_t m0, uint32_t n0, uint32_t threshold) {
  uint32_t bits[32];
  for (int lane = 0; lane < 32; ++lane) {
    const ac::Draw d = ac::fwd_draw(lane);
    bits[lane] = nibble(n0 / 4 + d.group, m0 + d.query, threshold);
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 4; ++e) {
      const uint32_t row = m0 + lane / 4 + 8 * (e / 2);
      const uint32_t col = n0 + 2 * (lane % 4) + (e & 1);
      const uint32_t got = ac::fwd_keep(lane, e, bits[lane], bits[lane ^ 1]);
      const uint32_t want = keep_spec(row, col, threshold);
      expect(got == want, "forward", lane, e, got, want);
    }
  }
}

// Backward: the warp's 16 key rows start at k0 (k0 % 16 == 0), the 8-query tile at q0.
void check_backward(uint32_t k0, uint32_t q0, uint32_t threshold) {
  uint32_t bits[32];
  for (int lane = 0; lane < 32; ++lane) {
    const ac::Draw d = ac::bwd_draw(lane);
    bits[lane] = nibble(k0 / 4 + d.group, q0 + d.query, threshold);
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 4; ++e) {
      const uint32_t key = k0 + lane / 4 + 8 * (e / 2);
      const uint32_t query = q0 + 2 * (lane % 4) + (e & 1);
      const int src = ac::bwd_source(lane, e);
      const uint32_t got = ac::bwd_keep(lane, bits[src]);
      const uint32_t want = keep_spec(query, key, threshold);
      expect(src >= 0 && src < 32 && got == want, "backward", lane, e, got, want);
    }
  }
}

}  // namespace

int main() {
  for (double p : {0.1, 0.5, 0.9}) {
    const uint32_t threshold = static_cast<uint32_t>(ph::keep_threshold(p));
    for (uint32_t a : {0u, 16u, 48u, 496u}) {
      for (uint32_t b : {0u, 8u, 64u, 504u}) {
        check_forward(a, b, threshold);
        check_backward(a, b, threshold);
      }
    }
  }
  if (failures != 0) {
    std::fprintf(stderr, "%d keep bits differ from the specification\n", failures);
    return 1;
  }
  std::printf("attention dropout lane mapping: all keep bits match the specification\n");
  return 0;
}
