// Launchers of lub_fast's fused attention kernels (attention_kernel.cu): torch-free, raw device
// pointers, sizes and a cudaStream_t. The semantics (lse convention, padded rows, the Philox dropout
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

// The layout of one attention call. out, dout, dq, dk, dv are contiguous [rows, heads, head_dim] in
// `dtype`; q, k, v are [rows, heads, head_dim] with contiguous heads (head h of row r at
// r * qkv_stride + h * head_dim), qkv_stride a multiple of 8 (0: heads * head_dim); every pointer
// 16-byte aligned; lse and drow are fp32.
//
// Varlen (cu_seqlens != nullptr): rows = T tokens; sequence b is rows cu_seqlens[b] ..
// cu_seqlens[b + 1] (int32, device memory, B + 1 entries); lse is [heads, T]. cu_seqlens must
// start at 0, be non-decreasing and end at T: attention.py checks that on the host before any call
// (check_cu_seqlens); sequences outside 0 <= start <= end <= T would be skipped.
// Each kernel covers max(1, ceil(max_seqlen / block)) blocks per sequence with a block-stride loop,
// so every sequence is processed completely even if max_seqlen is too small.
//
// Padded (cu_seqlens == nullptr): rows = batch * seqlen of a [batch, seqlen, heads, head_dim]
// tensor; key_padding_mask is bool [batch, seqlen] (device, 1 byte each, true = real); lse is
// [batch, heads, seqlen]. Positions after the last real token of a row are never loaded; padded
// query rows get zeros and lse = +inf, padded keys zero gradients.
struct Layout {
  DType dtype = DType::kBFloat16;
  int head_dim = 64;
  int batch = 0;
  int heads = 0;
  int64_t rows = 0;
  int64_t qkv_stride = 0;
  const int32_t* cu_seqlens = nullptr;
  int max_seqlen = 0;
  const uint8_t* key_padding_mask = nullptr;
  int seqlen = 0;  // padded only
  float scale = 1.0f;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  uint32_t offset = 0;
};

// out [rows, heads, D], lse as in Layout.
cudaError_t attention_fwd(const Layout& layout, const void* q, const void* k, const void* v, void* out,
                          float* lse, cudaStream_t stream);

// Workspace: drow with lse's shape (fp32), dq_accum fp32 [rows, heads, D], 16-byte aligned, any
// contents (the first kernel zeroes it). Writes dq, dk, dv [rows, heads, D] entirely.
cudaError_t attention_bwd(const Layout& layout, const void* dout, const void* q, const void* k,
                          const void* v, const void* out, const float* lse, float* drow,
                          float* dq_accum, void* dq, void* dk, void* dv, cudaStream_t stream);

}  // namespace attention_cuda
}  // namespace lub_fast
