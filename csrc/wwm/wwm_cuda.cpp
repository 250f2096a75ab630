// lub_fast::wwm_mask on CUDA: argument checks, output and workspace allocation and dispatcher
// registration for the kernel of wwm_kernel.cu. The schema, reference and fake kernel live in
// lub_fast/ops/wwm.py; the argument checks are wwm_args.h's, shared with the CPU kernel (wwm.cpp).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string_view>
#include <tuple>

#include "wwm/wwm_args.h"
#include "wwm/wwm_kernel.h"

namespace lub_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> wwm_mask_cuda(const at::Tensor& input_ids, const at::Tensor& word_start,
                                                 const at::Tensor& maskable, const at::Tensor& example_index,
                                                 int64_t seed, int64_t epoch, std::string_view mode, double rate,
                                                 int64_t max_predictions, int64_t mask_token_id,
                                                 int64_t random_low, int64_t random_high) {
  wwm_cuda::Args args;
  args.params = wwm::check_args(input_ids, word_start, maskable, example_index, seed, epoch, mode, rate,
                                max_predictions, mask_token_id, random_low, random_high);
  const int64_t B = input_ids.size(0);
  const int64_t T = input_ids.size(1);
  TORCH_CHECK_VALUE(input_ids.is_cuda(), "wwm_mask: input_ids must be a CUDA tensor, got ", input_ids.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"word_start", word_start},
                                {"maskable", maskable},
                                {"example_index", example_index}}) {
    TORCH_CHECK_VALUE(t.device() == input_ids.device(), "wwm_mask: ", name, " must be on ", input_ids.device(),
                      " like input_ids, got ", t.device());
  }

  const c10::cuda::CUDAGuard guard(input_ids.device());
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor starts = word_start.contiguous();
  const at::Tensor mask_ok = maskable.contiguous();
  const at::Tensor index = example_index.contiguous();
  at::Tensor out = at::empty({B, T}, ids.options());
  at::Tensor labels = at::empty({B, T}, ids.options());
  const size_t workspace_bytes = wwm_cuda::wwm_mask_workspace_bytes(B, T);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));
  }
  args.input_ids = ids.data_ptr<int64_t>();
  args.word_start = starts.data_ptr<bool>();
  args.maskable = mask_ok.data_ptr<bool>();
  args.example_index = index.data_ptr<int64_t>();
  args.out = out.data_ptr<int64_t>();
  args.labels = labels.data_ptr<int64_t>();
  args.B = B;
  args.T = T;
  const cudaError_t err = wwm_cuda::wwm_mask(args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                                             c10::cuda::getCurrentCUDAStream(input_ids.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "wwm_mask: CUDA kernel failed: ", cudaGetErrorString(err));
  return {out, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CUDA, m) { m.impl("wwm_mask", &wwm_mask_cuda); }

}  // namespace lub_fast
