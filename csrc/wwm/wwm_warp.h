// One example of lub_fast::wwm_mask computed by one warp of 32 lanes: the algorithm of the CUDA
// kernel (wwm_kernel.cu), written against a small warp interface so that the same code also runs
// on the host, where csrc/tests/test_wwm_kernel_host.cpp executes it with 32 emulated lanes and
// compares it with the CPU core (wwm_core.cpp) bit for bit. Specification: lub_fast/ops/wwm.py.
//
// `Warp` provides: lane() (0..31); ballot(bool) -> uint32_t; shfl(int32_t or uint32_t, src lane);
// match_any(int32_t) -> mask of the lanes holding the same value; sync() (a warp barrier that
// orders memory); wait_copies() (completes the asynchronous copies this lane issued into ex.ids).
// Every lane calls every collective in the same order (the loops below are warp-uniform).
//
// Phases, each parallel across the lanes where it can be:
// 1. Words: lane l owns tokens [32 l, 32 l + 32) of each 1024-token tile as bit masks (maskable,
//    word start, word end); prefix counts of the starts and ends place word k's first and last
//    token in units[k]. 2. n-gram units: lane l decides word base + l; which words begin a unit is
//    a prefix scan of the maps s -> (s == 0 ? n - 1 : s - 1) on s = words still to skip, composed as
//    3-entry tables. 3. Fisher-Yates, 32 steps at a time: the lanes draw steps i .. i + 31 at once;
//    match_any on the swap targets and pointer jumping over "which earlier step moved a unit here"
//    give each step's unit exactly as the sequential swaps would; a prefix sum of the unit sizes
//    against the remaining budget decides which are taken, and only as many 32-step batches run as
//    the budget needs. 4. Taken units write their action byte per token; a last coalesced pass
//    writes out and labels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "wwm/wwm_core.h"

#if defined(__CUDACC__)
#define LUB_FAST_WARP_FN __device__ __forceinline__
#else
#define LUB_FAST_WARP_FN inline
#endif

