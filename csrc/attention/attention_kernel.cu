// Fused non-causal multi-head attention, forward and backward, over varlen batches with separate
// query and key layouts: the CUDA kernels of lub_fast::varlen_attention_{fwd,bwd} (spec:
// lub_fast/ops/attention.py).
//
// Algorithm: FlashAttention-2 (Dao, arXiv:2307.08691). The forward streams key/value tiles past a
// query tile with an online softmax and writes out and lse = log-sum-exp of the scaled scores;
// the backward recomputes p = exp(s - lse) per (key tile, query tile), keeps dK and dV of its key
// tile in registers and adds dQ into an fp32 buffer with atomics; with Layout::deterministic it
// leaves dQ to a second pass over query tiles (FlashAttention-2's split of the work, no atomics).
//
// Mapping.
// - Forward: one CTA per (query tile of kBlockM = 16 * kWarps rows, head, sequence); warp w owns
//   query rows 16w .. 16w + 15 of the tile. Key/value tiles of kBlockN rows are loaded with
//   cp.async into single shared buffers: V(n) is loaded while S = Q K(n)^T runs, K(n + 1) while
//   the softmax and O += P V(n) run. Q is re-read from shared memory with ldmatrix per tile.
// - Backward: one CTA per (key tile of kBlockN = 16 * kWarps keys, head, sequence); warp w owns
//   keys 16w .. 16w + 15 and computes S^T = K Q^T and dP^T = V dO^T for them, so that P^T and dS^T
//   are already in the A-operand layout of dV += P^T dO and dK += dS^T Q. Query tiles (Q, dO, lse,
//   D = rowsum(dO * O)) are double-buffered; dS^T goes through shared memory for dQ = dS K, which
//   the warps split by (16-row query slab, head-dim columns) and add to dq_accum with fp32 atomics.
//   A pre-kernel computes D, a post-kernel converts dq_accum * scale to the input dtype.
// - Deterministic backward (Layout::deterministic): the key-tile kernel computes dK and dV only,
//   and a dQ kernel mapped like the forward (one CTA per query tile of kBlockM = 16 * kWarps rows,
//   warp w owning rows 16w .. 16w + 15) walks the key tiles of its sequence in order: S = Q K^T and
//   dP = dO V^T, p = exp(s - lse) from the saved lse, dropout, dS, then dQ += dS K in registers,
//   written once as dQ * scale in the input dtype. K and V tiles are double-buffered. Every output
//   element is summed by one thread in a fixed order, so dq, dk and dv are bit-identical across
//   runs; the dQ pass costs 3 of the backward's 5 matrix products again (recomputing S and dP)
//   and a second Philox draw per probability, and needs no fp32 dQ buffer.
// - Tensor cores: mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate, sm_80+), operands via
//   ldmatrix(.trans) from XOR-swizzled shared tiles (16-byte chunk c of row r stored at chunk
//   c ^ (r & 7), c ^ ((r >> 1) & 3) for 4-chunk rows, c ^ ((r >> 2) & 1) for 2-chunk rows), so
//   ldmatrix and fragment stores are free of bank conflicts without padding.
// - Dropout: the Philox4x32-10 contract of attention.py. Per 8-key column tile, each lane runs one
//   Philox call (a 4-key group of one query row) and the keep bits are exchanged with shuffles:
//   in the forward lanes 2i, 2i + 1 swap bits; in the backward each lane gathers 4 nibbles. A
//   query's row counter is q_positions[row] when given, else its position in its sequence; each
//   query tile stages them in shared memory (next to lse in the backward).
//
// Limits: head_dim 32, 64 or 128; fp16 or bf16; out, dout contiguous [Tq, H, D]; q [Tq, H, D] and
// k, v [Tk, H, D] with contiguous heads and one row stride (views of a [T, 3, H, D] projection
// need no copy); all 16-byte aligned; T * H * D < 2**63, H and the batch at
// most 65535 (grid y, z); sequences of any length (query/key tiles past the end are zero-filled in
// shared memory and never read from global memory; keys past the end are masked with -inf); queries
// of a sequence without keys get zeros and lse = +inf, keys of a sequence without queries zero
// gradients. Accumulation: scores, softmax statistics, O,
// dK, dV and dQ in fp32; P and dS are rounded to the input dtype for the tensor-core products, as
// in FlashAttention. The default backward's dQ atomics make dq's rounding order vary between runs
// (attention_cuda.cpp alerts under torch.use_deterministic_algorithms(True) if that path is asked
// for); the deterministic backward has no atomics. Host side: the dynamic
// shared-memory limit is raised once per kernel and device (cuda::reserve_dynamic_smem).
#include "attention/attention_kernel.h"

#include <cmath>
#include <cstdint>

#include "attention/attention_dropout.h"
#include "common/cuda_utils.cuh"
#include "common/philox.h"

