// lub_fast::bias_gelu_{fwd,bwd} on CUDA: argument checks, output allocation and dispatcher
// registration for the kernels of bias_gelu_kernel.cu. Schemas, references, fake and autograd
// registration live in lub_fast/ops/bias_gelu.py; fp64 inputs are routed to the reference by
// bias_gelu.supports() in Python.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string_view>

#include "bias_gelu/bias_gelu_kernel.h"

namespace lub_fast {
namespace {

namespace bg = bias_gelu_cuda;

bg::DType dtype_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return bg::DType::kFloat32;
    case at::kHalf: return bg::DType::kFloat16;
    case at::kBFloat16: return bg::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, float16 or bfloat16 for the CUDA kernel, got ",
                        t.scalar_type());
  }
}

bool parse_tanh(const char* op, std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

bg::Shape shape_of(const char* op, const at::Tensor& x, const at::Tensor& bias, std::string_view approximate) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(bias.device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ",
                    bias.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1), op,
                    ": bias must be [N] with N = x.shape[-1], got x ", x.sizes(), ", bias ", bias.sizes());
  bg::Shape s;
  s.x_dtype = dtype_of(op, "x", x);
  s.bias_dtype = dtype_of(op, "bias", bias);
  TORCH_CHECK_VALUE(s.bias_dtype == s.x_dtype || s.bias_dtype == bg::DType::kFloat32, op,
                    ": bias must have x's dtype or float32, got x ", x.scalar_type(), ", bias ", bias.scalar_type());
  s.n = x.size(-1);
  s.rows = s.n == 0 ? 0 : x.numel() / s.n;
  TORCH_CHECK_VALUE(s.n < (int64_t{1} << 31) && s.rows < (int64_t{1} << 31), op,
                    ": rows and N must be below 2**31, got ", s.rows, " x ", s.n);
  s.tanh = parse_tanh(op, approximate);
  return s;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x_in, const at::Tensor& bias_in, std::string_view approximate) {
  constexpr const char* op = "bias_gelu_fwd";
  const bg::Shape s = shape_of(op, x_in, bias_in, approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  check_cuda(bg::bias_gelu_fwd(s, x.data_ptr(), bias.data_ptr(), y.data_ptr(),
                               c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
             op);
  return y;
}

at::Tensor bias_gelu_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& bias_in,
                              std::string_view approximate) {
  constexpr const char* op = "bias_gelu_bwd";
  const bg::Shape s = shape_of(op, x_in, bias_in, approximate);
  TORCH_CHECK_VALUE(grad_out_in.device() == x_in.device() && grad_out_in.scalar_type() == x_in.scalar_type() &&
                        grad_out_in.sizes() == x_in.sizes(),
                    op, ": grad_out must match x (", x_in.scalar_type(), " ", x_in.sizes(), "), got ",
                    grad_out_in.scalar_type(), " ", grad_out_in.sizes(), " on ", grad_out_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  check_cuda(bg::bias_gelu_bwd(s, grad_out.data_ptr(), x.data_ptr(), bias.data_ptr(), grad_x.data_ptr(),
                               c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
             op);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace lub_fast