namespace lub_fast {
namespace wwm {

constexpr int kLanes = 32;
constexpr int32_t kTileTokens = 32 * kLanes;  // tokens per pass of the word scan

// Per-token action bytes (scratch) written by phase 4 and read by the output pass.
constexpr uint8_t kActNone = 0;
constexpr uint8_t kActMask = 1;
constexpr uint8_t kActRandom = 2;
constexpr uint8_t kActKeep = 3;

// Tokens [begin, end) of a word or unit.
struct Bounds {
  int32_t begin;
  int32_t end;
};

// One example's tensors (T entries each) and its scratch: units holds T entries, actions
// round_up(T, 16) bytes and is 16-byte aligned, targets 32 entries.
struct WarpExample {
  const int64_t* ids;  // may be a staged copy (see Warp::wait_copies)
  const bool* word_start;
  const bool* maskable;
  int64_t* out;
  int64_t* labels;
  Bounds* units;
  uint8_t* actions;
  int32_t* targets;
  int32_t T;
  uint64_t key;
};

LUB_FAST_WARP_FN int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Index of the highest set bit; x != 0.
LUB_FAST_WARP_FN int high_bit(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return 31 - __clz(x);
#else
  return 31 - __builtin_clz(x);
#endif
}

// Index of the lowest set bit; x != 0.
LUB_FAST_WARP_FN int low_bit(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __ffs(x) - 1;
#else
  return __builtin_ctz(x);
#endif
}

// Four bool bytes (0 or 1) -> four bits, byte i to bit i: the multiplier moves byte i's bit 8 i to
// bit 24 + i; the other products land below bit 24 at distinct positions or above bit 31.
LUB_FAST_WARP_FN uint32_t bits_of_4_bytes(uint32_t w) {
  return ((w & 0x01010101u) * 0x01020408u) >> 24;
}

// Flags of tokens [t0, t0 + 32) clipped to [0, T) as bits; two 16-byte loads when `vec` (the
// row is 16-byte aligned, so is t0) and the 32 tokens are inside the row.
LUB_FAST_WARP_FN uint32_t load_bits(const bool* row, int32_t t0, int32_t T, bool vec) {
  uint32_t bits = 0;
  if (vec && t0 + 32 <= T) {
    uint32_t w[8];
#if defined(__CUDA_ARCH__)
    const uint4 a = reinterpret_cast<const uint4*>(row + t0)[0];
    const uint4 b = reinterpret_cast<const uint4*>(row + t0)[1];
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
#else
    std::memcpy(w, row + t0, sizeof(w));
#endif
    for (int i = 0; i < 8; ++i) bits |= bits_of_4_bytes(w[i]) << (4 * i);
  } else {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
    const int32_t n = T - t0 < 32 ? T - t0 : 32;
    for (int32_t i = 0; i < n; ++i) bits |= static_cast<uint32_t>(bytes[t0 + i] & 1u) << i;
  }
  return bits;
}

// Inclusive prefix sum over the lanes.
template <class Warp>
LUB_FAST_WARP_FN int32_t inclusive_sum(const Warp& w, int32_t v) {
  const int lane = w.lane();
  for (int d = 1; d < kLanes; d *= 2) {
    const int32_t other = w.shfl(v, lane >= d ? lane - d : lane);
    if (lane >= d) v += other;
  }
  return v;
}

// Maps {0, 1, 2} -> {0, 1, 2} as 3 x 2-bit tables: entry s at bits 2 s.
constexpr uint32_t kIdentityMap = 0u | (1u << 2) | (2u << 4);
LUB_FAST_WARP_FN uint32_t apply_map(uint32_t map, uint32_t s) { return (map >> (2 * s)) & 3u; }
// outer after inner.
LUB_FAST_WARP_FN uint32_t compose_maps(uint32_t outer, uint32_t inner) {
  return apply_map(outer, apply_map(inner, 0)) | (apply_map(outer, apply_map(inner, 1)) << 2) |
         (apply_map(outer, apply_map(inner, 2)) << 4);
}

// Phase 1: words into units[0 .. n_words); returns n_words, sets *n_maskable (all lanes).
template <class Warp>
LUB_FAST_WARP_FN int32_t scan_words(const Warp& w, const WarpExample& ex, bool token_mode,
                                    int32_t* n_maskable) {
  const int lane = w.lane();
  const int32_t T = ex.T;
  const bool vec = reinterpret_cast<uintptr_t>(ex.maskable) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(ex.word_start) % 16 == 0;
  int32_t n_starts = 0;
  int32_t n_ends = 0;
  int32_t maskable_count = 0;
  uint32_t last_maskable = 0;  // maskable bit of the token before the tile
  for (int32_t tile = 0; tile < T; tile += kTileTokens) {
    const int32_t t0 = tile + 32 * lane;
    const uint32_t m = t0 < T ? load_bits(ex.maskable, t0, T, vec) : 0u;
    const uint32_t ws = t0 < T && !token_mode ? load_bits(ex.word_start, t0, T, vec) : ~0u;
    const uint32_t below_top = w.shfl(m, lane > 0 ? lane - 1 : 0) >> 31;
    const uint32_t before = (m << 1) | (lane > 0 ? below_top : last_maskable);
    // A maskable token starts a word at a word-start flag or after a non-maskable token.
    const uint32_t starts = m & (ws | ~before);
    const uint32_t continues = m & ~starts;
    uint32_t next_continues = w.shfl(continues, lane < kLanes - 1 ? lane + 1 : lane) & 1u;
    if (lane == kLanes - 1) {
      const int32_t t = tile + kTileTokens;
      next_continues = t < T && (m >> 31) && ex.maskable[t] && !token_mode && !ex.word_start[t];
    }
    const uint32_t ends = m & ~((continues >> 1) | (next_continues << 31));
    maskable_count += popc32(m);

    // Both prefix counts in one scan: each is at most 1024 per tile, so 16 bits apiece.
    const int32_t counts = popc32(starts) | (popc32(ends) << 16);
    const int32_t counts_incl = inclusive_sum(w, counts);
    const int32_t counts_total = w.shfl(counts_incl, kLanes - 1);
    int32_t k_start = n_starts + ((counts_incl - counts) & 0xffff);
    int32_t k_end = n_ends + ((counts_incl - counts) >> 16);
    uint32_t s_bits = starts;
    uint32_t e_bits = ends;
    while (s_bits | e_bits) {
      if (s_bits) {
        ex.units[k_start++].begin = t0 + low_bit(s_bits);
        s_bits &= s_bits - 1;
      }
      if (e_bits) {
        ex.units[k_end++].end = t0 + low_bit(e_bits) + 1;
        e_bits &= e_bits - 1;
      }
    }
    n_starts += counts_total & 0xffff;
    n_ends += counts_total >> 16;
    last_maskable = w.shfl(m, kLanes - 1) >> 31;
  }
  for (int d = 1; d < kLanes; d *= 2) {
    maskable_count += w.shfl(maskable_count, lane ^ d);
  }
  *n_maskable = maskable_count;
  w.sync();
  return n_starts;
}

// Phase 2: n-gram units over the words in units[0 .. n_words), in place; returns the unit count.
template <class Warp>
LUB_FAST_WARP_FN int32_t group_ngrams_warp(const Warp& w, const WarpExample& ex, int32_t n_words) {
  const int lane = w.lane();
  int32_t n_units = 0;
  uint32_t skip = 0;  // words of the last unit still to pass
  for (int32_t base = 0; base < n_words; base += kLanes) {
    const int32_t k = base + lane;
    const bool valid = k < n_words;
    const Bounds none{-1, -1};
    const Bounds w0 = valid ? ex.units[k] : none;
    const Bounds w1 = valid && k + 1 < n_words ? ex.units[k + 1] : none;
    const Bounds w2 = valid && k + 2 < n_words ? ex.units[k + 2] : none;
    // Words in word k's run, from k on, at most kMaxNgram: runs are touching words.
    const bool touch1 = w1.begin == w0.end;
    const int m = 1 + touch1 + (touch1 && w2.begin == w1.end);
    uint32_t n = 1;
    if (valid && m > 1) {
      const uint64_t u = draw(ex.key, kStreamNgram, static_cast<uint64_t>(w0.begin)) >> 32;
      n = m == 3 ? 1 + (u >= kNgram3T1) + (u >= kNgram3T2) : 1 + (u >= kNgram2T1);
    }
    uint32_t map = valid ? (n - 1) | (1u << 4) : kIdentityMap;
    for (int d = 1; d < kLanes; d *= 2) {
      const uint32_t other = w.shfl(map, lane >= d ? lane - d : lane);
      if (lane >= d) map = compose_maps(map, other);
    }
    const uint32_t map_before = w.shfl(map, lane > 0 ? lane - 1 : 0);
    const uint32_t skip_here = apply_map(lane > 0 ? map_before : kIdentityMap, skip);
    const bool first = valid && skip_here == 0;
    const uint32_t firsts = w.ballot(first);
    const int32_t index = n_units + popc32(firsts & ((1u << lane) - 1));
    const int32_t end = n == 1 ? w0.end : n == 2 ? w1.end : w2.end;
    // Every lane has read its words; unit `index` <= k overwrites only words already read.
    w.sync();
    if (first) ex.units[index] = Bounds{w0.begin, end};
    n_units += popc32(firsts);
    skip = apply_map(w.shfl(map, kLanes - 1), skip);
  }
  w.sync();
  return n_units;
}

// Phases 3-4: the lazy Fisher-Yates order over units[0 .. n_units) and the taken units' actions;
// returns the tokens chosen.
template <class Warp>
LUB_FAST_WARP_FN int32_t choose_units(const Warp& w, const WarpExample& ex, int32_t n_units,
                                      int32_t budget) {
  const int lane = w.lane();
  const uint32_t lanes_below = (1u << lane) - 1;
  int32_t remaining = budget;
  for (int32_t i = 0; remaining > 0 && i < n_units; i += kLanes) {
    const int32_t steps = n_units - i < kLanes ? n_units - i : kLanes;
    const bool active = lane < steps;
    const int32_t step = i + lane;
    // Step `step` swaps positions step and j; idle lanes get distinct negative j.
    const int32_t j =
        active ? step + static_cast<int32_t>(below(draw(ex.key, kStreamOrder, static_cast<uint64_t>(step)),
                                                   static_cast<uint64_t>(n_units - step)))
               : -1 - lane;
    const uint32_t same_j = w.match_any(j);
    ex.targets[lane] = -1;
    w.sync();
    // targets[p]: the last earlier step that moved a unit into position i + p (it moved the unit
    // that was at its own position). Only steps before p can: a step's j is >= its position.
    if (active && j < i + steps) {
      const uint32_t earlier = same_j & ((1u << (j - i)) - 1);
      if (earlier && lane == high_bit(earlier)) ex.targets[j - i] = lane;
    }
    w.sync();
    int32_t from = ex.targets[lane];
    Bounds here = active ? ex.units[step] : Bounds{0, 0};
    const Bounds there = active ? ex.units[j] : Bounds{0, 0};
    // here := the unit at position `step` just before step `step`: follow `from` to the first
    // step whose position no earlier step wrote (pointer jumping, at most 5 rounds).
    while (w.ballot(from >= 0)) {
      const int src = from >= 0 ? from : lane;
      const Bounds h{w.shfl(here.begin, src), w.shfl(here.end, src)};
      const int32_t f = w.shfl(from, src);
      if (from >= 0) {
        here = h;
        from = f;
      }
    }
    // The unit step `step` takes: what the last earlier step with the same j left there, else
    // what was there when the batch began.
    const uint32_t earlier_j = same_j & lanes_below;
    const int src = earlier_j ? high_bit(earlier_j) : lane;
    const Bounds moved{w.shfl(here.begin, src), w.shfl(here.end, src)};
    const Bounds unit = earlier_j ? moved : there;
    w.sync();
    // Positions past this batch keep what the last step with that j moved there.
    if (active && j >= i + steps && (same_j >> lane) == 1u) ex.units[j] = here;

    // Taken: the unit fits what remains after the earlier taken steps of the batch. Consecutive
    // fitting steps come from one prefix sum; each step that does not fit restarts after itself.
    const int32_t length = active ? unit.end - unit.begin : 0;
    bool taken = false;
    int first = 0;
    while (remaining > 0 && first < steps) {
      const bool candidate = active && lane >= first;
      const int32_t sum = inclusive_sum(w, candidate ? length : 0);
      const bool fits = candidate && sum <= remaining;
      const uint32_t fit = w.ballot(fits);
      const uint32_t misfit = w.ballot(candidate && !fits);
      const int32_t used = w.shfl(sum, fit ? high_bit(fit) : 0);
      taken = taken || fits;
      remaining -= fit ? used : 0;
      first = misfit ? low_bit(misfit) + 1 : steps;
    }
    if (taken) {
      const uint64_t a = below(draw(ex.key, kStreamAction, static_cast<uint64_t>(unit.begin)), 10);
      const uint8_t act = a < 8 ? kActMask : a == 8 ? kActRandom : kActKeep;
      for (int32_t t = unit.begin; t < unit.end; ++t) ex.actions[t] = act;
    }
  }
  return budget - remaining;
}

// Masks one example; every lane of the warp calls it with the same arguments. Returns the number
// of tokens chosen.
template <class Warp>
LUB_FAST_WARP_FN int32_t mask_example_warp(const Warp& w, const WarpExample& ex, const Params& params) {
  const int lane = w.lane();
  const int32_t T = ex.T;
  for (int32_t t = 16 * lane; t < T; t += 16 * kLanes) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(ex.actions + t) = make_uint4(0, 0, 0, 0);
#else
    std::memset(ex.actions + t, 0, 16);
#endif
  }
  int32_t n_maskable = 0;
  int32_t n_units = scan_words(w, ex, params.mode == Mode::kToken, &n_maskable);
  if (params.mode == Mode::kNgram) n_units = group_ngrams_warp(w, ex, n_units);