namespace lub_fast {
namespace attention_cuda {
namespace {

using cuda::cp_async_16;
using cuda::cp_async_commit;
using cuda::cp_async_wait_all;
using cuda::ldmatrix_x4;
using cuda::ldmatrix_x4_trans;
using cuda::Mma;
using cuda::pack2;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  void* o;  // forward output
  float* lse;
  const float* lse_in;
  const float* drow;
  float* dq_accum;  // atomic backward only
  void* dq;         // deterministic backward only (the atomic one writes dq in its post-kernel)
  void* dk;
  void* dv;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* q_positions;  // dropout row of each query, or null (its position in its sequence)
  int64_t rows_q;              // Tq
  int64_t rows_k;              // Tk
  int qkv_stride;  // elements between consecutive rows of q, k, v (out, dout, dq, dk, dv: heads * D)
  int heads;
  float scale;       // natural-log scale of the scores
  float scale_log2;  // scale * log2(e)
  bool dropout;
  uint32_t threshold;
  float dropout_factor;  // 1 / (1 - p), 1 without dropout
  uint32_t seed_lo;
  uint32_t seed_hi;
  uint32_t offset;
};

// Swizzle of a row-major tile of kCols elements per row (kCols / 8 16-byte chunks: 2, 4, 8 or 16):
// the chunk index is XOR-ed with a function of the row such that any 8 consecutive rows put a given
// chunk into 8 distinct 16-byte bank groups.
template <int kCols>
__device__ __forceinline__ int swizzle_of(int row) {
  constexpr int kChunks = kCols / 8;
  static_assert(kChunks == 2 || kChunks == 4 || kChunks == 8 || kChunks == 16,
                "tile rows must hold 2, 4, 8 or 16 chunks");
  return kChunks >= 8 ? (row & 7) : kChunks == 4 ? ((row >> 1) & 3) : ((row >> 2) & 1);
}

// Element offset of (row, col) in a swizzled tile.
template <int kCols>
__device__ __forceinline__ int swz(int row, int col) {
  return row * kCols + ((((col >> 3) ^ swizzle_of<kCols>(row))) << 3) + (col & 7);
}

// The same offset split into a lane part and a tile part: lane_off(r, c) once per thread, then
// at(lane_off, row0, col0) = swz(row0 + r, col0 + c) for row0 % 8 == 0, col0 % 8 == 0 and
// (col0 / 8) & (c / 8) == 0 (so that adding the chunk indices equals XOR-ing them): the swizzle
// depends on r only, and the tile's column becomes one XOR with a compile-time constant.
template <int kCols>
__device__ __forceinline__ int lane_off(int r, int c) {
  return swz<kCols>(r, c);
}
template <int kCols>
__device__ __forceinline__ int at(int lane, int row0, int col0) {
  return row0 * kCols + (lane ^ col0);
}

// This lane's ldmatrix row/column: pattern A for A operands and transposed B operands, pattern B
// for non-transposed B operands (see the fragment notes in common/cuda_utils.cuh), C for its
// accumulator element (g, 2t).
template <int kCols>
__device__ __forceinline__ int frag_a(int lane) {
  return lane_off<kCols>((lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8);
}
template <int kCols>
__device__ __forceinline__ int frag_b(int lane) {
  return lane_off<kCols>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
}
template <int kCols>
__device__ __forceinline__ int frag_c(int lane) {
  return lane_off<kCols>(lane / 4, 2 * (lane % 4));
}

// cp.async of a [kRows, kCols] tile whose row r starts at src + r * stride; rows >= valid are
// zero-filled without a global read (`base` is a valid address for those copies).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t stride, int valid, const T* base) {
  constexpr int kChunks = kCols / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    const bool ok = r < valid;
    cp_async_16(smem + swz<kCols>(r, c), ok ? src + r * stride + c : base, ok);
  }
}

// The rows of one sequence in one layout (queries or keys).
struct Seq {
  int row_base;  // first row (T < 2**31: attention_cuda.cpp checks it); 32 bits save registers
  int len;       // rows
};

__device__ __forceinline__ Seq sequence(const int32_t* cu_seqlens, int b, int64_t rows) {
  const int start = cu_seqlens[b];
  const int end = cu_seqlens[b + 1];
  // The host checks cu_seqlens (attention.py, check_cu_seqlens); a kernel that met other bounds
  // anyway would skip the sequence.
  const bool ok = 0 <= start && start <= end && end <= rows;
  return Seq{start, ok ? end - start : 0};
}

// Sequence b's query rows into seqs[0] and key rows into seqs[1] (shared memory), for every thread
// of the CTA on return.
__device__ __forceinline__ void load_sequences(Seq* seqs, const Params& p, int b) {
  if (threadIdx.x == 0) {
    seqs[0] = sequence(p.cu_seqlens_q, b, p.rows_q);
    seqs[1] = sequence(p.cu_seqlens_k, b, p.rows_k);
  }
  __syncthreads();
}

// Dropout row counter of query i of a sequence whose first query row is row_base.
__device__ __forceinline__ uint32_t dropout_row(const Params& p, int row_base, int i) {
  return static_cast<uint32_t>(p.q_positions != nullptr ? p.q_positions[static_cast<int64_t>(row_base) + i] : i);
}

// The dropout rows of the query tile starting at row m0 of sequence sq (0 past its end or without
// dropout), into rows[kBlockM] in shared memory.
template <int kBlockM, int kThreads>
__device__ __forceinline__ void load_dropout_rows(uint32_t* rows, const Params& p, const Seq& sq, int m0) {
  for (int i = static_cast<int>(threadIdx.x); i < kBlockM; i += kThreads) {
    rows[i] = p.dropout && m0 + i < sq.len ? dropout_row(p, sq.row_base, m0 + i) : 0u;
  }
}

// 16-byte stores of a warp's 16 staged rows (tile rows 16 warp .. 16 warp + 15 of a swizzled
// [*, D] tile) to rows first .. first + 15 of dst (row stride `stride`); rows >= len are not written.
template <int D, typename T>
__device__ __forceinline__ void store_warp_rows(T* dst, int64_t stride, const T* tile, int warp, int lane, int first,
                                                int len) {
  constexpr int kDT = D / 8;
#pragma unroll
  for (int it = 0; it < 16 * kDT / 32; ++it) {
    const int i = it * 32 + lane;
    const int r = i / kDT;
    const int c = (i % kDT) * 8;
    if (first + r < len) {
      *reinterpret_cast<uint4*>(dst + (first + r) * stride + c) =
          *reinterpret_cast<const uint4*>(tile + swz<D>(16 * warp + r, c));
    }
  }
}

// acc += P B for one warp: P its 16 x kBlockN fp32 accumulator tiles p (rounded to T, they are the A
// fragments: tiles 2kk, 2kk + 1 hold columns 16kk .. 16kk + 15), B rows 0 .. kBlockN - 1 of the
// swizzled [*, D] tile `tile` through transposed ldmatrix (offA = frag_a<D>(lane)).
template <typename T, int D, int kBlockN>
__device__ __forceinline__ void mma_p_tile(float (&acc)[D / 8][4], const float (&p)[kBlockN / 8][4], const T* tile,
                                           int offA) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, tile + at<D>(offA, 16 * kk, 16 * dd));
      Mma<T>::run(acc[2 * dd], a, b[0], b[1]);
      Mma<T>::run(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// s = A1 B1^T and t = A2 B2^T for one warp in one loop over D: A rows 16 warp .. 16 warp + 15 of
// the swizzled [*, D] tiles a1, a2 (offA = frag_a<D>(lane)), B rows 0 .. kCols - 1 of b1, b2 (offB =
// frag_b<D>(lane)); s and t are the warp's [16, kCols] fp32 accumulator tiles. Rolled at D = 128:
// unrolled it preloads too many fragments and spills.
template <typename T, int D, int kCols>
__device__ __forceinline__ void mma_two_abt(float (&s)[kCols / 8][4], float (&t)[kCols / 8][4], const T* a1,
                                            const T* a2, const T* b1, const T* b2, int warp, int offA, int offB) {
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = t[j][e] = 0.0f;
  }
#pragma unroll(D == 128 ? 1 : D / 16)
  for (int kk = 0; kk < D / 16; ++kk) {
    const int a_off = at<D>(offA, 16 * warp, 16 * kk);
    uint32_t x1[4];
    uint32_t x2[4];
    ldmatrix_x4(x1, a1 + a_off);
    ldmatrix_x4(x2, a2 + a_off);
#pragma unroll
    for (int nn = 0; nn < kCols / 16; ++nn) {
      const int b_off = at<D>(offB, 16 * nn, 16 * kk);
      uint32_t y1[4];
      uint32_t y2[4];
      ldmatrix_x4(y1, b1 + b_off);
      ldmatrix_x4(y2, b2 + b_off);
      Mma<T>::run(s[2 * nn], x1, y1[0], y1[1]);
      Mma<T>::run(s[2 * nn + 1], x1, y1[2], y1[3]);
      Mma<T>::run(t[2 * nn], x2, y2[0], y2[1]);
      Mma<T>::run(t[2 * nn + 1], x2, y2[2], y2[3]);
    }
  }
}

