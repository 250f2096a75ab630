// lub_fast::wwm_mask on CPU: input checks and dispatcher registration for the sampler in
// wwm_core.cpp. The schema, reference and fake kernel live in lub_fast/ops/wwm.py.
//
// Parallel over examples with at::parallel_for; each example's output depends only on its key
// (seed, epoch, example index), so the result is the same for any thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <tuple>

#include "wwm/wwm_args.h"
#include "wwm/wwm_core.h"

namespace lub_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> wwm_mask_cpu(const at::Tensor& input_ids,
                                                const at::Tensor& word_start,
                                                const at::Tensor& maskable,
                                                const at::Tensor& example_index, int64_t seed,
                                                int64_t epoch, std::string_view mode, double rate,
                                                int64_t max_predictions, int64_t mask_token_id,
                                                int64_t random_low, int64_t random_high) {
  const wwm::Params params = wwm::check_args(input_ids, word_start, maskable, example_index, seed, epoch,
                                             mode, rate, max_predictions, mask_token_id, random_low,
                                             random_high);
  const int64_t B = input_ids.size(0);
  const int64_t T = input_ids.size(1);
  for (const auto* t : {&input_ids, &word_start, &maskable, &example_index}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "wwm_mask: every tensor must be on the CPU, got ",
                      t->device());
  }

  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor starts = word_start.contiguous();
  const at::Tensor mask_ok = maskable.contiguous();
  const at::Tensor index = example_index.contiguous();
  at::Tensor out = at::empty({B, T}, ids.options());
  at::Tensor labels = at::empty({B, T}, ids.options());
  if (B == 0 || T == 0) {
    return {out, labels};
  }
  const int64_t* ids_ptr = ids.data_ptr<int64_t>();
  const bool* starts_ptr = starts.data_ptr<bool>();
  const bool* mask_ok_ptr = mask_ok.data_ptr<bool>();
  const int64_t* index_ptr = index.data_ptr<int64_t>();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  int64_t* labels_ptr = labels.data_ptr<int64_t>();
  // At least 4k tokens (about 20 us) per task: below that, waking a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 4096 / T);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    wwm::mask_rows(ids_ptr, starts_ptr, mask_ok_ptr, index_ptr, begin, end, T, params, out_ptr,
                   labels_ptr);
  });
  return {out, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CPU, m) { m.impl("wwm_mask", &wwm_mask_cpu); }

}  // namespace lub_fast
