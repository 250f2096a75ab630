// ctest program for the CUDA kernel's per-example algorithm (csrc/wwm/wwm_warp.h) run on the host:
// 32 lanes are emulated as coroutines (ucontext) that switch at every warp collective, round robin,
// so the kernel's code runs unchanged with exact warp semantics (a lane that read shared scratch
// without the sync the kernel needs would see other lanes' stale or future writes). The output of
// every example must equal the CPU core's (wwm_core.cpp) bit for bit, for all modes, rates and
// lengths (word-scan tiles of 1024 tokens, rows not 16-byte aligned, empty rows), and every lane
// must make the same sequence of collectives. Exits non-zero on the first failed check.
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "tests/check.h"
#include "wwm/wwm_core.h"
#include "wwm/wwm_warp.h"

using lub_fast::wwm::Bounds;
using lub_fast::wwm::kLanes;
using lub_fast::wwm::Mode;
using lub_fast::wwm::Params;
using lub_fast::wwm::WarpExample;

namespace {

// The 32 lanes of one emulated warp. A collective stores the lane's value in this round's slot and
// switches to the next lane; when lane 31 arrives every slot is filled and lane 0 resumes. Slots
// are double-buffered: lane 0 writes round r + 1 while lanes 1..31 still read round r.
class WarpEmulator {
 public:
  enum class Op : uint8_t { kShfl, kBallot, kMatch, kSync };

  template <class Body>
  void run(Body& body) {
    body_ = &body;
    call_ = [](void* b, int lane) { (*static_cast<Body*>(b))(lane); };
    for (int l = 0; l < kLanes; ++l) {
      capture(&lanes_[l]);
      stacks_[l].resize(kStackBytes);
      lanes_[l].uc_stack.ss_sp = stacks_[l].data();
      lanes_[l].uc_stack.ss_size = kStackBytes;
      lanes_[l].uc_link = nullptr;
      makecontext(&lanes_[l], &WarpEmulator::entry, 0);
      rounds_[l] = 0;
      done_[l] = false;
    }
    current_ = this;
    active_ = 0;
    CHECK(swapcontext(&main_, &lanes_[0]) == 0);
    for (int l = 1; l < kLanes; ++l) CHECK(rounds_[l] == rounds_[0]);  // the same collectives
  }

  // Deposits v for `op`, waits for the other lanes, returns this round's 32 values.
  const uint32_t* exchange(int lane, Op op, uint32_t v) {
    const int buffer = rounds_[lane] & 1;
    values_[buffer][lane] = v;
    ops_[buffer][lane] = op;
    ++rounds_[lane];
    active_ = (lane + 1) % kLanes;
    CHECK(!done_[active_]);  // a lane returned while this one waits in a collective
    CHECK(swapcontext(&lanes_[lane], &lanes_[active_]) == 0);
    for (int l = 0; l < kLanes; ++l) CHECK(ops_[buffer][l] == op);
    return values_[buffer];
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  // getcontext returns twice; alone in its own function it cannot clobber the caller's locals.
  static void capture(ucontext_t* context) { CHECK(getcontext(context) == 0); }

  // A lane's first activation; lane 31 finishes last and returns to run(), the others pass on.
  static void entry() {
    WarpEmulator* self = current_;
    const int lane = self->active_;
    self->call_(self->body_, lane);
    self->done_[lane] = true;
    if (lane == kLanes - 1) {
      for (int l = 0; l < kLanes; ++l) CHECK(self->done_[l]);
      setcontext(&self->main_);
    }
    self->active_ = lane + 1;
    setcontext(&self->lanes_[lane + 1]);
  }

  static inline WarpEmulator* current_ = nullptr;
  void* body_ = nullptr;
  void (*call_)(void*, int) = nullptr;
  int active_ = 0;  // the lane running now
  ucontext_t main_;
  ucontext_t lanes_[kLanes];
  std::vector<char> stacks_[kLanes];
  uint32_t values_[2][kLanes];
  Op ops_[2][kLanes];
  int rounds_[kLanes];
  bool done_[kLanes];
};

// The `Warp` interface of wwm_warp.h on the emulator.
struct HostWarp {
  WarpEmulator* emu;
  int id;