__device__ __forceinline__ philox::Words philox_at(const Params& p, uint32_t group, uint32_t row,
                                                   uint32_t stream) {
  return philox::philox4x32_10(group, row, stream, p.offset, p.seed_lo, p.seed_hi);
}

// ------------------------------------------------------------------------------------ forward

template <typename T, int D, int kBlockM, int kBlockN, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1)
    attention_fwd_kernel(const __grid_constant__ Params p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kNT = kBlockN / 8;  // score column tiles per warp
  constexpr int kDT = D / 8;        // output column tiles per warp
  static_assert(kBlockM == 16 * kWarps, "one 16-row query slab per warp");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ uint32_t sRow[kBlockM];  // the query tile's dropout rows
  // The sequence's query and key rows, read from shared memory where used: held in registers
  // across the key loop they spill at D = 128.
  __shared__ Seq sSeq[2];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * D;
  T* sV = sK + kBlockN * D;

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  load_sequences(sSeq, p, b);
  const Seq& sq = sSeq[0];
  const Seq& sk = sSeq[1];
  const int64_t stride = static_cast<int64_t>(p.heads) * D;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  // Query row r of this sequence and head: (sq.row_base + r) * in_stride + h * D in q, with stride
  // in out; key row r: (sk.row_base + r) * in_stride + h * D in k, v (recomputed per tile rather
  // than held: more 64-bit bases would spill at D = 128; one stride for all three, as separate
  // ones would hold a second set of per-thread tile offsets).
  const int in_stride = p.qkv_stride;
  const uint32_t stream = static_cast<uint32_t>(b) * p.heads + h;
  const int n_blocks = (sk.len + kBlockN - 1) / kBlockN;
  const int offA = frag_a<D>(lane);
  const int offB = frag_b<D>(lane);
  const int offC = frag_c<D>(lane);

  for (int m_block = blockIdx.x; m_block * kBlockM < sq.len; m_block += gridDim.x) {
    const int m0 = m_block * kBlockM;
    load_tile<kBlockM, D, kThreads>(sQ, q + (static_cast<int64_t>(sq.row_base) + m0) * in_stride + h * D, in_stride,
                                    sq.len - m0, q);
    load_tile<kBlockN, D, kThreads>(sK, k + static_cast<int64_t>(sk.row_base) * in_stride + h * D, in_stride, sk.len,
                                    k);
    cp_async_commit();
    // Read after the first __syncthreads of the key loop; the previous tile's readers are past the
    // one at the end of the tile loop.
    load_dropout_rows<kBlockM, kThreads>(sRow, p, sq, m0);

    float acc_o[kDT][4];
#pragma unroll
    for (int j = 0; j < kDT; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};

    for (int n_block = 0; n_block < n_blocks; ++n_block) {
      const int n0 = n_block * kBlockN;
      cp_async_wait_all();
      __syncthreads();  // K(n) (and Q) landed; every warp is done reading V(n - 1)
      load_tile<kBlockN, D, kThreads>(sV, v + (static_cast<int64_t>(sk.row_base) + n0) * in_stride + h * D, in_stride,
                                      sk.len - n0, v);
      cp_async_commit();

      float s[kNT][4];
#pragma unroll
      for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll(D == 128 ? 1 : D / 16)  // unrolled at D = 128 it preloads too many fragments and spills
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, sQ + at<D>(offA, 16 * warp, 16 * kk));
#pragma unroll
        for (int nn = 0; nn < kBlockN / 16; ++nn) {
          uint32_t bk[4];
          ldmatrix_x4(bk, sK + at<D>(offB, 16 * nn, 16 * kk));
          Mma<T>::run(s[2 * nn], a, bk[0], bk[1]);
          Mma<T>::run(s[2 * nn + 1], a, bk[2], bk[3]);
        }
      }

      cp_async_wait_all();
      __syncthreads();  // V(n) landed; every warp is done reading K(n)
      if (n_block + 1 < n_blocks) {
        load_tile<kBlockN, D, kThreads>(sK, k + (static_cast<int64_t>(sk.row_base) + n0 + kBlockN) * in_stride + h * D,
                                        in_stride, sk.len - n0 - kBlockN, k);
        cp_async_commit();
      }

      // Scaled scores in log2 units; -inf at keys past the end.
      const bool edge = n0 + kBlockN > sk.len;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] *= p.scale_log2;
          if (edge) {
            const int key = n0 + 8 * j + 2 * t + (e & 1);
            if (key >= sk.len) s[j][e] = -INFINITY;
          }
        }
      }

      // Online softmax: rows g (e = 0, 1) and g + 8 (e = 2, 3) of the warp's slab; the four
      // lanes of a quad hold one row's columns.
      float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      }
      float shift[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        shift[r] = mx[r] == -INFINITY ? 0.0f : mx[r];  // a row with no key yet: keep p = 0, not NaN
        const float alpha = exp2f(row_max[r] - shift[r]);
        row_max[r] = mx[r];
        row_sum[r] *= alpha;
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          acc_o[j][2 * r] *= alpha;
          acc_o[j][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] = exp2f(s[j][e] - shift[e / 2]);
          row_sum[e / 2] += s[j][e];
        }
      }

      if (p.dropout) {  // lane mapping: attention_dropout.h
        const Draw draw = fwd_draw(lane);
        const uint32_t row = sRow[16 * warp + draw.query];
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const uint32_t group = static_cast<uint32_t>((n0 + 8 * j) / 4 + draw.group);
          const uint32_t mine = philox::keep_bits(philox_at(p, group, row, stream), p.threshold);
          const uint32_t partner = __shfl_xor_sync(0xffffffffu, mine, 1);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!fwd_keep(lane, e, mine, partner)) s[j][e] = 0.0f;
          }
        }
      }

      mma_p_tile<T, D, kBlockN>(acc_o, s, sV, offA);  // O += P V(n)
    }

    // Finalise rows g and g + 8: quad-reduce the sums, normalise, write lse and stage O in sQ (the
    // warp's own rows, which no other warp reads) for 16-byte stores.
    float inv[2];
    const int64_t lbase = h * p.rows_q + sq.row_base;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = m0 + 16 * warp + g + 8 * r;
      const bool real = i < sq.len && l > 0.0f;  // l = 0: a sequence without keys
      inv[r] = real ? p.dropout_factor / l : 0.0f;
      if (t == 0 && i < sq.len) p.lse[lbase + i] = real ? (row_max[r] + log2f(l)) * kLn2 : INFINITY;
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float x = inv[r] == 0.0f ? 0.0f : acc_o[j][2 * r] * inv[r];
        const float y = inv[r] == 0.0f ? 0.0f : acc_o[j][2 * r + 1] * inv[r];
        *reinterpret_cast<uint32_t*>(sQ + at<D>(offC, 16 * warp + 8 * r, 8 * j)) = pack2<T>(x, y);
      }
    }
    __syncwarp();
    store_warp_rows<D>(static_cast<T*>(p.o) + static_cast<int64_t>(sq.row_base) * stride + h * D, stride, sQ, warp,
                       lane, m0 + 16 * warp, sq.len);
    __syncthreads();  // sQ and sK are reloaded by the next query tile
  }
}

