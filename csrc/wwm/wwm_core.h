// Whole-word / n-gram / token masking for MLM pretraining: the torch-free CPU algorithm.
//
// Implements exactly the specification in lub_fast/ops/wwm.py (wwm_mask_ref): words from
// word-start flags restricted to maskable tokens, units (a word, a token, or 1-3 consecutive words
// with p(n) proportional to 1/n), budget = min(round_half_even(rate * maskable), max_predictions),
// a lazily drawn Fisher-Yates order in which a unit is taken only when it fits what remains of the
// budget, and one 80/10/10 action per unit. Random numbers are SplitMix64 outputs addressed by
// (key, stream, counter), the key a hash of (seed, epoch, example index), so every example is
// independent of batch and thread.
//
// Compiled into the Python extension (with csrc/wwm/wwm.cpp) and into the CMake test build.
#pragma once

#include <cstdint>

namespace lub_fast {
namespace wwm {

constexpr int64_t kIgnoreIndex = -100;
constexpr int kMaxNgram = 3;

constexpr uint64_t kSeedSalt = 0x6A09E667F3BCC908ull;
constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

// Streams of an example's random numbers; the counter is given next to each.
constexpr uint64_t kStreamNgram = 0;    // token position of the first word of an n-gram unit
constexpr uint64_t kStreamOrder = 1;    // Fisher-Yates step
constexpr uint64_t kStreamAction = 2;   // token position of the first token of a taken unit
constexpr uint64_t kStreamReplace = 3;  // token position of a randomly replaced token

// uint32 thresholds of the n-gram length draw (weights 6 : 3 : 2 for n = 1, 2, 3).
constexpr uint64_t kNgram3T1 = (uint64_t{6} << 32) / 11;
constexpr uint64_t kNgram3T2 = (uint64_t{9} << 32) / 11;
constexpr uint64_t kNgram2T1 = (uint64_t{6} << 32) / 9;

enum class Mode : int32_t { kToken = 0, kWholeWord = 1, kNgram = 2 };

struct Params {
  uint64_t seed = 0;
  uint64_t epoch = 0;
  Mode mode = Mode::kWholeWord;
  double rate = 0.15;
  int64_t max_predictions = 0;
  int64_t mask_token_id = 0;
  int64_t random_low = 0;   // random replacement ids are uniform in [random_low, random_high)
  int64_t random_high = 1;
};

// SplitMix64's output function (Steele, Lea, Flood, OOPSLA 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t example_key(uint64_t seed, uint64_t epoch, uint64_t index) {
  return mix64(mix64(mix64(seed ^ kSeedSalt) ^ epoch) ^ index);
}

inline uint64_t draw(uint64_t key, uint64_t stream, uint64_t counter) {
  return mix64(key + ((stream << 32) + counter + 1) * kGoldenGamma);
}

// Uniform in [0, n) for n < 2**32: the high 32 bits of r times n, shifted down.
inline uint64_t below(uint64_t r, uint64_t n) { return ((r >> 32) * n) >> 32; }

// A word or unit: its first token and token count.
struct Span {
  int32_t start;
  int32_t length;
};

// Masks one example of T tokens. out and labels receive T values each; scratch holds >= T spans.
// Returns the number of tokens chosen.
int64_t mask_example(const int64_t* ids, const bool* word_start, const bool* maskable, int64_t T,
                     uint64_t key, const Params& params, int64_t* out, int64_t* labels,
                     Span* scratch);

// Masks rows [row_begin, row_end) of a contiguous [B, T] batch; example_index has B entries.
void mask_rows(const int64_t* ids, const bool* word_start, const bool* maskable,
               const int64_t* example_index, int64_t row_begin, int64_t row_end, int64_t T,
               const Params& params, int64_t* out, int64_t* labels);

}  // namespace wwm
}  // namespace lub_fast
