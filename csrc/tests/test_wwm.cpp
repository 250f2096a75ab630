// ctest program for csrc/wwm/wwm_core.cpp: RNG values pinned against SplitMix64 and the Python
// reference, a pinned example per mode, and the masking invariants on random batches (budget,
// whole units, one action per unit, specials untouched, independence from the row position).
// Exits non-zero on the first failed check.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "tests/check.h"
#include "wwm/wwm_core.h"

using lub_fast::wwm::Mode;
using lub_fast::wwm::Params;
using lub_fast::wwm::Span;

namespace {

void test_rng_values() {
  using lub_fast::wwm::draw;
  using lub_fast::wwm::example_key;
  using lub_fast::wwm::kGoldenGamma;
  using lub_fast::wwm::mix64;
  // The first two outputs of SplitMix64 seeded with 0 (Vigna's reference splitmix64.c).
  CHECK(mix64(kGoldenGamma) == 0xE220A8397B1DCDAFull);
  CHECK(mix64(2 * kGoldenGamma) == 0x6E789E6AA1B965F4ull);
  // Values of lub_fast.ops.wwm.example_key / draw.
  const uint64_t key = example_key(1, 2, 3);
  CHECK(key == 0x8C0787532652D85Eull);
  CHECK(draw(key, 1, 5) == 0x90E7A52F381D3F29ull);
  CHECK(example_key(static_cast<uint64_t>(-1), 0, 0) == 0x9E72686BF0087EC3ull);
}

// The example of tests/ops/test_wwm.py::test_wwm_mask_pinned_example, same expected outputs.
void test_pinned_example() {
  const int64_t T = 20;
  std::vector<int64_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = 100 + t;
  const bool starts[T] = {1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1};
  bool maskable[T];
  for (int64_t t = 0; t < T; ++t) maskable[t] = !(t == 0 || t == 10 || t == 19);
  const int64_t index = 42;
  const std::vector<std::vector<int64_t>> want_out = {
      {100, 3, 102, 103, 104, 3, 106, 3, 3, 109, 110, 111, 112, 3, 114, 115, 116, 3, 3, 119},
      {100, 3, 3, 103, 104, 105, 3, 3, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 3, 119},
      {100, 3, 3, 3, 3, 3, 106, 3, 3, 3, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119}};
  const std::vector<std::vector<int64_t>> want_labels = {
      {-100, 101, -100, 103, -100, 105, -100, 107, 108, -100,
       -100, -100, -100, 113, -100, -100, -100, 117, 118, -100},
      {-100, 101, 102, 103, 104, 105, 106, 107, -100, -100,
       -100, -100, -100, -100, -100, -100, -100, -100, 118, -100},
      {-100, 101, 102, 103, 104, 105, -100, 107, 108, 109,
       -100, -100, -100, -100, -100, -100, -100, -100, -100, -100}};
  const Mode modes[3] = {Mode::kToken, Mode::kWholeWord, Mode::kNgram};
  for (int m = 0; m < 3; ++m) {
    Params p;
    p.seed = 7;
    p.epoch = 1;
    p.mode = modes[m];
    p.rate = 0.5;
    p.max_predictions = 100;
    p.mask_token_id = 3;
    p.random_low = 10;
    p.random_high = 50;
    std::vector<int64_t> out(T), labels(T);
    lub_fast::wwm::mask_rows(ids.data(), starts, maskable, &index, 0, 1, T, p, out.data(),
                             labels.data());
    CHECK(out == want_out[m]);
    CHECK(labels == want_labels[m]);
  }
}

struct Batch {
  int64_t B, T;
  std::vector<int64_t> ids, index;
  std::vector<char> starts, maskable;  // char, not vector<bool>, for contiguous bool storage
};

Batch random_batch(std::mt19937_64& gen, int64_t B, int64_t T) {
  Batch batch{B, T, std::vector<int64_t>(B * T), std::vector<int64_t>(B),
              std::vector<char>(B * T), std::vector<char>(B * T)};
  std::uniform_int_distribution<int64_t> id(10, 999);
  std::uniform_int_distribution<int64_t> length(0, T);
  std::bernoulli_distribution start(0.6), special(0.03);
  for (int64_t b = 0; b < B; ++b) {
    batch.index[b] = static_cast<int64_t>(gen() >> 1);
    const int64_t n = length(gen);  // row length before padding; 0 gives an empty row
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      batch.ids[i] = id(gen);
      batch.starts[i] = start(gen);
      batch.maskable[i] = t > 0 && t < n - 1 && !special(gen);
    }
  }
  return batch;
}