// ----------------------------------------------------------------------------------- backward

// drow[row, head] = <dout, out> in fp32; D / 8 consecutive lanes per (row, head), 16 bytes each.
// Each lane also zeroes its 8 elements of dq_accum (the same [rows, heads, D] index) when there is
// one (the atomic backward), so the main kernel's atomics start from 0 without a separate memset.
template <typename T, int D>
__global__ void attention_bwd_drow_kernel(const __grid_constant__ Params p, float* drow) {
  constexpr int kLanes = D / 8;
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int c = threadIdx.x % kLanes;
  const bool valid = pair < p.rows_q * p.heads;
  float sum = 0.0f;
  if (valid) {
    if (p.dq_accum != nullptr) {
      float4* dq = reinterpret_cast<float4*>(p.dq_accum + pair * D + c * 8);
      dq[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      dq[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + pair * D + c * 8);
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + pair * D + c * 8);
    const uint32_t av[4] = {a.x, a.y, a.z, a.w};
    const uint32_t ov[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = cuda::unpack2<T>(av[i]);
      const float2 y = cuda::unpack2<T>(ov[i]);
      sum = fmaf(x.x, y.x, sum);
      sum = fmaf(x.y, y.y, sum);
    }
  }
#pragma unroll
  for (int m = kLanes / 2; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (valid && c == 0) {
    const int64_t row = pair / p.heads;
    const int64_t h = pair % p.heads;
    drow[h * p.rows_q + row] = sum;
  }
}

// dq = dq_accum * scale in the input dtype, 8 elements per thread and step.
template <typename T>
__global__ void attention_bwd_dq_kernel(const float* __restrict__ dq_accum, T* __restrict__ dq, int64_t n8,
                                        float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(dq_accum)[2 * i];
    const float4 c = reinterpret_cast<const float4*>(dq_accum)[2 * i + 1];
    uint4 r;
    r.x = pack2<T>(a.x * scale, a.y * scale);
    r.y = pack2<T>(a.z * scale, a.w * scale);
    r.z = pack2<T>(c.x * scale, c.y * scale);
    r.w = pack2<T>(c.z * scale, c.w * scale);
    reinterpret_cast<uint4*>(dq)[i] = r;
  }
}

__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// kAtomicDq: also dQ += dS K into dq_accum with atomics (the default backward); without, dK and dV
// only (the deterministic backward, whose dQ is attention_bwd_dq_pass_kernel).
template <typename T, int D, int kBlockM, int kBlockN, int kWarps, bool kAtomicDq>
__global__ void __launch_bounds__(kWarps * 32)
    attention_bwd_kernel(const __grid_constant__ Params p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kMT = kBlockM / 8;  // query column tiles of S^T per warp
  constexpr int kDT = D / 8;
  constexpr int kSlabs = kBlockM / 16;             // 16-row query slabs of dQ
  constexpr int kWarpsPerSlab = kWarps / kSlabs;   // warps sharing a slab's head-dim columns
  constexpr int kQCols = D / kWarpsPerSlab;        // dQ columns per warp
  static_assert(kBlockN == 16 * kWarps, "one 16-key slab per warp");
  static_assert(kWarps % kSlabs == 0 && kQCols % 16 == 0, "dQ tiles must divide among the warps");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * D;
  T* sQ = sV + kBlockN * D;         // [2][kBlockM * D]
  T* sdO = sQ + 2 * kBlockM * D;    // [2][kBlockM * D]
  T* sdS = sdO + 2 * kBlockM * D;   // [kBlockN * kBlockM], dS^T (kAtomicDq only)
  float* sLse = reinterpret_cast<float*>(sdS + (kAtomicDq ? kBlockN * kBlockM : 0));  // [2][kBlockM], log2 units
  float* sDrow = sLse + 2 * kBlockM;                                  // [2][kBlockM]
  uint32_t* sRow = reinterpret_cast<uint32_t*>(sDrow + 2 * kBlockM);  // [2][kBlockM], dropout rows

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const Seq sq = sequence(p.cu_seqlens_q, b, p.rows_q);
  const Seq sk = sequence(p.cu_seqlens_k, b, p.rows_k);
  const int64_t stride = static_cast<int64_t>(p.heads) * D;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const int64_t q_head_base = static_cast<int64_t>(sq.row_base) * stride + h * D;  // in dout, dq_accum
  const int64_t in_stride = p.qkv_stride;
  const int64_t q_base = static_cast<int64_t>(sq.row_base) * in_stride + h * D;  // in q
  // Key rows are addressed from sk.row_base where used (per key tile), not held: at D = 128 the
  // registers are full.
  const int64_t lbase = h * p.rows_q + sq.row_base;
  const uint32_t stream = static_cast<uint32_t>(b) * p.heads + h;
  const int m_blocks = (sq.len + kBlockM - 1) / kBlockM;
  const int offA = frag_a<D>(lane);
  const int offB = frag_b<D>(lane);
  const int offC = frag_c<D>(lane);
  const int offS = frag_c<kBlockM>(lane);   // dS^T store
  const int offSB = frag_b<kBlockM>(lane);  // dS load

  auto load_query_tile = [&](int m_block, int buf) {
    const int m0 = m_block * kBlockM;
    load_tile<kBlockM, D, kThreads>(sQ + buf * kBlockM * D, q + q_base + m0 * in_stride, in_stride, sq.len - m0,
                                    q);
    load_tile<kBlockM, D, kThreads>(sdO + buf * kBlockM * D, dout + q_head_base + m0 * stride, stride,
                                    sq.len - m0, dout);
    cp_async_commit();
    for (int i = tid; i < kBlockM; i += kThreads) {
      const bool ok = m0 + i < sq.len;
      sLse[buf * kBlockM + i] = ok ? p.lse_in[lbase + m0 + i] * kLog2e : INFINITY;
      sDrow[buf * kBlockM + i] = ok ? p.drow[lbase + m0 + i] : 0.0f;
      sRow[buf * kBlockM + i] = ok && p.dropout ? dropout_row(p, sq.row_base, m0 + i) : 0u;
    }
  };

  for (int n_block = blockIdx.x; n_block * kBlockN < sk.len; n_block += gridDim.x) {
    const int n0 = n_block * kBlockN;
    const int64_t kv_tile = (static_cast<int64_t>(sk.row_base) + n0) * in_stride + h * D;  // in k, v
    load_tile<kBlockN, D, kThreads>(sK, k + kv_tile, in_stride, sk.len - n0, k);
    load_tile<kBlockN, D, kThreads>(sV, v + kv_tile, in_stride, sk.len - n0, v);
    load_query_tile(0, 0);  // a sequence without queries loads zeros and runs no query tile: dK = dV = 0

    const bool key_ok[2] = {n0 + 16 * warp + g < sk.len, n0 + 16 * warp + g + 8 < sk.len};
    float acc_dk[kDT][4];
    float acc_dv[kDT][4];
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.0f;
    }

    for (int m_block = 0; m_block < m_blocks; ++m_block) {
      const int buf = m_block & 1;
      const int m0 = m_block * kBlockM;
      cp_async_wait_all();
      __syncthreads();  // tile m landed; every warp is done with tile m - 1 (its buffers and sdS)
      if (m_block + 1 < m_blocks) load_query_tile(m_block + 1, buf ^ 1);
      const T* bQ = sQ + buf * kBlockM * D;
      const T* bdO = sdO + buf * kBlockM * D;
      const float* bLse = sLse + buf * kBlockM;
      const float* bDrow = sDrow + buf * kBlockM;
      const uint32_t* bRow = sRow + buf * kBlockM;

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's kBlockM queries.
      float s[kMT][4];
      float dp[kMT][4];
      mma_two_abt<T, D, kBlockM>(s, dp, sK, sV, bQ, bdO, warp, offA, offB);

      // p = exp(s - lse) (0 at keys past the end; lse = +inf at queries past the end), dropout,
      // dS = p * (dP_dropped - D). Element e of tile j: key g + 8 (e / 2), query 8j + 2t + (e & 1).
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        uint32_t keep[4] = {1u, 1u, 1u, 1u};
        if (p.dropout) {  // lane mapping: attention_dropout.h
          const Draw draw = bwd_draw(lane);
          const uint32_t group = static_cast<uint32_t>((n0 + 16 * warp) / 4 + draw.group);
          const uint32_t row = bRow[8 * j + draw.query];
          const uint32_t mine = philox::keep_bits(philox_at(p, group, row, stream), p.threshold);
#pragma unroll
          for (int e = 0; e < 4; ++e) keep[e] = bwd_keep(lane, __shfl_sync(0xffffffffu, mine, bwd_source(lane, e)));
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);
          const float pv = key_ok[e / 2] ? exp2f(s[j][e] * p.scale_log2 - bLse[col]) : 0.0f;
          const float dpv = keep[e] ? dp[j][e] * p.dropout_factor : 0.0f;
          dp[j][e] = pv * (dpv - bDrow[col]);
          s[j][e] = keep[e] ? pv * p.dropout_factor : 0.0f;
        }
      }

      // dV += P_dropped^T dO and dK += dS^T Q (k = the tile's queries).
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        const uint32_t ap[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        const uint32_t ads[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                 pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                 pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          const int b_off = at<D>(offA, 16 * kk, 16 * dd);
          uint32_t bo[4];
          uint32_t bq[4];
          ldmatrix_x4_trans(bo, bdO + b_off);
          ldmatrix_x4_trans(bq, bQ + b_off);
          Mma<T>::run(acc_dv[2 * dd], ap, bo[0], bo[1]);
          Mma<T>::run(acc_dv[2 * dd + 1], ap, bo[2], bo[3]);
          Mma<T>::run(acc_dk[2 * dd], ads, bq[0], bq[1]);
          Mma<T>::run(acc_dk[2 * dd + 1], ads, bq[2], bq[3]);
        }
        if (kAtomicDq) {  // dS^T rows (keys) g, g + 8 of the warp, columns (queries) 16kk + 2t (+8).
          *reinterpret_cast<uint32_t*>(sdS + at<kBlockM>(offS, 16 * warp, 16 * kk)) = ads[0];
          *reinterpret_cast<uint32_t*>(sdS + at<kBlockM>(offS, 16 * warp + 8, 16 * kk)) = ads[1];
          *reinterpret_cast<uint32_t*>(sdS + at<kBlockM>(offS, 16 * warp, 16 * kk + 8)) = ads[2];
          *reinterpret_cast<uint32_t*>(sdS + at<kBlockM>(offS, 16 * warp + 8, 16 * kk + 8)) = ads[3];
        }
      }
      if (!kAtomicDq) continue;
      __syncthreads();  // dS^T of all keys is in sdS

      // dQ[slab rows, warp's columns] += dS K over the tile's keys; A = dS from dS^T (transposed
      // ldmatrix), B = K (transposed ldmatrix).
      const int slab = warp / kWarpsPerSlab;
      const int col0 = (warp % kWarpsPerSlab) * kQCols;
      float dq[kQCols / 8][4];
#pragma unroll
      for (int j = 0; j < kQCols / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
#pragma unroll(D == 128 ? 1 : kBlockN / 16)
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, sdS + at<kBlockM>(offSB, 16 * kk, 16 * slab));
#pragma unroll
        for (int dd = 0; dd < kQCols / 16; ++dd) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK + at<D>(offA, 16 * kk, col0 + 16 * dd));
          Mma<T>::run(dq[2 * dd], a, bk[0], bk[1]);
          Mma<T>::run(dq[2 * dd + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = m0 + 16 * slab + g + 8 * r;
        if (i < sq.len) {
          float* dst = p.dq_accum + q_head_base + i * stride + col0 + 2 * t;
#pragma unroll
          for (int j = 0; j < kQCols / 8; ++j) atomic_add2(dst + 8 * j, dq[j][2 * r], dq[j][2 * r + 1]);
        }
      }
    }

    // Stage dK * scale and dV in the warp's own rows of sK / sV, then 16-byte stores.
    __syncthreads();  // every warp is done reading sK (dQ) and sV
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = at<D>(offC, 16 * warp + 8 * r, 8 * j);
        *reinterpret_cast<uint32_t*>(sK + off) = pack2<T>(acc_dk[j][2 * r] * p.scale, acc_dk[j][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(sV + off) = pack2<T>(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
      }
    }
    __syncwarp();
    T* dk = static_cast<T*>(p.dk);
    T* dv = static_cast<T*>(p.dv);
#pragma unroll
    for (int it = 0; it < 16 * kDT / 32; ++it) {
      const int i = it * 32 + lane;
      const int r = i / kDT;
      const int c = (i % kDT) * 8;
      const int row = n0 + 16 * warp + r;
      if (row < sk.len) {
        const int off = swz<D>(16 * warp + r, c);
        const int64_t out = (static_cast<int64_t>(sk.row_base) + row) * stride + h * D + c;  // in dk, dv
        *reinterpret_cast<uint4*>(dk + out) = *reinterpret_cast<const uint4*>(sK + off);
        *reinterpret_cast<uint4*>(dv + out) = *reinterpret_cast<const uint4*>(sV + off);
      }
    }
    __syncthreads();  // sK, sV are reloaded by the next key tile
  }
}

