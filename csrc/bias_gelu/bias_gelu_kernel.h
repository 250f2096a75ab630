// Launchers of lub_fast's fused bias + GELU kernels (bias_gelu_kernel.cu): torch-free, raw device
// pointers, sizes and a cudaStream_t. Semantics: lub_fast/ops/bias_gelu.py (fp32 math, one rounding
// to the output dtype); bias_gelu_cuda.cpp checks arguments and registers them for CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lub_fast {
namespace bias_gelu_cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x, y (and grad_out, grad_x) contiguous [rows, n] in `x_dtype`; bias [n] in `bias_dtype`
// (x_dtype or fp32). `tanh` selects the tanh approximation, else exact erf.
struct Shape {
  DType x_dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t n = 0;
  bool tanh = false;
};

// y = gelu(x + bias).
cudaError_t bias_gelu_fwd(const Shape& shape, const void* x, const void* bias, void* y, cudaStream_t stream);

// grad_x = grad_out * gelu'(x + bias).
cudaError_t bias_gelu_bwd(const Shape& shape, const void* grad_out, const void* x, const void* bias, void* grad_x,
                          cudaStream_t stream);

}  // namespace bias_gelu_cuda
}  // namespace lub_fast
