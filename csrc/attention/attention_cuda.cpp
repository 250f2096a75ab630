// lub_fast::{varlen,padded}_attention_{fwd,bwd} on CUDA: argument checks, output allocation and
// dispatcher registration for the kernels of attention_kernel.cu. Schemas, references, fake and
// autograd registration live in lub_fast/ops/attention.py; inputs these kernels do not handle
// (fp32/fp64, other head dims) are routed elsewhere by attention.attention_route() in Python, which
// also checks cu_seqlens before any call. q, k, v views with one row stride are read in place.
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "attention/attention_kernel.h"

namespace lub_fast {
namespace {

namespace ac = attention_cuda;

constexpr int64_t kMaxGrid = 65535;  // grid y (heads) and z (sequences)

// Contiguous and 16-byte aligned (the kernels' vector accesses need both).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// q, k, v as the kernels read them: as they are when all three have contiguous heads, one row stride
// (a multiple of 8 elements, at least H * D, below 2**31) and 16-byte aligned data, as the views of
// a [T, 3, H, D] projection have; else contiguous copies.
struct Qkv {
  at::Tensor q, k, v;
  int64_t row_stride;
};

bool rows_of_heads(const at::Tensor& t, int64_t row_stride) {
  const int64_t d = t.size(-1);
  const bool ok = t.stride(-1) == 1 && t.stride(-2) == d && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (t.dim() == 3) return ok && t.stride(0) == row_stride;
  return ok && t.stride(1) == row_stride && t.stride(0) == t.size(1) * row_stride;  // [B, S, H, D]
}

Qkv qkv_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t packed = q.size(-2) * q.size(-1);
  const int64_t rs = q.stride(q.dim() - 3);
  const bool in_place = rs % 8 == 0 && rs >= packed && rs < (int64_t{1} << 31);
  if (in_place && rows_of_heads(q, rs) && rows_of_heads(k, rs) && rows_of_heads(v, rs)) {
    return {q, k, v, rs};
  }
  return {dense(q), dense(k), dense(v), packed};
}

void check_floats(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                    ": q must be bfloat16 or float16 for the CUDA kernel, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == dims, op, ": q must have ", dims, " dims, got shape ", q.sizes());
  TORCH_CHECK_VALUE(ac::supported_head_dim(q.size(-1)), op, ": head dim must be 32, 64 or 128, got ",
                    q.size(-1));
  TORCH_CHECK_VALUE(q.size(-2) <= kMaxGrid, op, ": at most ", kMaxGrid, " heads, got ", q.size(-2));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                      q.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                      t.sizes());
  }
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device() && t.scalar_type() == q.scalar_type() && t.sizes() == q.sizes(), op,
                    ": ", name, " must match q (", q.scalar_type(), " ", q.sizes(), " on ", q.device(), "), got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_lse(const char* op, const at::Tensor& lse, at::IntArrayRef shape, const at::Tensor& q) {
  TORCH_CHECK_VALUE(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.sizes() == shape, op,
                    ": lse must be float32 ", shape, " on ", q.device(), ", got ", lse.scalar_type(), " ",
                    lse.sizes(), " on ", lse.device());
}

ac::Layout base_layout(const char* op, const at::Tensor& q, double dropout_p, int64_t seed, int64_t offset,
                       double scale) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t{1} << 32), op, ": offset must be in [0, 2**32), got ", offset);
  ac::Layout l;
  l.dtype = q.scalar_type() == at::kBFloat16 ? ac::DType::kBFloat16 : ac::DType::kFloat16;
  l.head_dim = static_cast<int>(q.size(-1));
  l.heads = static_cast<int>(q.size(-2));
  l.scale = static_cast<float>(scale);
  l.dropout_p = dropout_p;
  l.seed = static_cast<uint64_t>(seed);
  l.offset = static_cast<uint32_t>(offset);
  return l;
}

ac::Layout varlen_layout(const char* op, const at::Tensor& q, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                         double dropout_p, int64_t seed, int64_t offset, double scale) {
  TORCH_CHECK_VALUE(cu_seqlens.device() == q.device() && cu_seqlens.scalar_type() == at::kInt &&
                        cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    op, ": cu_seqlens must be int32 [B + 1] on ", q.device(), ", got ", cu_seqlens.scalar_type(),
                    " ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  TORCH_CHECK_VALUE(cu_seqlens.numel() - 1 <= kMaxGrid, op, ": at most ", kMaxGrid, " sequences, got ",
                    cu_seqlens.numel() - 1);
  TORCH_CHECK_VALUE(max_seqlen >= 0 && max_seqlen < (int64_t{1} << 31), op,
                    ": max_seqlen must be in [0, 2**31), got ", max_seqlen);
  TORCH_CHECK_VALUE(q.size(0) < (int64_t{1} << 31), op, ": at most 2**31 - 1 tokens, got ", q.size(0));
  ac::Layout l = base_layout(op, q, dropout_p, seed, offset, scale);
  l.batch = static_cast<int>(cu_seqlens.numel() - 1);
  l.rows = q.size(0);
  l.max_seqlen = static_cast<int>(max_seqlen);
  return l;
}

