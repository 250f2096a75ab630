// lub_fast::varlen_attention_{fwd,bwd} on CUDA: argument checks, output allocation and dispatcher
// registration for the kernels of attention_kernel.cu. Schemas, references, fake and autograd
// registration live in lub_fast/ops/attention.py; inputs these kernels do not handle (fp32/fp64,
// other head dims) are routed elsewhere by attention.attention_route() in Python, which also checks
// cu_seqlens_q and cu_seqlens_k before any call. q (and k, v together) views with one row stride
// are read in place. The backward's `deterministic` selects the kernels' backward without atomics.
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

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
// a [T, 3, H, D] projection have; else contiguous copies (the sparse last layer's contiguous queries
// with key and value views of a [T, 2, H, D] projection: one stride keeps the kernels' registers
// within budget, see attention_kernel.cu).
struct Qkv {
  at::Tensor q, k, v;
  int64_t row_stride;
};

bool rows_of_heads(const at::Tensor& t, int64_t row_stride) {
  const int64_t d = t.size(-1);
  return t.stride(-1) == 1 && t.stride(-2) == d && t.stride(0) == row_stride &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

Qkv qkv_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t packed = q.size(-2) * q.size(-1);
  const int64_t rs = q.stride(0);
  const bool in_place = rs % 8 == 0 && rs >= packed && rs < (int64_t{1} << 31);
  if (in_place && rows_of_heads(q, rs) && rows_of_heads(k, rs) && rows_of_heads(v, rs)) {
    return {q, k, v, rs};
  }
  return {dense(q), dense(k), dense(v), packed};
}

void check_floats(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                    ": q must be bfloat16 or float16 for the CUDA kernel, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == q.size(1) &&
                        k.size(2) == q.size(2),
                    op, ": q must be [Tq, H, D] and k, v [Tk, H, D], got ", q.sizes(), ", ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(ac::supported_head_dim(q.size(-1)), op, ": head dim must be 32, 64 or 128, got ",
                    q.size(-1));
  TORCH_CHECK_VALUE(q.size(-2) <= kMaxGrid, op, ": at most ", kMaxGrid, " heads, got ", q.size(-2));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                      q.scalar_type(), ", got ", t.scalar_type());
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

void check_cu(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& q) {
  TORCH_CHECK_VALUE(cu.device() == q.device() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
                    op, ": ", name, " must be int32 [B + 1] on ", q.device(), ", got ", cu.scalar_type(), " ",
                    cu.sizes(), " on ", cu.device());
}

// The layout of a call, with the device tensors it points into (kept alive by the caller).
struct Call {
  ac::Layout layout;
  at::Tensor cu_q, cu_k, positions;
};

Call make_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
               const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
               int64_t seed, int64_t offset, double scale, const std::optional<at::Tensor>& q_positions) {
  check_cu(op, "cu_seqlens_q", cu_seqlens_q, q);
  check_cu(op, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(), op,
                    ": cu_seqlens_q and cu_seqlens_k must have B + 1 entries each, got ", cu_seqlens_q.numel(),
                    " and ", cu_seqlens_k.numel());
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() - 1 <= kMaxGrid, op, ": at most ", kMaxGrid, " sequences, got ",
                    cu_seqlens_q.numel() - 1);
  for (const auto& [name, m] :
       {std::pair<const char*, int64_t>{"max_seqlen_q", max_seqlen_q}, {"max_seqlen_k", max_seqlen_k}}) {
    TORCH_CHECK_VALUE(m >= 0 && m < (int64_t{1} << 31), op, ": ", name, " must be in [0, 2**31), got ", m);
  }
  TORCH_CHECK_VALUE(q.size(0) < (int64_t{1} << 31) && k.size(0) < (int64_t{1} << 31), op,
                    ": at most 2**31 - 1 query and key tokens, got ", q.size(0), " and ", k.size(0));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t{1} << 32), op, ": offset must be in [0, 2**32), got ", offset);
  Call c;
  c.cu_q = cu_seqlens_q.contiguous();
  c.cu_k = cu_seqlens_k.contiguous();
  ac::Layout& l = c.layout;
  if (q_positions.has_value()) {
    const at::Tensor& t = *q_positions;
    TORCH_CHECK_VALUE(t.device() == q.device() && t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == q.size(0),
                      op, ": q_positions must be int32 [Tq] = [", q.size(0), "] on ", q.device(), ", got ",
                      t.scalar_type(), " ", t.sizes(), " on ", t.device());
    c.positions = t.contiguous();
    l.q_positions = c.positions.data_ptr<int32_t>();
  }
  l.dtype = q.scalar_type() == at::kBFloat16 ? ac::DType::kBFloat16 : ac::DType::kFloat16;
  l.head_dim = static_cast<int>(q.size(-1));
  l.heads = static_cast<int>(q.size(-2));
  l.batch = static_cast<int>(cu_seqlens_q.numel() - 1);
  l.rows_q = q.size(0);
  l.rows_k = k.size(0);
  l.cu_seqlens_q = c.cu_q.data_ptr<int32_t>();
  l.cu_seqlens_k = c.cu_k.data_ptr<int32_t>();
  l.max_seqlen_q = static_cast<int>(max_seqlen_q);
  l.max_seqlen_k = static_cast<int>(max_seqlen_k);
  l.scale = static_cast<float>(scale);
  l.dropout_p = dropout_p;
  l.seed = static_cast<uint64_t>(seed);
  l.offset = static_cast<uint32_t>(offset);
  return c;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t seed,
    int64_t offset, double scale, const std::optional<at::Tensor>& q_positions) {
  constexpr const char* op = "varlen_attention_fwd";
  check_floats(op, q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  Call c = make_call(op, q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
                     scale, q_positions);
  const auto [q, k, v, row_stride] = qkv_inputs(q_in, k_in, v_in);
  c.layout.qkv_stride = row_stride;
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  check_cuda(ac::attention_fwd(c.layout, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
             op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t seed,
    int64_t offset, double scale, const std::optional<at::Tensor>& q_positions, bool deterministic) {
  constexpr const char* op = "varlen_attention_bwd";
  check_floats(op, q_in, k_in, v_in);
  check_like(op, "dout", dout_in, q_in);
  check_like(op, "out", out_in, q_in);
  check_lse(op, lse_in, {q_in.size(1), q_in.size(0)}, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (!deterministic) {  // attention.py passes deterministic=True under torch.use_deterministic_algorithms
    at::globalContext().alertNotDeterministic(
        "lub_fast attention backward on CUDA with deterministic=False (dq is summed over key tiles with fp32 "
        "atomics)");
  }
  Call c = make_call(op, q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
                     scale, q_positions);
  const at::Tensor dout = dense(dout_in);
  const auto [q, k, v, row_stride] = qkv_inputs(q_in, k_in, v_in);
  c.layout.qkv_stride = row_stride;
  c.layout.deterministic = deterministic;
  const at::Tensor out = dense(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor drow = at::empty(lse.sizes(), lse.options());
  at::Tensor dq_accum;  // the atomic backward's, zeroed by the drow kernel; the deterministic one has none
  if (!deterministic) dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dq = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  check_cuda(ac::attention_bwd(c.layout, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse.data_ptr<float>(), drow.data_ptr<float>(),
                               deterministic ? nullptr : dq_accum.data_ptr<float>(),
                               dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                               c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
             op);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
}

}  // namespace lub_fast