// The deterministic backward's dQ: one CTA per (query tile, head, sequence), warp w owning query rows
// 16w .. 16w + 15 (the forward's mapping), walking the sequence's key tiles in order. K(n + 1) and
// V(n + 1) load into the other buffer while tile n computes. p, dropout and dS are those of
// attention_bwd_kernel (the same expressions), so both backwards see the same rounded dS.
template <typename T, int D, int kBlockM, int kBlockN, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1)
    attention_bwd_dq_pass_kernel(const __grid_constant__ Params p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kNT = kBlockN / 8;  // score column tiles per warp
  constexpr int kDT = D / 8;        // dQ column tiles per warp
  static_assert(kBlockM == 16 * kWarps, "one 16-row query slab per warp");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ uint32_t sRow[kBlockM];  // the query tile's dropout rows
  __shared__ Seq sSeq[2];             // as in the forward: in registers they would compete with dQ
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * D;
  T* sK = sdO + kBlockM * D;     // [2][kBlockN * D]
  T* sV = sK + 2 * kBlockN * D;  // [2][kBlockN * D]

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  load_sequences(sSeq, p, b);
  const Seq& sq = sSeq[0];
  const Seq& sk = sSeq[1];
  const int64_t stride = static_cast<int64_t>(p.heads) * D;  // dout, dq
  const int in_stride = p.qkv_stride;                         // q, k, v
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const int64_t lbase = h * p.rows_q + sq.row_base;
  const uint32_t stream = static_cast<uint32_t>(b) * p.heads + h;
  const int n_blocks = (sk.len + kBlockN - 1) / kBlockN;
  const int offA = frag_a<D>(lane);
  const int offB = frag_b<D>(lane);
  const int offC = frag_c<D>(lane);

  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN;
    const int64_t tile = (static_cast<int64_t>(sk.row_base) + n0) * in_stride + h * D;
    load_tile<kBlockN, D, kThreads>(sK + buf * kBlockN * D, k + tile, in_stride, sk.len - n0, k);
    load_tile<kBlockN, D, kThreads>(sV + buf * kBlockN * D, v + tile, in_stride, sk.len - n0, v);
  };

  for (int m_block = blockIdx.x; m_block * kBlockM < sq.len; m_block += gridDim.x) {
    const int m0 = m_block * kBlockM;
    const int64_t q_row = static_cast<int64_t>(sq.row_base) + m0;
    load_tile<kBlockM, D, kThreads>(sQ, q + q_row * in_stride + h * D, in_stride, sq.len - m0, q);
    load_tile<kBlockM, D, kThreads>(sdO, dout + q_row * stride + h * D, stride, sq.len - m0, dout);
    if (n_blocks > 0) load_kv(0, 0);
    cp_async_commit();
    load_dropout_rows<kBlockM, kThreads>(sRow, p, sq, m0);
    // Rows g and g + 8 of the warp's slab: lse in log2 units (+inf past the end, so p = 0) and D.
    float lse2[2];
    float drow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = m0 + 16 * warp + g + 8 * r;
      lse2[r] = i < sq.len ? p.lse_in[lbase + i] * kLog2e : INFINITY;
      drow[r] = i < sq.len ? p.drow[lbase + i] : 0.0f;
    }

    float acc_dq[kDT][4];
