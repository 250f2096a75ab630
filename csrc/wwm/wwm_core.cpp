// Whole-word / n-gram / token masking: the torch-free CPU implementation (see wwm_core.h and the
// specification in lub_fast/ops/wwm.py). One example is one sequential pass; examples are
// independent, so callers parallelise over rows.
#include "wwm/wwm_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace lub_fast {
namespace wwm {

namespace {

// Words of one example (or single tokens in token mode) into spans; returns their count and
// sets *n_maskable.
int32_t find_words(const bool* word_start, const bool* maskable, int64_t T, bool token_mode,
                   Span* words, int64_t* n_maskable) {
  int32_t n = 0;
  int64_t count = 0;
  bool previous = false;
  for (int32_t t = 0; t < static_cast<int32_t>(T); ++t) {
    if (!maskable[t]) {
      previous = false;
      continue;
    }
    ++count;
    if (token_mode || word_start[t] || !previous) {
      words[n++] = Span{t, 1};
    } else {
      ++words[n - 1].length;
    }
    previous = true;
  }
  *n_maskable = count;
  return n;
}

// Partitions the words into n-gram units in place (unit u is written at index u <= its first
// word's index, after that word is read). Words j and j+1 share a run when they touch.
int32_t group_ngrams(Span* spans, int32_t n_words, uint64_t key) {
  int32_t n_units = 0;
  int32_t j = 0;
  while (j < n_words) {
    int32_t m = 1;
    while (m < kMaxNgram && j + m < n_words &&
           spans[j + m].start == spans[j + m - 1].start + spans[j + m - 1].length) {
      ++m;
    }
    int32_t n = 1;
    if (m > 1) {
      const uint64_t u = draw(key, kStreamNgram, static_cast<uint64_t>(spans[j].start)) >> 32;
      if (m == 3) {
        n = 1 + (u >= kNgram3T1) + (u >= kNgram3T2);
      } else {
        n = 1 + (u >= kNgram2T1);
      }
    }
    const Span first = spans[j];
    const Span last = spans[j + n - 1];
    spans[n_units++] = Span{first.start, last.start + last.length - first.start};
    j += n;
  }
  return n_units;
}

}  // namespace

int64_t mask_example(const int64_t* ids, const bool* word_start, const bool* maskable, int64_t T,
                     uint64_t key, const Params& params, int64_t* out, int64_t* labels,
                     Span* scratch) {
  std::memcpy(out, ids, sizeof(int64_t) * static_cast<size_t>(T));
  std::fill(labels, labels + T, kIgnoreIndex);

  int64_t n_maskable = 0;
  int32_t n_units =
      find_words(word_start, maskable, T, params.mode == Mode::kToken, scratch, &n_maskable);
  if (params.mode == Mode::kNgram) {
    n_units = group_ngrams(scratch, n_units, key);
  }

  const int64_t budget = std::min(
      static_cast<int64_t>(std::nearbyint(params.rate * static_cast<double>(n_maskable))),
      params.max_predictions);
  int64_t remaining = budget;
  const uint64_t span = static_cast<uint64_t>(params.random_high - params.random_low);
  for (int32_t i = 0; remaining > 0 && i < n_units; ++i) {
    const int32_t j = i + static_cast<int32_t>(below(draw(key, kStreamOrder, static_cast<uint64_t>(i)),
                                                     static_cast<uint64_t>(n_units - i)));
    std::swap(scratch[i], scratch[j]);
    const Span unit = scratch[i];
    if (unit.length > remaining) {
      continue;
    }
    remaining -= unit.length;
    const uint64_t action = below(draw(key, kStreamAction, static_cast<uint64_t>(unit.start)), 10);
    const int32_t end = unit.start + unit.length;
    for (int32_t t = unit.start; t < end; ++t) {
      labels[t] = ids[t];
    }
    if (action < 8) {
      for (int32_t t = unit.start; t < end; ++t) {
        out[t] = params.mask_token_id;
      }
    } else if (action == 8) {
      for (int32_t t = unit.start; t < end; ++t) {
        out[t] = params.random_low +
                 static_cast<int64_t>(below(draw(key, kStreamReplace, static_cast<uint64_t>(t)), span));
      }
    }
  }
  return budget - remaining;
}

void mask_rows(const int64_t* ids, const bool* word_start, const bool* maskable,
               const int64_t* example_index, int64_t row_begin, int64_t row_end, int64_t T,
               const Params& params, int64_t* out, int64_t* labels) {
  std::vector<Span> scratch(static_cast<size_t>(std::max<int64_t>(T, 1)));
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t offset = b * T;
    const uint64_t key =
        example_key(params.seed, params.epoch, static_cast<uint64_t>(example_index[b]));
    mask_example(ids + offset, word_start + offset, maskable + offset, T, key, params,
                 out + offset, labels + offset, scratch.data());
  }
}

}  // namespace wwm
}  // namespace lub_fast