// Masks the batch and checks every invariant of the specification, row by row.
void check_invariants(const Batch& batch, const Params& p) {
  const int64_t B = batch.B, T = batch.T;
  const bool* starts = reinterpret_cast<const bool*>(batch.starts.data());
  const bool* maskable = reinterpret_cast<const bool*>(batch.maskable.data());
  std::vector<int64_t> out(B * T), labels(B * T);
  lub_fast::wwm::mask_rows(batch.ids.data(), starts, maskable, batch.index.data(), 0, B, T, p,
                           out.data(), labels.data());
  std::vector<Span> scratch(T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * T;
    int64_t n_maskable = 0, chosen = 0;
    for (int64_t t = 0; t < T; ++t) {
      n_maskable += maskable[o + t];
      const bool is_chosen = labels[o + t] != lub_fast::wwm::kIgnoreIndex;
      chosen += is_chosen;
      if (is_chosen) {
        CHECK(maskable[o + t]);
        CHECK(labels[o + t] == batch.ids[o + t]);
        const int64_t v = out[o + t];
        CHECK(v == p.mask_token_id || v == batch.ids[o + t] ||
              (v >= p.random_low && v < p.random_high));
      } else {
        CHECK(out[o + t] == batch.ids[o + t]);
      }
    }
    const int64_t budget = std::min<int64_t>(
        static_cast<int64_t>(std::nearbyint(p.rate * static_cast<double>(n_maskable))),
        p.max_predictions);
    CHECK(chosen <= budget);
    if (p.mode == Mode::kToken) CHECK(chosen == budget);
    // Words: chosen entirely or not at all.
    if (p.mode != Mode::kToken) {
      for (int64_t t = 1; t < T; ++t) {
        const bool continuation = maskable[o + t] && maskable[o + t - 1] && !starts[o + t];
        if (continuation) {
          CHECK((labels[o + t] != lub_fast::wwm::kIgnoreIndex) ==
                (labels[o + t - 1] != lub_fast::wwm::kIgnoreIndex));
        }
      }
    }
    // Whole-word mode: [MASK] and random ids never mix inside one word.
    if (p.mode == Mode::kWholeWord) {
      for (int64_t t = 1; t < T; ++t) {
        const bool continuation = maskable[o + t] && maskable[o + t - 1] && !starts[o + t];
        if (continuation && labels[o + t] != lub_fast::wwm::kIgnoreIndex) {
          CHECK((out[o + t] == p.mask_token_id) == (out[o + t - 1] == p.mask_token_id));
        }
      }
    }
    // The same row alone, at position 0 of a batch of one, gives the same output.
    std::vector<int64_t> alone(T), alone_labels(T);
    lub_fast::wwm::mask_rows(batch.ids.data() + o, starts + o, maskable + o, &batch.index[b], 0, 1,
                             T, p, alone.data(), alone_labels.data());
    for (int64_t t = 0; t < T; ++t) {
      CHECK(alone[t] == out[o + t]);
      CHECK(alone_labels[t] == labels[o + t]);
    }
  }
}

void test_invariants_random() {
  std::mt19937_64 gen(20261125);
  const Mode modes[3] = {Mode::kToken, Mode::kWholeWord, Mode::kNgram};
  const int64_t lengths[4] = {1, 2, 97, 513};
  const double rates[4] = {0.0, 0.15, 0.5, 1.0};
  for (const Mode mode : modes) {
    for (const int64_t T : lengths) {
      for (const double rate : rates) {
        Params p;
        p.seed = gen();
        p.epoch = gen() % 10;
        p.mode = mode;
        p.rate = rate;
        p.max_predictions = (T > 2) ? T / 3 : T;
        p.mask_token_id = 4;
        p.random_low = 5;
        p.random_high = 1000;
        check_invariants(random_batch(gen, 17, T), p);
      }
    }
  }
}

// rate = 1 without a cap in token mode takes every maskable token.
void test_full_rate_takes_all() {
  std::mt19937_64 gen(7);
  const Batch batch = random_batch(gen, 8, 64);
  Params p;
  p.mode = Mode::kToken;
  p.rate = 1.0;
  p.max_predictions = 64;
  p.mask_token_id = 4;
  p.random_low = 5;
  p.random_high = 1000;
  std::vector<int64_t> out(8 * 64), labels(8 * 64);
  lub_fast::wwm::mask_rows(batch.ids.data(), reinterpret_cast<const bool*>(batch.starts.data()),
                           reinterpret_cast<const bool*>(batch.maskable.data()), batch.index.data(),
                           0, 8, 64, p, out.data(), labels.data());
  for (int64_t i = 0; i < 8 * 64; ++i) {
    CHECK((labels[i] != lub_fast::wwm::kIgnoreIndex) == static_cast<bool>(batch.maskable[i]));
  }
}

}  // namespace

int main() {
  test_rng_values();
  test_pinned_example();
  test_invariants_random();
  test_full_rate_takes_all();
  std::printf("test_wwm: all checks passed\n");
  return 0;
}
