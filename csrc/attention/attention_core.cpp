// Row helpers of the CPU attention kernel (see attention_core.h). Each exported function is a thin
// wrapper over a template, compiled once per instruction set by target_clones on x86-64 so that
// the exp, Philox and reduction loops are vectorised for the running CPU; the results of a clone do
// not depend on the thread that runs it. Reductions keep kLanes partial results (a fixed order for
// a given n), which the compiler maps onto vector registers.
#include "attention/attention_core.h"

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define LUB_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LUB_FAST_CLONES
#endif
#define LUB_FAST_INLINE inline __attribute__((always_inline))

namespace lub_fast {
namespace attention {

namespace {

constexpr int kLanes = 16;
constexpr int64_t kPhiloxBlock = 256;  // Philox calls generated together: 1024 keys, 4 KiB of words

LUB_FAST_INLINE float exp_of(float x) { return exp_f32(x); }
LUB_FAST_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
LUB_FAST_INLINE T row_max(const T* s, int64_t n) {
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = s[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = s[j + l] > acc[l] ? s[j + l] : acc[l];
  }
  T m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s <- exp(s - shift); returns the sum of the new values.
template <typename T>
LUB_FAST_INLINE T exp_shifted_sum(T* s, int64_t n, T shift) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_of(s[j + l] - shift);
      s[j + l] = e;
      acc[l] += e;
    }
  }
  T tail = 0;
  for (; j < n; ++j) {
    s[j] = exp_of(s[j] - shift);
    tail += s[j];
  }
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum + tail;
}

template <typename T>
LUB_FAST_INLINE T softmax_row_impl(T* s, int64_t n) {
  const T m = row_max(s, n);
  const T sum = exp_shifted_sum(s, n, m);
  // p = exp(s - m) / sum equals exp(s - lse) and skips a second exp pass.
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

template <typename T>
LUB_FAST_INLINE void probs_row_impl(T* s, int64_t n, T lse) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_of(s[j] - lse);
}

// Philox words of counters (c0[i], c1[i], d.stream, d.offset), i < count, into words[4 i + w]:
// one straight loop over many calls, so that it vectorises across calls.
LUB_FAST_INLINE void philox_words(const uint32_t* c0, const uint32_t* c1, int64_t count,
                                  const Dropout& d, uint32_t* words) {
  for (int64_t i = 0; i < count; ++i) {
    const philox::Words r = philox::philox4x32_10(c0[i], c1[i], d.stream, d.offset, d.k0, d.k1);
    for (int w = 0; w < 4; ++w) words[4 * i + w] = r.w[w];
  }
}

// Calls apply(r, j0, words, count) for keys [j0, j0 + count) of every row r < rows of an
// [rows, n] block whose row r is query row row_ids[r], with words[j] the Philox word of key j0 + j.
// The (row, group) counters of up to kPhiloxBlock calls are generated together whatever the row
// length, so short rows vectorise as well as long ones.
template <typename Apply>
LUB_FAST_INLINE void for_each_keep_word(int64_t rows, int64_t n, const uint32_t* row_ids, const Dropout& d,
                                        const Apply& apply) {
  uint32_t c0[kPhiloxBlock], c1[kPhiloxBlock], words[4 * kPhiloxBlock];
  const int64_t groups = (n + 3) / 4;
  int64_t r = 0, g = 0;  // first (row, group) of the current block
  while (groups > 0 && r < rows) {
    int64_t count = 0;
    for (int64_t rr = r, gg = g; count < kPhiloxBlock && rr < rows; ++rr, gg = 0) {
      const int64_t take = std::min(groups - gg, kPhiloxBlock - count);
      for (int64_t t = 0; t < take; ++t) {
        c0[count + t] = static_cast<uint32_t>(gg + t);
        c1[count + t] = row_ids[rr];
      }
      count += take;
    }
    philox_words(c0, c1, count, d, words);
    for (int64_t done = 0; done < count;) {
      const int64_t take = std::min(groups - g, count - done);
      apply(r, 4 * g, words + 4 * done, std::min(4 * take, n - 4 * g));
      done += take;
      g += take;
      if (g == groups) {
        g = 0;
        ++r;
      }
    }
  }
}

template <typename T>
LUB_FAST_INLINE void dropout_rows_impl(T* x, int64_t rows, int64_t n, const uint32_t* row_ids,
                                       const Dropout& d) {
  const T factor = static_cast<T>(d.factor);
  if (d.threshold > 0xFFFFFFFFull) {  // threshold 2**32 (dropout_p near 0): every word is kept
    for (int64_t j = 0; j < rows * n; ++j) x[j] *= factor;
    return;
  }
  const uint32_t threshold = static_cast<uint32_t>(d.threshold);
  for_each_keep_word(rows, n, row_ids, d,
                     [&](int64_t r, int64_t j0, const uint32_t* words, int64_t count) {
                       T* xr = x + r * n + j0;
                       for (int64_t j = 0; j < count; ++j) {
                         xr[j] = words[j] < threshold ? xr[j] * factor : T(0);
                       }
                     });
}

template <typename T>
LUB_FAST_INLINE void dropout_rows_pair_impl(const T* p, T* pd, T* dpd, int64_t rows, int64_t n,
                                            const uint32_t* row_ids, const Dropout& d) {
  const T factor = static_cast<T>(d.factor);
  if (d.threshold > 0xFFFFFFFFull) {
    for (int64_t j = 0; j < rows * n; ++j) {
      pd[j] = p[j] * factor;
      dpd[j] *= factor;
    }
    return;
  }
  const uint32_t threshold = static_cast<uint32_t>(d.threshold);
  for_each_keep_word(rows, n, row_ids, d,
                     [&](int64_t r, int64_t j0, const uint32_t* words, int64_t count) {
                       const int64_t o = r * n + j0;
                       for (int64_t j = 0; j < count; ++j) {
                         const bool keep = words[j] < threshold;
                         pd[o + j] = keep ? p[o + j] * factor : T(0);
                         dpd[o + j] = keep ? dpd[o + j] * factor : T(0);
                       }
                     });
}

template <typename T>
LUB_FAST_INLINE void ds_row_impl(T* p, const T* dp, int64_t n, T drow) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - drow);
}

