// ctest program for csrc/attention/attention_core.cpp: the Philox4x32-10 it uses
// (csrc/common/philox.h) against the Random123 known-answer vectors, the keep threshold of
// lub_fast/ops/_philox.py, the block dropout functions against the scalar keep(b, h, i, j) of the
// specification (short rows, rows longer than one Philox block, a threshold of 2**32), and the
// fp32 exp and softmax rows against double precision.
// Exits non-zero on the first failed check.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention/attention_core.h"
#include "tests/check.h"

using lub_fast::attention::Dropout;

namespace {

// Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
void test_known_answers() {
  struct Vector {
    uint32_t counter[4], key[2], expected[4];
  };
  const Vector vectors[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5u, 0xE169C58Du, 0xBC57AC4Cu, 0x9B00DBD8u}},
      {{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu},
       {0xFFFFFFFFu, 0xFFFFFFFFu},
       {0x408F276Du, 0x41C83B0Eu, 0xA20BC7C6u, 0x6D5451FDu}},
      {{0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u},
       {0xA4093822u, 0x299F31D0u},
       {0xD16CFE09u, 0x94FDCCEBu, 0x5001E420u, 0x24126EA1u}},
  };
  for (const Vector& v : vectors) {
    const lub_fast::philox::Words r = lub_fast::philox::philox4x32_10(
        v.counter[0], v.counter[1], v.counter[2], v.counter[3], v.key[0], v.key[1]);
    for (int w = 0; w < 4; ++w) {
      if (r.w[w] != v.expected[w]) {
        std::fprintf(stderr, "philox word %d: got 0x%08X, want 0x%08X\n", w, r.w[w], v.expected[w]);
      }
      CHECK(r.w[w] == v.expected[w]);
    }
  }
}

void test_keep_threshold() {
  using lub_fast::philox::keep_threshold;
  CHECK(keep_threshold(0.0) == (uint64_t{1} << 32));
  CHECK(keep_threshold(0.5) == (uint64_t{1} << 31));
  CHECK(keep_threshold(0.1) == 3865470566ull);  // int(0.9 * 4294967296.0) in Python
}

Dropout make_dropout(uint64_t seed, uint32_t stream, uint32_t offset, double p) {
  Dropout d;
  d.k0 = static_cast<uint32_t>(seed);
  d.k1 = static_cast<uint32_t>(seed >> 32);
  d.stream = stream;
  d.offset = offset;
  d.threshold = lub_fast::philox::keep_threshold(p);
  d.factor = 1.0 / (1.0 - p);
  return d;
}

// dropout_rows (both forms) against keep() key by key; rows * n spans several Philox blocks, and
// the row ids are out of order with gaps (a sparse layer's query positions).
void test_dropout_rows_match_scalar_keep() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {7, 97}, {2, 1030}, {128, 128}, {5, 4}};
  for (double p : {0.1, 0.5, 1e-12}) {
    for (const auto& shape : shapes) {
      const int64_t rows = shape[0], n = shape[1];
      const Dropout d = make_dropout(0x123456789ABCDEFull, 41, 9, p);
      std::vector<uint32_t> row_ids(rows);
      for (int64_t r = 0; r < rows; ++r) row_ids[r] = static_cast<uint32_t>((r * 37 + 3) % 1021);
      std::vector<float> x(rows * n), p_in(rows * n), pd(rows * n), dpd(rows * n);
      for (int64_t j = 0; j < rows * n; ++j) {
        x[j] = uniform(gen);
        p_in[j] = x[j];
        dpd[j] = uniform(gen);
      }
      const std::vector<float> dpd_in = dpd;
      lub_fast::attention::dropout_rows(x.data(), rows, n, row_ids.data(), d);
      lub_fast::attention::dropout_rows(p_in.data(), pd.data(), dpd.data(), rows, n, row_ids.data(), d);
      const float factor = static_cast<float>(d.factor);
      int64_t kept = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t o = r * n + j;
          const bool keep = lub_fast::attention::keep(d, row_ids[r], static_cast<uint32_t>(j));
          kept += keep;
          CHECK(x[o] == (keep ? p_in[o] * factor : 0.0f));
          CHECK(pd[o] == x[o]);
          CHECK(dpd[o] == (keep ? dpd_in[o] * factor : 0.0f));
        }
      }
      if (p == 1e-12) CHECK(kept == rows * n);  // threshold 2**32: every key is kept
    }
  }
}

// keep rate over 128 rows x 1024 keys (131,072 keys) is 1 - p within 0.01.
void test_keep_rate() {
  const int64_t rows = 128, n = 1024;
  for (double p : {0.1, 0.5}) {
    const Dropout d = make_dropout(2024, 5, 3, p);
    std::vector<double> x(rows * n, 1.0);
    std::vector<uint32_t> row_ids(rows);
    for (int64_t r = 0; r < rows; ++r) row_ids[r] = static_cast<uint32_t>(r);
    lub_fast::attention::dropout_rows(x.data(), rows, n, row_ids.data(), d);
    int64_t kept = 0;
    for (double value : x) kept += value != 0.0;
    const double rate = static_cast<double>(kept) / static_cast<double>(rows * n);
    if (std::fabs(rate - (1.0 - p)) >= 0.01) std::fprintf(stderr, "p=%g: keep rate %f\n", p, rate);
    CHECK(std::fabs(rate - (1.0 - p)) < 0.01);
  }
}

void test_exp_f32() {
  using lub_fast::attention::exp_f32;
  double worst = 0.0;
  for (int64_t i = 0; i <= 2000000; ++i) {
    const float x = -87.3f + 88.0f * static_cast<float>(i) / 2000000.0f;
    const double want = std::exp(static_cast<double>(x));
    worst = std::fmax(worst, std::fabs(exp_f32(x) - want) / want);
  }
  if (worst > 2e-7) std::fprintf(stderr, "exp_f32: max relative error %g\n", worst);
  CHECK(worst <= 2e-7);
  CHECK(exp_f32(0.0f) == 1.0f);
  CHECK(exp_f32(-88.0f) == 0.0f);
  CHECK(exp_f32(-INFINITY) == 0.0f);
  CHECK(std::isfinite(exp_f32(1000.0f)));
}

void test_softmax_row() {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int64_t n : {1, 2, 15, 16, 17, 97, 128, 513}) {
    std::vector<float> s(n), fwd(n), bwd(n);
    for (float& value : s) value = normal(gen);
    double m = s[0];
    for (float value : s) m = std::fmax(m, value);
    double sum = 0.0;
    for (float value : s) sum += std::exp(value - m);
    const double lse = m + std::log(sum);
    fwd = s;
    const float got = lub_fast::attention::softmax_row(fwd.data(), n);
    CHECK(std::fabs(got - lse) <= 1e-6 * std::fmax(1.0, std::fabs(lse)));
    bwd = s;
    lub_fast::attention::probs_row(bwd.data(), n, got);
    for (int64_t j = 0; j < n; ++j) {
      const double want = std::exp(s[j] - lse);
      CHECK(std::fabs(fwd[j] - want) <= 1e-6 * want + 1e-12);
      CHECK(std::fabs(bwd[j] - want) <= 1e-6 * want + 1e-12);
    }
  }
}

}  // namespace

int main() {
  test_known_answers();
  test_keep_threshold();
  test_dropout_rows_match_scalar_keep();
  test_keep_rate();
  test_exp_f32();
  test_softmax_row();
  std::printf("test_philox: all checks passed\n");
  return 0;
}