  // round half to even, as std::nearbyint and Python's round; <= n_maskable since rate <= 1.
#if defined(__CUDA_ARCH__)
  const int64_t rounded = static_cast<int64_t>(rint(params.rate * static_cast<double>(n_maskable)));
#else
  const int64_t rounded = static_cast<int64_t>(std::nearbyint(params.rate * static_cast<double>(n_maskable)));
#endif
  const int32_t budget = static_cast<int32_t>(rounded < params.max_predictions ? rounded : params.max_predictions);
  const int32_t chosen = choose_units(w, ex, n_units, budget);

  w.wait_copies();
  w.sync();
  const uint64_t span = static_cast<uint64_t>(params.random_high - params.random_low);
  for (int32_t t = lane; t < T; t += kLanes) {
    const uint8_t act = ex.actions[t];
    const int64_t id = ex.ids[t];
    int64_t v = id;
    if (act == kActMask) {
      v = params.mask_token_id;
    } else if (act == kActRandom) {
      v = params.random_low +
          static_cast<int64_t>(below(draw(ex.key, kStreamReplace, static_cast<uint64_t>(t)), span));
    }
    ex.out[t] = v;
    ex.labels[t] = act == kActNone ? kIgnoreIndex : id;
  }
  return chosen;
}

}  // namespace wwm
}  // namespace lub_fast