template <typename T>
LUB_FAST_INLINE T dot_impl(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace

LUB_FAST_CLONES float softmax_row(float* s, int64_t n) { return softmax_row_impl(s, n); }
LUB_FAST_CLONES double softmax_row(double* s, int64_t n) { return softmax_row_impl(s, n); }

LUB_FAST_CLONES void probs_row(float* s, int64_t n, float lse) { probs_row_impl(s, n, lse); }
LUB_FAST_CLONES void probs_row(double* s, int64_t n, double lse) { probs_row_impl(s, n, lse); }

LUB_FAST_CLONES void dropout_rows(float* x, int64_t rows, int64_t n, const uint32_t* row_ids,
                                  const Dropout& d) {
  dropout_rows_impl(x, rows, n, row_ids, d);
}
LUB_FAST_CLONES void dropout_rows(double* x, int64_t rows, int64_t n, const uint32_t* row_ids,
                                  const Dropout& d) {
  dropout_rows_impl(x, rows, n, row_ids, d);
}

LUB_FAST_CLONES void dropout_rows(const float* p, float* pd, float* dpd, int64_t rows, int64_t n,
                                  const uint32_t* row_ids, const Dropout& d) {
  dropout_rows_pair_impl(p, pd, dpd, rows, n, row_ids, d);
}
LUB_FAST_CLONES void dropout_rows(const double* p, double* pd, double* dpd, int64_t rows,
                                  int64_t n, const uint32_t* row_ids, const Dropout& d) {
  dropout_rows_pair_impl(p, pd, dpd, rows, n, row_ids, d);
}

LUB_FAST_CLONES void ds_row(float* p, const float* dp, int64_t n, float drow) {
  ds_row_impl(p, dp, n, drow);
}
LUB_FAST_CLONES void ds_row(double* p, const double* dp, int64_t n, double drow) {
  ds_row_impl(p, dp, n, drow);
}

LUB_FAST_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
LUB_FAST_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }

}  // namespace attention
}  // namespace lub_fast
