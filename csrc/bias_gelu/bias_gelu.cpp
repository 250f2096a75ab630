// CPU kernels of lub_fast::bias_gelu_fwd / bias_gelu_bwd (schemas and reference in
// lub_fast/ops/bias_gelu.py): ATen's vectorised GELU and GELU backward (at::gelu_, at::gelu_backward)
// applied to u = x + bias. Precision as the reference: fp32 for fp16/bf16 inputs (fp64 stays fp64),
// one rounding to the dtype of x at the end. Threads: ATen's intra-op pool (torch.set_num_threads).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

namespace {

void check(const char* op, const at::Tensor& x, const at::Tensor& bias, std::string_view approximate) {
  TORCH_CHECK_VALUE(x.is_floating_point() && bias.is_floating_point(), op,
                    ": x and bias must be floating; got ", x.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK_VALUE(bias.dim() == 1 && x.dim() >= 1 && bias.size(0) == x.size(-1), op,
                    ": bias must be [N] with N = x.size(-1); got x ", x.sizes(), ", bias ", bias.sizes());
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
}

at::Tensor shifted(const at::Tensor& x, const at::Tensor& bias) {
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::add(x.to(compute), bias.to(compute));
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, std::string_view approximate) {
  check("bias_gelu_fwd", x, bias, approximate);
  at::Tensor u = shifted(x, bias);
  at::gelu_(u, approximate);
  return u.to(x.scalar_type()).contiguous();
}

at::Tensor bias_gelu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias,
                             std::string_view approximate) {
  check("bias_gelu_bwd", x, bias, approximate);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "bias_gelu_bwd: grad_out must have x's shape ", x.sizes(),
                    ", got ", grad_out.sizes());
  at::Tensor u = shifted(x, bias);
  return at::gelu_backward(grad_out.to(u.scalar_type()), u, approximate).to(x.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}
