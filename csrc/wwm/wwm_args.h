// Argument checks of lub_fast::wwm_mask's CPU registration (wwm.cpp): the same rules, with the same
// ValueError messages, as the Python reference's checks in lub_fast/ops/wwm.py.
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <string_view>

#include "wwm/wwm_core.h"

namespace lub_fast {
namespace wwm {

inline Mode parse_mode(std::string_view mode) {
  if (mode == "token") return Mode::kToken;
  if (mode == "whole_word") return Mode::kWholeWord;
  TORCH_CHECK_VALUE(mode == "ngram",
                    "wwm_mask: mode must be one of ('token', 'whole_word', 'ngram'), got '", mode, "'");
  return Mode::kNgram;
}

// Checks shapes, dtypes and values (not devices) and returns the sampler's parameters.
inline Params check_args(const at::Tensor& input_ids, const at::Tensor& word_start,
                         const at::Tensor& maskable, const at::Tensor& example_index, int64_t seed,
                         int64_t epoch, std::string_view mode, double rate, int64_t max_predictions,
                         int64_t mask_token_id, int64_t random_low, int64_t random_high) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong,
                    "wwm_mask: input_ids must be a 2-D int64 tensor, got ", input_ids.dim(), "-D ",
                    input_ids.scalar_type());
  TORCH_CHECK_VALUE(word_start.scalar_type() == at::kBool && word_start.sizes() == input_ids.sizes(),
                    "wwm_mask: word_start must be a bool tensor of input_ids' shape ",
                    input_ids.sizes(), ", got ", word_start.scalar_type(), " ", word_start.sizes());
  TORCH_CHECK_VALUE(maskable.scalar_type() == at::kBool && maskable.sizes() == input_ids.sizes(),
                    "wwm_mask: maskable must be a bool tensor of input_ids' shape ",
                    input_ids.sizes(), ", got ", maskable.scalar_type(), " ", maskable.sizes());
  const int64_t B = input_ids.size(0);
  const int64_t T = input_ids.size(1);
  TORCH_CHECK_VALUE(example_index.scalar_type() == at::kLong && example_index.dim() == 1 &&
                        example_index.size(0) == B,
                    "wwm_mask: example_index must be an int64 tensor of shape [", B, "], got ",
                    example_index.scalar_type(), " ", example_index.sizes());
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(),
                    "wwm_mask: input_ids must have fewer than 2**31 - 1 tokens per row, got ", T);
  TORCH_CHECK_VALUE(rate >= 0.0 && rate <= 1.0, "wwm_mask: rate must be in [0, 1], got ", rate);
  TORCH_CHECK_VALUE(max_predictions >= 0, "wwm_mask: max_predictions must be >= 0, got ",
                    max_predictions);
  TORCH_CHECK_VALUE(mask_token_id >= 0, "wwm_mask: mask_token_id must be >= 0, got ", mask_token_id);
  TORCH_CHECK_VALUE(random_low >= 0 && random_low < random_high &&
                        random_high - random_low < (int64_t{1} << 32),
                    "wwm_mask: random ids [random_low, random_high) must satisfy 0 <= random_low < "
                    "random_high and span < 2**32, got [", random_low, ", ", random_high, ")");
  Params params;
  params.seed = static_cast<uint64_t>(seed);
  params.epoch = static_cast<uint64_t>(epoch);
  params.mode = parse_mode(mode);
  params.rate = rate;
  params.max_predictions = max_predictions;
  params.mask_token_id = mask_token_id;
  params.random_low = random_low;
  params.random_high = random_high;
  return params;
}

}  // namespace wwm
}  // namespace lub_fast