  int lane() const { return id; }
  uint32_t ballot(bool p) const {
    const uint32_t* v = emu->exchange(id, WarpEmulator::Op::kBallot, p);
    uint32_t bits = 0;
    for (int l = 0; l < kLanes; ++l) bits |= (v[l] & 1u) << l;
    return bits;
  }
  uint32_t shfl(uint32_t x, int src) const {
    CHECK(src >= 0 && src < kLanes);
    return emu->exchange(id, WarpEmulator::Op::kShfl, x)[src];
  }
  int32_t shfl(int32_t x, int src) const {
    return static_cast<int32_t>(shfl(static_cast<uint32_t>(x), src));
  }
  uint32_t match_any(int32_t x) const {
    const uint32_t* v = emu->exchange(id, WarpEmulator::Op::kMatch, static_cast<uint32_t>(x));
    uint32_t bits = 0;
    for (int l = 0; l < kLanes; ++l) bits |= static_cast<uint32_t>(v[l] == v[id]) << l;
    return bits;
  }
  void sync() const { emu->exchange(id, WarpEmulator::Op::kSync, 0); }
  void wait_copies() const {}
};

struct Batch {
  int64_t B, T;
  std::vector<int64_t> ids, index;
  std::vector<char> storage;  // word_start then maskable, each B * T bytes from `offset`
  size_t offset;
  const bool* word_start() const { return reinterpret_cast<const bool*>(storage.data() + offset); }
  const bool* maskable() const { return word_start() + B * T; }
};

// Rows of random lengths ([CLS] ... [SEP], padding), the first empty, a few specials inside;
// word starts with probability p_start. offset = 1 misaligns every row for the 16-byte loads.
Batch random_batch(std::mt19937_64& gen, int64_t B, int64_t T, double p_start, size_t offset) {
  Batch batch{B, T, std::vector<int64_t>(B * T), std::vector<int64_t>(B),
              std::vector<char>(offset + 2 * B * T + 16), offset};
  char* starts = batch.storage.data() + offset;
  char* maskable = starts + B * T;
  std::uniform_int_distribution<int64_t> id(10, 999);
  std::uniform_int_distribution<int64_t> length(0, T);
  std::bernoulli_distribution start(p_start), special(0.03);
  for (int64_t b = 0; b < B; ++b) {
    batch.index[b] = static_cast<int64_t>(gen());
    const int64_t n = b == 0 ? 0 : b == 1 ? T : length(gen);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      batch.ids[i] = id(gen);
      starts[i] = start(gen);
      maskable[i] = (b == 1 || (t > 0 && t < n - 1)) && !special(gen);
    }
  }
  return batch;
}

// Runs every row through the emulated warp and compares with the CPU core.
void check_against_core(const Batch& batch, const Params& p) {
  const int64_t B = batch.B, T = batch.T;
  std::vector<int64_t> want_out(B * T), want_labels(B * T);
  lub_fast::wwm::mask_rows(batch.ids.data(), batch.word_start(), batch.maskable(), batch.index.data(), 0,
                           B, T, p, want_out.data(), want_labels.data());
  std::vector<int64_t> out(T), labels(T);
  std::vector<Bounds> units(T);
  std::vector<uint8_t> actions((T + 15) / 16 * 16);
  std::vector<int32_t> targets(kLanes);
  std::vector<int32_t> chosen(kLanes);
  WarpEmulator emu;
  for (int64_t b = 0; b < B; ++b) {
    const WarpExample ex{batch.ids.data() + b * T, batch.word_start() + b * T, batch.maskable() + b * T,
                         out.data(), labels.data(), units.data(), actions.data(), targets.data(),
                         static_cast<int32_t>(T),
                         lub_fast::wwm::example_key(p.seed, p.epoch, static_cast<uint64_t>(batch.index[b]))};
    auto body = [&](int lane) { chosen[lane] = lub_fast::wwm::mask_example_warp(HostWarp{&emu, lane}, ex, p); };
    emu.run(body);
    int64_t want_chosen = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (out[t] != want_out[b * T + t] || labels[t] != want_labels[b * T + t]) {
        std::fprintf(stderr, "mode %d T=%lld rate=%g row %lld token %lld: out %lld labels %lld, core %lld %lld\n",
                     static_cast<int>(p.mode), static_cast<long long>(T), p.rate, static_cast<long long>(b),
                     static_cast<long long>(t), static_cast<long long>(out[t]), static_cast<long long>(labels[t]),
                     static_cast<long long>(want_out[b * T + t]), static_cast<long long>(want_labels[b * T + t]));
        std::exit(1);
      }
      want_chosen += labels[t] != lub_fast::wwm::kIgnoreIndex;
    }
    for (int l = 0; l < kLanes; ++l) CHECK(chosen[l] == want_chosen);
  }
}

void test_matches_core() {
  std::mt19937_64 gen(20261125);
  const Mode modes[3] = {Mode::kToken, Mode::kWholeWord, Mode::kNgram};
  // 1024 and 2100: one and three word-scan tiles; 97 and 513: rows not 16-byte aligned.
  const int64_t lengths[] = {1, 2, 31, 33, 97, 128, 513, 1024, 2100};
  const double rates[] = {0.0, 0.15, 0.5, 1.0};
  for (const Mode mode : modes) {
    for (const int64_t T : lengths) {
      for (const double rate : rates) {
        Params p;
        p.seed = gen();
        p.epoch = gen() % 10;
        p.mode = mode;
        p.rate = rate;
        p.max_predictions = rate == 0.5 ? T / 5 : T;
        p.mask_token_id = 4;
        p.random_low = 5;
        p.random_high = 1000;
        const int64_t B = T > 1000 ? 3 : 6;
        const double p_start = rate == 0.15 ? 0.1 : 0.6;  // 0.1: long words across lanes and tiles
        check_against_core(random_batch(gen, B, T, p_start, (T % 2) ? 0 : (rate == 1.0)), p);
      }
    }
  }
}

// Many units, a budget of nearly all of them: long Fisher-Yates runs with 32-step batches whose
// swap targets collide, and steps that skip units too long for the rest of the budget.
void test_long_shuffles() {
  std::mt19937_64 gen(11);
  for (const Mode mode : {Mode::kToken, Mode::kWholeWord, Mode::kNgram}) {
    Params p;
    p.seed = gen();
    p.mode = mode;
    p.rate = 0.97;
    p.max_predictions = 1 << 20;
    p.mask_token_id = 4;
    p.random_low = 5;
    p.random_high = 7;
    check_against_core(random_batch(gen, 4, 700, 0.5, 0), p);
  }
}

}  // namespace

int main() {
  test_matches_core();
  test_long_shuffles();
  std::printf("test_wwm_kernel_host: all checks passed\n");
  return 0;
}
