// Launcher of lub_fast's whole-word / n-gram / token masking kernel (wwm_kernel.cu): torch-free,
// raw device pointers, sizes and a cudaStream_t. Semantics: lub_fast/ops/wwm.py (wwm_mask_ref),
// bit for bit; wwm_cuda.cpp checks arguments and registers it for the CUDA dispatch key.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "wwm/wwm_core.h"

namespace lub_fast {
namespace wwm_cuda {

// One masking call. input_ids, out, labels: contiguous int64 [B, T]; word_start, maskable:
// contiguous bool [B, T] (one byte each); example_index: int64 [B]; all in device memory.
// Requires 0 <= T < 2**31 - 1 and the argument rules of wwm_mask (checked by the caller).
struct Args {
  const int64_t* input_ids = nullptr;
  const bool* word_start = nullptr;
  const bool* maskable = nullptr;
  const int64_t* example_index = nullptr;
  int64_t* out = nullptr;
  int64_t* labels = nullptr;
  int64_t B = 0;
  int64_t T = 0;
  wwm::Params params;
};

// Bytes of device workspace wwm_mask needs for a [B, T] batch: 0 when each example's scratch fits
// in shared memory (T <= 1024), else about 9 T bytes per example.
size_t wwm_mask_workspace_bytes(int64_t B, int64_t T);

// Writes out and labels entirely. `workspace`: wwm_mask_workspace_bytes(B, T) bytes of device
// memory, 16-byte aligned, any contents (nullptr when that is 0).
cudaError_t wwm_mask(const Args& args, void* workspace, cudaStream_t stream);

}  // namespace wwm_cuda
}  // namespace lub_fast