#pragma unroll
    for (int j = 0; j < kDT; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.0f;

    for (int n_block = 0; n_block < n_blocks; ++n_block) {
      const int buf = n_block & 1;
      const int n0 = n_block * kBlockN;
      cp_async_wait_all();
      __syncthreads();  // K(n), V(n) (and Q, dO, sRow) landed; every warp is done with tile n - 1
      if (n_block + 1 < n_blocks) {
        load_kv(n_block + 1, buf ^ 1);
        cp_async_commit();
      }
      const T* bK = sK + buf * kBlockN * D;
      const T* bV = sV + buf * kBlockN * D;

      // S = Q K^T and dP = dO V^T for the warp's 16 queries and the tile's keys.
      float s[kNT][4];
      float dp[kNT][4];
      mma_two_abt<T, D, kBlockN>(s, dp, sQ, sdO, bK, bV, warp, offA, offB);

      // p = exp(s - lse) (0 at keys past the end), dropout, dS = p * (dP_dropped - D), in s.
      // Element e of tile j: query g + 8 (e / 2) of the warp's slab, key n0 + 8j + 2t + (e & 1).
      const bool edge = n0 + kBlockN > sk.len;
      const Draw draw = fwd_draw(lane);  // lane mapping: attention_dropout.h
      const uint32_t row = sRow[16 * warp + draw.query];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        uint32_t mine = 0u;
        uint32_t partner = 0u;
        if (p.dropout) {
          const uint32_t group = static_cast<uint32_t>((n0 + 8 * j) / 4 + draw.group);
          mine = philox::keep_bits(philox_at(p, group, row, stream), p.threshold);
          partner = __shfl_xor_sync(0xffffffffu, mine, 1);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool key_ok = !edge || n0 + 8 * j + 2 * t + (e & 1) < sk.len;
          const float pv = key_ok ? exp2f(s[j][e] * p.scale_log2 - lse2[e / 2]) : 0.0f;
          const bool keep = !p.dropout || fwd_keep(lane, e, mine, partner);
          const float dpv = keep ? dp[j][e] * p.dropout_factor : 0.0f;
          s[j][e] = pv * (dpv - drow[e / 2]);
        }
      }

      mma_p_tile<T, D, kBlockN>(acc_dq, s, bK, offA);  // dQ += dS K (K in V's role in the forward)
    }

    // Stage dQ * scale in the warp's own rows of sQ, then 16-byte stores. The wait and barrier
    // cover a sequence without keys, whose Q and dO copies were never waited for.
    cp_async_wait_all();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        *reinterpret_cast<uint32_t*>(sQ + at<D>(offC, 16 * warp + 8 * r, 8 * j)) =
            pack2<T>(acc_dq[j][2 * r] * p.scale, acc_dq[j][2 * r + 1] * p.scale);
      }
    }
    __syncwarp();
    store_warp_rows<D>(static_cast<T*>(p.dq) + static_cast<int64_t>(sq.row_base) * stride + h * D, stride, sQ, warp,
                       lane, m0 + 16 * warp, sq.len);
    __syncthreads();  // sQ, sdO and buffer 0 are reloaded by the next query tile
  }
}

