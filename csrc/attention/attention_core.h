// Attention row helpers and Philox4x32-10 dropout: the torch-free part of the CPU attention kernel.
//
// Implements the dropout specification of lub_fast/ops/attention.py (module docstring) bit for bit:
// key j of query row i (its position in the full sequence) of stream c2 = b * H + h is kept when word j & 3 of
// Philox4x32_10((j >> 2, i, c2, offset), (seed & 0xFFFFFFFF, seed >> 32)) is below
// floor((1 - dropout_p) * 2**32). Philox4x32-10 is from Salmon, Moraes, Dror and Shaw, "Parallel
// Random Numbers: As Easy as 1, 2, 3" (SC'11), as in Random123 and cuRAND; the generator is the
// host/device one of csrc/common/philox.h that the CUDA kernel also uses. The functions below work
// in place on the rows of a task's [m, L] score block (softmax, probability recompute, fused
// dropout, dS); csrc/attention/attention.cpp does the matrix products with ATen and calls these.
//
// fp32 rows use a Cephes-style exp (relative error 8e-8 at most on [-87.3, 0.7], 0 below -87.33)
// written so that the compiler vectorises it; fp64 rows use std::exp. The exported functions are
// compiled for AVX-512, AVX2 and baseline x86-64 (target_clones, picked at load time) on x86-64
// ELF targets with GCC or Clang, once elsewhere.
//
// Compiled into the Python extension (with attention.cpp) and into the CMake test build.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/philox.h"

namespace lub_fast {
namespace attention {

// Dropout of one (sequence, head) stream: the key and counter words shared by all its rows.
struct Dropout {
  uint32_t k0;         // seed & 0xFFFFFFFF
  uint32_t k1;         // seed >> 32
  uint32_t stream;     // c2 = b * H + h
  uint32_t offset;     // c3
  uint64_t threshold;  // philox::keep_threshold(dropout_p)
  double factor;       // 1 / (1 - dropout_p), rounded to the row type where applied
};

// keep(b, h, i, j) for one key: the scalar form of the specification.
inline bool keep(const Dropout& d, uint32_t row, uint32_t col) {
  const philox::Words r = philox::philox4x32_10(col >> 2, row, d.stream, d.offset, d.k0, d.k1);
  return r.w[col & 3] < d.threshold;
}

// exp for fp32 rows (Cephes expf: 2**n times a degree-7 polynomial on [-ln2/2, ln2/2]); 0 below
// -87.33 (where expf turns subnormal), arguments above 88.37 clamped. Relative error <= 2e-7
// (csrc/tests/test_philox.cpp).
inline float exp_f32(float x) {
  constexpr float kLo = -87.33654f;
  constexpr float kHi = 88.37626f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: adding it rounds |v| < 2**22 to an integer
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float fx = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < kLo ? 0.0f : y * two_n;
}

// Forward softmax of one row of scaled scores s[0:n] (n >= 1), in place: s <- exp(s - lse).
// Returns lse = max + log(sum(exp(s - max))).
float softmax_row(float* s, int64_t n);
double softmax_row(double* s, int64_t n);

// Backward recompute of one row, in place: s <- exp(s - lse).
void probs_row(float* s, int64_t n, float lse);
void probs_row(double* s, int64_t n, double lse);

// Fused dropout of a contiguous [rows, n] block, in place, row r drawing the mask of query row
// row_ids[r] (the counter word c1): x[r, j] <- keep(row_ids[r], j) ? x[r, j] * factor : 0, one
// Philox call per four keys (callers skip dropout_p = 0; a threshold of 2**32 keeps every key).
void dropout_rows(float* x, int64_t rows, int64_t n, const uint32_t* row_ids, const Dropout& d);
void dropout_rows(double* x, int64_t rows, int64_t n, const uint32_t* row_ids, const Dropout& d);

// The same keep decisions applied to two blocks in one pass (the backward's PD and dP):
// pd <- keep ? p * factor : 0 and dpd <- keep ? dpd * factor : 0.
void dropout_rows(const float* p, float* pd, float* dpd, int64_t rows, int64_t n,
                  const uint32_t* row_ids, const Dropout& d);
void dropout_rows(const double* p, double* pd, double* dpd, int64_t rows, int64_t n,
                  const uint32_t* row_ids, const Dropout& d);

// dS of one row, in place: p[j] <- p[j] * (dp[j] - drow).
void ds_row(float* p, const float* dp, int64_t n, float drow);
void ds_row(double* p, const double* dp, int64_t n, double drow);

// <a, b> over n entries, accumulated in the element type.
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

}  // namespace attention
}  // namespace lub_fast