ac::Layout padded_layout(const char* op, const at::Tensor& q, const at::Tensor& mask, double dropout_p, int64_t seed,
                         int64_t offset, double scale) {
  TORCH_CHECK_VALUE(mask.device() == q.device() && mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                        mask.size(0) == q.size(0) && mask.size(1) == q.size(1),
                    op, ": key_padding_mask must be bool [B, S] = [", q.size(0), ", ", q.size(1), "] on ",
                    q.device(), ", got ", mask.scalar_type(), " ", mask.sizes(), " on ", mask.device());
  TORCH_CHECK_VALUE(q.size(0) <= kMaxGrid, op, ": batch must be at most ", kMaxGrid, ", got ", q.size(0));
  TORCH_CHECK_VALUE(q.size(1) < (int64_t{1} << 31), op, ": S must be below 2**31, got ", q.size(1));
  ac::Layout l = base_layout(op, q, dropout_p, seed, offset, scale);
  l.batch = static_cast<int>(q.size(0));
  l.seqlen = static_cast<int>(q.size(1));
  l.rows = q.size(0) * q.size(1);
  return l;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> fwd(const char* op, ac::Layout l, const at::Tensor& q_in, const at::Tensor& k_in,
                                       const at::Tensor& v_in, at::IntArrayRef lse_shape) {
  const auto [q, k, v, row_stride] = qkv_inputs(q_in, k_in, v_in);
  l.qkv_stride = row_stride;
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  check_cuda(ac::attention_fwd(l, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
             op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const char* op, ac::Layout l, const at::Tensor& dout_in,
                                                   const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const at::Tensor& out_in,
                                                   const at::Tensor& lse_in) {
  at::globalContext().alertNotDeterministic(
      "lub_fast attention backward on CUDA (dq is summed over key tiles with fp32 atomics)");
  const at::Tensor dout = dense(dout_in);
  const auto [q, k, v, row_stride] = qkv_inputs(q_in, k_in, v_in);
  l.qkv_stride = row_stride;
  const at::Tensor out = dense(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor drow = at::empty(lse.sizes(), lse.options());
  at::Tensor dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // zeroed by the drow kernel
  at::Tensor dq = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  check_cuda(ac::attention_bwd(l, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse.data_ptr<float>(), drow.data_ptr<float>(), dq_accum.data_ptr<float>(),
                               dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                               c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
             op);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen, double dropout_p, int64_t seed,
                                                             int64_t offset, double scale) {
  constexpr const char* op = "varlen_attention_fwd";
  check_floats(op, q, k, v, 3);
  const c10::cuda::CUDAGuard guard(q.device());
  const ac::Layout l = varlen_layout(op, q, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale);
  const at::Tensor cu = cu_seqlens.contiguous();
  ac::Layout lc = l;
  lc.cu_seqlens = cu.data_ptr<int32_t>();
  return fwd(op, lc, q, k, v, {q.size(1), q.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double dropout_p, int64_t seed,
    int64_t offset, double scale) {
  constexpr const char* op = "varlen_attention_bwd";
  check_floats(op, q, k, v, 3);
  check_like(op, "dout", dout, q);
  check_like(op, "out", out, q);
  check_lse(op, lse, {q.size(1), q.size(0)}, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  ac::Layout l = varlen_layout(op, q, cu, max_seqlen, dropout_p, seed, offset, scale);
  l.cu_seqlens = cu.data_ptr<int32_t>();
  return bwd(op, l, dout, q, k, v, out, lse);
}

std::tuple<at::Tensor, at::Tensor> padded_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& key_padding_mask,
                                                             double dropout_p, int64_t seed, int64_t offset,
                                                             double scale) {
  constexpr const char* op = "padded_attention_fwd";
  check_floats(op, q, k, v, 4);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor mask = key_padding_mask.contiguous();
  ac::Layout l = padded_layout(op, q, mask, dropout_p, seed, offset, scale);
  l.key_padding_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  return fwd(op, l, q, k, v, {q.size(0), q.size(2), q.size(1)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> padded_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& key_padding_mask, double dropout_p, int64_t seed, int64_t offset,
    double scale) {
  constexpr const char* op = "padded_attention_bwd";
  check_floats(op, q, k, v, 4);
  check_like(op, "dout", dout, q);
  check_like(op, "out", out, q);
  check_lse(op, lse, {q.size(0), q.size(2), q.size(1)}, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor mask = key_padding_mask.contiguous();
  ac::Layout l = padded_layout(op, q, mask, dropout_p, seed, offset, scale);
  l.key_padding_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  return bwd(op, l, dout, q, k, v, out, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
  m.impl("padded_attention_fwd", &padded_attention_fwd_cuda);
  m.impl("padded_attention_bwd", &padded_attention_bwd_cuda);
}

}  // namespace lub_fast