// --------------------------------------------------------------------------------- launchers

template <int D>
struct Config;
// Forward: 4 warps x 16 query rows, 64-key tiles. Backward: 16 keys per warp; the query tile
// shrinks with D so that dK, dV (D fp32 per thread) plus S^T, dP^T (kBwdM fp32) fit in 255
// registers without spills (ptxas -v, nvcc 13.0, registers at D = 32/64/128: sm_80 fwd 146/191/248,
// bwd 215/243/255; sm_90a fwd 140/192/248, bwd 232/241/254; the deterministic backward's dK/dV
// kernel and dQ pass: sm_80 188/210/255 and 182/236/242, sm_90a 174/206/254 and 180/238/241). The
// forward's __launch_bounds__ has a
// minimum of 1 block per SM: without it ptxas held D = 64 at 168 registers and spilled once q, k, v
// got their own row stride (contiguous copies had given 127/165/252 at 2-3 blocks per SM; whether
// the lower occupancy costs more than the 3 copies it saves is for a GPU measurement). Separate
// query and key layouts cost the forward at D = 128 its spill-free budget until the sequence
// bounds moved to shared memory and its Q K^T loop stopped unrolling over D (a GPU measurement
// should say what the rolled loop costs).
// The deterministic backward's dQ pass: 4 warps x 16 query rows; its key tile holds S and dP (kDqN
// fp32 per thread) next to dQ (D / 2), so it shrinks at D = 128.
template <>
struct Config<32> {
  static constexpr int kFwdWarps = 4, kFwdN = 64;
  static constexpr int kBwdWarps = 4, kBwdM = 64;
  static constexpr int kDqWarps = 4, kDqN = 64;
};
template <>
struct Config<64> {
  static constexpr int kFwdWarps = 4, kFwdN = 64;
  static constexpr int kBwdWarps = 4, kBwdM = 32;
  static constexpr int kDqWarps = 4, kDqN = 64;
};
template <>
struct Config<128> {
  static constexpr int kFwdWarps = 4, kFwdN = 64;
  static constexpr int kBwdWarps = 8, kBwdM = 16;
  static constexpr int kDqWarps = 4, kDqN = 32;
};

