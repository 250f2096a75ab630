// Launchers of lub_fast's fused attention kernels (attention_kernel.cu): torch-free, raw device
// pointers, sizes and a cudaStream_t. The semantics (lse convention, queries without keys, the Philox dropout
// contract) are those of lub_fast/ops/attention.py; attention_cuda.cpp checks arguments and
// registers these for the CUDA dispatch key.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lub_fast {
namespace attention_cuda {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1 };

// Head dims with a compiled kernel.
inline bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// The layout of one attention call. out, dout, dq are contiguous [Tq, heads, head_dim] in `dtype`,
// dk, dv contiguous [Tk, heads, head_dim]; q is [Tq, heads, head_dim] and k, v [Tk, heads, head_dim]
// with contiguous heads (head h of row r at r * qkv_stride + h * head_dim), qkv_stride a multiple of
// 8 (0: heads * head_dim); every pointer 16-byte aligned; lse and drow are fp32 [heads, Tq].
//
// Sequence b has query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b] ..
// cu_seqlens_k[b + 1] (int32, device memory, B + 1 entries each). Each must start at 0, be
// non-decreasing and end at Tq / Tk: attention.py checks that on the host before any call
// (check_cu_seqlens); sequences outside 0 <= start <= end <= T would be skipped. q_positions
// (int32 [Tq], device memory, or null) is each query's dropout row (null: its position in its
// query sequence). The forward covers max(1, ceil(max_seqlen_q / block)) query tiles per sequence
// and the backward max(1, ceil(max_seqlen_k / block)) key tiles, each with a block-stride loop, so
// every sequence is processed completely even if a max_seqlen is too small.
struct Layout {
  DType dtype = DType::kBFloat16;
  int head_dim = 64;
  int batch = 0;
  int heads = 0;
  int64_t rows_q = 0;
  int64_t rows_k = 0;
  int64_t qkv_stride = 0;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* q_positions = nullptr;
  int max_seqlen_q = 0;
  int max_seqlen_k = 0;
  float scale = 1.0f;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  uint32_t offset = 0;
  // Backward without atomics: bit-identical dq, dk, dv across runs (attention_kernel.cu, "Deterministic
  // backward"); else dQ is summed over key tiles with fp32 atomics in a varying order.
  bool deterministic = false;
};

// out [Tq, heads, D], lse [heads, Tq].
cudaError_t attention_fwd(const Layout& layout, const void* q, const void* k, const void* v, void* out,
                          float* lse, cudaStream_t stream);

// Workspace: drow with lse's shape (fp32), dq_accum fp32 [Tq, heads, D], 16-byte aligned, any
// contents (the first kernel zeroes it); dq_accum is unused (may be null) when layout.deterministic.
// Writes dq [Tq, heads, D] and dk, dv [Tk, heads, D] entirely.
cudaError_t attention_bwd(const Layout& layout, const void* dout, const void* q, const void* k,
                          const void* v, const void* out, const float* lse, float* drow,
                          float* dq_accum, void* dq, void* dk, void* dv, cudaStream_t stream);

}  // namespace attention_cuda
}  // namespace lub_fast
