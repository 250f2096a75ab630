// lub_fast::wwm_mask on CUDA: argument checks, output and workspace allocation and dispatcher
// registration for the kernel of wwm_kernel.cu. The schema, reference and fake kernel live in
// lub_fast/ops/wwm.py; the checks and messages are those of the CPU kernel (wwm.cpp), so both
// devices reject the same arguments with the same ValueError.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string_view>
#include <tuple>

#include "wwm/wwm_kernel.h"

namespace lub_fast {
namespace {

wwm::Mode parse_mode(std::string_view mode) {
  if (mode == "token") return wwm::Mode::kToken;
  if (mode == "whole_word") return wwm::Mode::kWholeWord;
  TORCH_CHECK_VALUE(mode == "ngram",
                    "wwm_mask: mode must be one of ('token', 'whole_word', 'ngram'), got '", mode, "'");
  return wwm::Mode::kNgram;
}

std::tuple<at::Tensor, at::Tensor> wwm_mask_cuda(const at::Tensor& input_ids, const at::Tensor& word_start,
                                                 const at::Tensor& maskable, const at::Tensor& example_index,
                                                 int64_t seed, int64_t epoch, std::string_view mode, double rate,
                                                 int64_t max_predictions, int64_t mask_token_id,
                                                 int64_t random_low, int64_t random_high) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong,
                    "wwm_mask: input_ids must be a 2-D int64 tensor, got ", input_ids.dim(), "-D ",
                    input_ids.scalar_type());
  TORCH_CHECK_VALUE(word_start.scalar_type() == at::kBool && word_start.sizes() == input_ids.sizes(),
                    "wwm_mask: word_start must be a bool tensor of input_ids' shape ", input_ids.sizes(),
                    ", got ", word_start.scalar_type(), " ", word_start.sizes());
  TORCH_CHECK_VALUE(maskable.scalar_type() == at::kBool && maskable.sizes() == input_ids.sizes(),
                    "wwm_mask: maskable must be a bool tensor of input_ids' shape ", input_ids.sizes(),
                    ", got ", maskable.scalar_type(), " ", maskable.sizes());
  const int64_t B = input_ids.size(0);
  const int64_t T = input_ids.size(1);
  TORCH_CHECK_VALUE(example_index.scalar_type() == at::kLong && example_index.dim() == 1 &&
                        example_index.size(0) == B,
                    "wwm_mask: example_index must be an int64 tensor of shape [", B, "], got ",
                    example_index.scalar_type(), " ", example_index.sizes());
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(),
                    "wwm_mask: input_ids must have fewer than 2**31 - 1 tokens per row, got ", T);
  TORCH_CHECK_VALUE(rate >= 0.0 && rate <= 1.0, "wwm_mask: rate must be in [0, 1], got ", rate);
  TORCH_CHECK_VALUE(max_predictions >= 0, "wwm_mask: max_predictions must be >= 0, got ", max_predictions);
  TORCH_CHECK_VALUE(mask_token_id >= 0, "wwm_mask: mask_token_id must be >= 0, got ", mask_token_id);
  TORCH_CHECK_VALUE(random_low >= 0 && random_low < random_high && random_high - random_low < (int64_t{1} << 32),
                    "wwm_mask: random ids [random_low, random_high) must satisfy 0 <= random_low < "
                    "random_high and span < 2**32, got [", random_low, ", ", random_high, ")");
  TORCH_CHECK_VALUE(input_ids.is_cuda(), "wwm_mask: input_ids must be a CUDA tensor, got ", input_ids.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"word_start", word_start},
                                {"maskable", maskable},
                                {"example_index", example_index}}) {
    TORCH_CHECK_VALUE(t.device() == input_ids.device(), "wwm_mask: ", name, " must be on ", input_ids.device(),
                      " like input_ids, got ", t.device());
  }

  wwm_cuda::Args args;
  args.params.seed = static_cast<uint64_t>(seed);
  args.params.epoch = static_cast<uint64_t>(epoch);
  args.params.mode = parse_mode(mode);
  args.params.rate = rate;
  args.params.max_predictions = max_predictions;
  args.params.mask_token_id = mask_token_id;
  args.params.random_low = random_low;
  args.params.random_high = random_high;

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
