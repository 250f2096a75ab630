// Torch-free CUDA helpers shared by lub_fast's kernels: error propagation, the sm_80+ warp-level
// tensor-core instructions (mma.sync m16n8k16, ldmatrix, cp.async) as inline PTX, and 16-bit
// float conversions. Fragment layouts are those of the PTX ISA, "Matrix Fragments for mma.m16n8k16
// with floating point type" (A: 4 x .b32, B: 2 x .b32, C/D: 4 x .f32 per thread; groupID =
// lane / 4, threadID_in_group = lane % 4).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

// Returns the error of a failed CUDA runtime call from the enclosing function.
#define LUB_FAST_CUDA_TRY(expr)          \
  do {                                   \
    const cudaError_t err_ = (expr);     \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

namespace lub_fast {
namespace cuda {

// Host-side launch configuration, cached per device: cudaDeviceGetAttribute and cudaFuncSetAttribute
// are driver calls whose answers do not change while the process runs.
constexpr int kMaxCachedDevices = 64;

// The current device's multiprocessor count, read once per device.
inline cudaError_t multiprocessor_count(int* sms) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};  // 0: not read yet
  int device = 0;
  LUB_FAST_CUDA_TRY(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    *sms = cache[device].load(std::memory_order_relaxed);
    if (*sms > 0) return cudaSuccess;
  }
  LUB_FAST_CUDA_TRY(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(*sms, std::memory_order_relaxed);
  return cudaSuccess;
}

// Raises `kernel`'s dynamic shared-memory limit to at least `bytes` on the current device; the
// driver call is made once per (kernel, device) and again only for a larger request.
inline cudaError_t reserve_dynamic_smem(const void* kernel, size_t bytes) {
  struct Entry {
    const void* kernel;
    int device;
    size_t bytes;
  };
  static std::mutex mutex;
  static std::vector<Entry> done;
  int device = 0;
  LUB_FAST_CUDA_TRY(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  Entry* entry = nullptr;
  for (Entry& e : done) {
    if (e.kernel == kernel && e.device == device) entry = &e;
  }
  if (entry != nullptr && entry->bytes >= bytes) return cudaSuccess;
  LUB_FAST_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (entry != nullptr) {
    entry->bytes = bytes;
  } else {
    done.push_back({kernel, device, bytes});
  }
  return cudaSuccess;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes 16 zero bytes and reads
// nothing (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8; register i
// receives matrix i's elements (row = lane / 4, columns 2 * (lane % 4) + {0, 1}).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
// The same with each matrix transposed: register i receives (row = 2 * (lane % 4) + {0, 1},
// column = lane / 4) of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
struct Mma;

// c += a * b for one 16x8x16 tile with fp32 accumulation.
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two floats -> one .b32 register holding two 16-bit values (x in the low half), round to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  const __half2 v = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One .b32 register holding two 16-bit values -> two floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

// Scalar conversions spelled out: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace cuda
}  // namespace lub_fast