Params make_params(const Layout& l) {
  Params p{};
  p.cu_seqlens_q = l.cu_seqlens_q;
  p.cu_seqlens_k = l.cu_seqlens_k;
  p.q_positions = l.q_positions;
  p.rows_q = l.rows_q;
  p.rows_k = l.rows_k;
  const int64_t packed = static_cast<int64_t>(l.heads) * l.head_dim;
  p.qkv_stride = static_cast<int>(l.qkv_stride > 0 ? l.qkv_stride : packed);
  p.heads = l.heads;
  p.scale = l.scale;
  p.scale_log2 = l.scale * kLog2e;
  const uint64_t threshold = philox::keep_threshold(l.dropout_p);
  // dropout_p below 2**-32 keeps every word (threshold 2**32); its factor 1 / (1 - p) is then 1.
  p.dropout = l.dropout_p > 0.0 && threshold <= 0xFFFFFFFFull;
  p.threshold = static_cast<uint32_t>(p.dropout ? threshold : 0);
  p.dropout_factor = l.dropout_p > 0.0 ? static_cast<float>(1.0 / (1.0 - l.dropout_p)) : 1.0f;
  p.seed_lo = static_cast<uint32_t>(l.seed & 0xFFFFFFFFull);
  p.seed_hi = static_cast<uint32_t>(l.seed >> 32);
  p.offset = l.offset;
  return p;
}

dim3 tile_grid(const Layout& l, int extent, int block) {
  const int tiles = (extent + block - 1) / block;
  return dim3(tiles > 0 ? tiles : 1, l.heads, l.batch);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, const Params& p) {
  LUB_FAST_CUDA_TRY(cuda::reserve_dynamic_smem(reinterpret_cast<const void*>(kernel), smem));
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t fwd(const Layout& l, Params p, cudaStream_t stream) {
  using C = Config<D>;
  constexpr int kM = 16 * C::kFwdWarps;
  const size_t smem = static_cast<size_t>(kM + 2 * C::kFwdN) * D * sizeof(T);
  return launch(attention_fwd_kernel<T, D, kM, C::kFwdN, C::kFwdWarps>, tile_grid(l, l.max_seqlen_q, kM),
                C::kFwdWarps * 32, smem,
                stream, p);
}

template <typename T, int D>
cudaError_t bwd(const Layout& l, Params p, float* drow, void* dq, cudaStream_t stream) {
  using C = Config<D>;
  constexpr int kN = 16 * C::kBwdWarps;
  constexpr int kM = C::kBwdM;
  const int64_t pairs = l.rows_q * l.heads;
  constexpr int kDrowThreads = 256;
  const int64_t drow_blocks = (pairs * (D / 8) + kDrowThreads - 1) / kDrowThreads;
  if (drow_blocks > 0) {  // Tq = 0 (keys only): no D, nothing to zero, no dq
    attention_bwd_drow_kernel<T, D><<<static_cast<unsigned>(drow_blocks), kDrowThreads, 0, stream>>>(p, drow);
    LUB_FAST_CUDA_TRY(cudaGetLastError());
  }
  p.drow = drow;
  const size_t stats = 6 * kM * sizeof(float);  // lse, D and dropout rows of two query tiles
  if (l.deterministic) {
    const size_t smem = static_cast<size_t>(2 * kN * D + 4 * kM * D) * sizeof(T) + stats;
    LUB_FAST_CUDA_TRY(launch(attention_bwd_kernel<T, D, kM, kN, C::kBwdWarps, false>,
                             tile_grid(l, l.max_seqlen_k, kN), C::kBwdWarps * 32, smem, stream, p));
    constexpr int kDqM = 16 * C::kDqWarps;
    const size_t dq_smem = static_cast<size_t>(2 * kDqM * D + 4 * C::kDqN * D) * sizeof(T);
    p.dq = dq;
    return launch(attention_bwd_dq_pass_kernel<T, D, kDqM, C::kDqN, C::kDqWarps>, tile_grid(l, l.max_seqlen_q, kDqM),
                  C::kDqWarps * 32, dq_smem, stream, p);
  }
  const size_t smem = static_cast<size_t>(2 * kN * D + 4 * kM * D + kN * kM) * sizeof(T) + stats;
  LUB_FAST_CUDA_TRY(launch(attention_bwd_kernel<T, D, kM, kN, C::kBwdWarps, true>, tile_grid(l, l.max_seqlen_k, kN),
                           C::kBwdWarps * 32, smem, stream, p));
  const int64_t n8 = pairs * D / 8;
  const int64_t dq_blocks = (n8 + 255) / 256 < 4096 ? (n8 + 255) / 256 : 4096;
  if (dq_blocks == 0) return cudaSuccess;
  attention_bwd_dq_kernel<T><<<static_cast<unsigned>(dq_blocks), 256, 0, stream>>>(p.dq_accum, static_cast<T*>(dq), n8,
                                                                                 p.scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_dim(const Layout& l, const Params& p, cudaStream_t stream) {
  switch (l.head_dim) {
    case 32: return fwd<T, 32>(l, p, stream);
    case 64: return fwd<T, 64>(l, p, stream);
    case 128: return fwd<T, 128>(l, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t bwd_dim(const Layout& l, const Params& p, float* drow, void* dq, cudaStream_t stream) {
  switch (l.head_dim) {
    case 32: return bwd<T, 32>(l, p, drow, dq, stream);
    case 64: return bwd<T, 64>(l, p, drow, dq, stream);
    case 128: return bwd<T, 128>(l, p, drow, dq, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_fwd(const Layout& layout, const void* q, const void* k, const void* v, void* out, float* lse,
                          cudaStream_t stream) {
  if (layout.rows_q == 0 || layout.batch == 0 || layout.heads == 0) return cudaSuccess;
  Params p = make_params(layout);
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = out;
  p.lse = lse;
  return layout.dtype == DType::kBFloat16 ? fwd_dim<__nv_bfloat16>(layout, p, stream)
                                          : fwd_dim<__half>(layout, p, stream);
}

cudaError_t attention_bwd(const Layout& layout, const void* dout, const void* q, const void* k, const void* v,
                          const void* out, const float* lse, float* drow, float* dq_accum, void* dq, void* dk,
                          void* dv, cudaStream_t stream) {
  if (layout.batch == 0 || layout.heads == 0 || (layout.rows_q == 0 && layout.rows_k == 0)) return cudaSuccess;
  Params p = make_params(layout);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dout = dout;
  p.lse_in = lse;
  p.dq_accum = layout.deterministic ? nullptr : dq_accum;
  p.dk = dk;
  p.dv = dv;
  return layout.dtype == DType::kBFloat16 ? bwd_dim<__nv_bfloat16>(layout, p, drow, dq, stream)
                                          : bwd_dim<__half>(layout, p, drow, dq, stream);
}

}  // namespace attention_cuda
}  // namespace lub_fast
