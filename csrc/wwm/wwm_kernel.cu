// Whole-word / n-gram / token masking on the GPU: the CUDA kernel of lub_fast::wwm_mask
// (spec: lub_fast/ops/wwm.py, wwm_mask_ref; CPU kernel: wwm_core.cpp).
//
// Mapping: one warp per example (row b of the [B, T] batch), 4 warps (4 examples) per block, grid
// ceil(B / 4). The warp runs mask_example_warp (wwm_warp.h): lane l owns 32 consecutive tokens of
// each 1024-token tile during the word scan (flags loaded as two 16-byte vectors per lane when the
// row is 16-byte aligned, else bytewise) and one word or one Fisher-Yates step at a time in the
// n-gram and selection phases, which are warp prefix scans, ballots and shuffles; the output pass
// writes out and labels with coalesced int64 stores. Only as many 32-step batches of the shuffle
// run as the masking budget needs (a 15% budget over ~1.6-token words: 1-2 batches at T = 512).
//
// Scratch per example: units (8 bytes per word), an action byte per token, and, for T <= 1024, a
// copy of the row's ids that cp.async brings into shared memory while the word scan and the
// selection run: ~17 T bytes of dynamic shared memory per warp (35 KB per block at T = 512, 70 KB
// at T = 1024, above the 48 KB default so the launcher raises the limit). For T > 1024 units and
// actions live in a global workspace (wwm_mask_workspace_bytes) and ids are read in place.
//
// Bit-identical to the CPU kernel and the reference: integer arithmetic only; the random numbers
// are the same SplitMix64 draws addressed by (example key, stream, counter) (wwm_core.h), each
// drawn for the same step, unit or token as the sequential algorithm; the 32-step batches
// reproduce the sequential swaps exactly (see choose_units), and the budget is
// rint(rate * maskable) in fp64, as std::nearbyint on the host. csrc/tests/test_wwm_kernel_host.cpp
// runs mask_example_warp on 32 emulated lanes against the CPU core.
//
// Limits: T < 2**31 - 1, any B (grid x up to 2**31 - 1 blocks); sm_80 or newer (cp.async; match_any
// needs sm_70).
#include "wwm/wwm_kernel.h"

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "wwm/wwm_warp.h"

namespace lub_fast {
namespace wwm_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr uint32_t kFullMask = 0xffffffffu;
constexpr int64_t kStagedMaxTokens = 1024;  // ids and scratch in shared memory up to this T
constexpr size_t kTargetsBytes = sizeof(int32_t) * wwm::kLanes;
constexpr int kDefaultSharedBytes = 48 * 1024;

__host__ __device__ constexpr size_t round16(size_t n) { return (n + 15) / 16 * 16; }
// units, then actions: 16-byte aligned for the actions' vector stores.
__host__ __device__ constexpr size_t units_bytes(int64_t T) {
  return round16(sizeof(wwm::Bounds) * static_cast<size_t>(T));
}
__host__ __device__ constexpr size_t scratch_bytes(int64_t T) {
  return units_bytes(T) + round16(static_cast<size_t>(T));
}
// scratch, then the staged ids; a multiple of 16 so that every warp's scratch is 16-byte aligned.
__host__ __device__ constexpr size_t staged_bytes(int64_t T) {
  return round16(scratch_bytes(T) + sizeof(int64_t) * static_cast<size_t>(T));
}

// The Warp interface of wwm_warp.h on a converged warp.
struct DeviceWarp {
  int id;

  __device__ __forceinline__ int lane() const { return id; }
  __device__ __forceinline__ uint32_t ballot(bool p) const { return __ballot_sync(kFullMask, p); }
  __device__ __forceinline__ int32_t shfl(int32_t v, int src) const { return __shfl_sync(kFullMask, v, src); }
  __device__ __forceinline__ uint32_t shfl(uint32_t v, int src) const { return __shfl_sync(kFullMask, v, src); }
  __device__ __forceinline__ uint32_t match_any(int32_t v) const { return __match_any_sync(kFullMask, v); }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ void wait_copies() const { cuda::cp_async_wait_all(); }
};

// 8-byte global -> shared copy (an int64 id; rows need not be 16-byte aligned).
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(cuda::smem_addr(smem)), "l"(gmem));
}

struct KernelArgs {
  Args a;
  unsigned char* workspace;
};

template <bool kStaged>
__global__ void __launch_bounds__(kThreads) wwm_mask_kernel(const __grid_constant__ KernelArgs k) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Args& a = k.a;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (b >= a.B) return;  // whole warps leave; nothing below synchronises the block
  const int32_t T = static_cast<int32_t>(a.T);
  const int64_t row = b * a.T;

  int32_t* targets = reinterpret_cast<int32_t*>(smem) + warp * wwm::kLanes;
  unsigned char* scratch = kStaged ? smem + kWarps * kTargetsBytes + warp * staged_bytes(T)
                                   : k.workspace + b * scratch_bytes(T);
  const int64_t* ids = a.input_ids + row;
  if constexpr (kStaged) {
    int64_t* staged = reinterpret_cast<int64_t*>(scratch + scratch_bytes(T));
    for (int32_t t = lane; t < T; t += wwm::kLanes) cp_async_8(staged + t, ids + t);
    cuda::cp_async_commit();
    ids = staged;
  }
  const wwm::WarpExample ex{ids,
                            a.word_start + row,
                            a.maskable + row,
                            a.out + row,
                            a.labels + row,
                            reinterpret_cast<wwm::Bounds*>(scratch),
                            scratch + units_bytes(T),
                            targets,
                            T,
                            wwm::example_key(a.params.seed, a.params.epoch, static_cast<uint64_t>(a.example_index[b]))};
  wwm::mask_example_warp(DeviceWarp{lane}, ex, a.params);
}

}  // namespace

size_t wwm_mask_workspace_bytes(int64_t B, int64_t T) {
  return T <= kStagedMaxTokens ? 0 : static_cast<size_t>(B) * scratch_bytes(T);
}

cudaError_t wwm_mask(const Args& args, void* workspace, cudaStream_t stream) {
  if (args.B == 0 || args.T == 0) return cudaSuccess;
  const KernelArgs k{args, static_cast<unsigned char*>(workspace)};
  const dim3 grid(static_cast<unsigned>((args.B + kWarps - 1) / kWarps));
  if (args.T <= kStagedMaxTokens) {
    const size_t smem = kWarps * (kTargetsBytes + staged_bytes(args.T));
    if (smem > kDefaultSharedBytes) {
      LUB_FAST_CUDA_TRY(cuda::reserve_dynamic_smem(reinterpret_cast<const void*>(wwm_mask_kernel<true>), smem));
    }
    wwm_mask_kernel<true><<<grid, kThreads, smem, stream>>>(k);
  } else {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    wwm_mask_kernel<false><<<grid, kThreads, kWarps * kTargetsBytes, stream>>>(k);
  }
  return cudaGetLastError();
}

}  // namespace wwm_cuda
}  // namespace lub_fast
