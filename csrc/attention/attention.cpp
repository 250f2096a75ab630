// lub_fast::varlen_attention_fwd and lub_fast::varlen_attention_bwd on CPU: input checks, the
// kernels and dispatcher registration. The schemas, the references (the specification these
// kernels reproduce: same math and lse convention, bit-identical dropout keep decisions), fake and
// autograd registration live in lub_fast/ops/attention.py. The padded ops keep their reference.
//
// Thread mapping: one task per non-empty (sequence b, head h). at::parallel_for starts one worker
// per thread; the workers pull tasks, longest sequence first, from a shared atomic counter (dynamic
// scheduling: balanced for any mix of lengths and on busy cores). A task owns rows
// cu_seqlens[b] .. cu_seqlens[b + 1] of head h in out, lse, dq, dk and dv, so no two threads write
// the same memory and the result does not depend on the thread count or on which thread runs what.
// Nothing is padded: a task of length L costs O(L^2 D).
//
// A task walks its query rows in blocks of kQueryBlock = 128 (BERT's whole row at L <= 128):
//   forward:  S = scale * Q_blk K^T; per row lse = logsumexp(S), P = exp(S - lse), Philox dropout
//             fused into the scaling (PD); out_blk = PD V.
//   backward: Drow = rowsum(dout * out); S and P = exp(S - lse) recomputed; dV += PD^T dout_blk;
//             dP = dropout(dout_blk V^T); dS = P * (dP - Drow); dq_blk = scale * dS K;
//             dK += scale * dS^T Q_blk.
// The products are ATen's CPU addmm (MKL/oneDNN gemm, single-threaded inside the parallel region)
// on strided views of the [T, H, D] tensors, so no head is copied out; the row steps are
// attention_core.cpp.
//
// Precision: fp32 and fp64 inputs compute in their own type (softmax included); fp16 and bf16
// inputs are converted to fp32 up front and the results back, as the reference does. lse is fp32
// (fp64 for fp64 inputs). fp32 exp is a vectorised polynomial (relative error <= 2e-7).
//
// Size limits: per thread one (forward) or three (backward) [min(L, 128), L] buffers of the
// compute type, L the longest sequence (64 KiB each for fp32 at L = 128, 2 MiB at L = 4096);
// B * H < 2**32 and L < 2**32 (Philox counter words c2 and c1); T < 2**31 (int32 cu_seqlens).
// max_seqlen is only checked (>= every length), never used to pad.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "attention/attention_core.h"

namespace lub_fast {
namespace {

using attention::Dropout;

constexpr int64_t kQueryBlock = 128;

// Sequence boundaries read from cu_seqlens, plus the longest length.
struct Layout {
  std::vector<int64_t> cu;
  int64_t longest = 0;
  int64_t batch() const { return static_cast<int64_t>(cu.size()) - 1; }
};

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Layout check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cu_seqlens, int64_t max_seqlen, double dropout_p,
                    int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [T, H, D], got ", q.dim(), "-D ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
                    ": k and v must have q's shape ", q.sizes(), ", got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                        v.scalar_type() == q.scalar_type(),
                    op, ": q, k, v must share a floating dtype, got ", q.scalar_type(), ", ",
                    k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                        cu_seqlens.numel() >= 1,
                    op, ": cu_seqlens must be int32 [B + 1], got ", cu_seqlens.scalar_type(), " ",
                    cu_seqlens.sizes());
  for (const auto* t : {&q, &k, &v, &cu_seqlens}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= 0xFFFFFFFFll, op,
                    ": offset must be in [0, 2**32), got ", offset);

  const int64_t total = q.size(0);
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* cu_ptr = cu.data_ptr<int32_t>();
  Layout layout;
  layout.cu.assign(cu_ptr, cu_ptr + cu.numel());
  const int64_t batch = layout.batch();
  TORCH_CHECK_VALUE(layout.cu[0] == 0, op,
                    ": cu_seqlens must start at 0, be non-decreasing and end at T=", total,
                    "; got cu_seqlens[0]=", layout.cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = layout.cu[b + 1] - layout.cu[b];
    TORCH_CHECK_VALUE(length >= 0, op,
                      ": cu_seqlens must start at 0, be non-decreasing and end at T=", total,
                      "; got cu_seqlens[", b + 1, "]=", layout.cu[b + 1], " < cu_seqlens[", b,
                      "]=", layout.cu[b]);
    layout.longest = std::max(layout.longest, length);
  }
  TORCH_CHECK_VALUE(layout.cu[batch] == total, op,
                    ": cu_seqlens must start at 0, be non-decreasing and end at T=", total,
                    "; got cu_seqlens[", batch, "]=", layout.cu[batch]);
  TORCH_CHECK_VALUE(layout.longest <= max_seqlen, op, ": max_seqlen=", max_seqlen,
                    " < longest sequence ", layout.longest);
  TORCH_CHECK_VALUE(batch * q.size(1) <= 0xFFFFFFFFll, op,
                    ": B * H must be < 2**32 (the Philox counter word b * H + h), got B=", batch,
                    ", H=", q.size(1));
  return layout;
}

Dropout make_dropout(double dropout_p, int64_t seed, int64_t offset) {
  Dropout d;
  d.k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull);
  d.k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  d.stream = 0;
  d.offset = static_cast<uint32_t>(offset);
  d.threshold = philox::keep_threshold(dropout_p);
  d.factor = 1.0 / (1.0 - dropout_p);
  return d;
}

// [rows, cols] view of raw memory with the given strides (swapped strides give a transpose).
template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                const at::TensorOptions& options) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride}, options);
}

// One (sequence, head) task's pointers: row r of head h is at base + r * ld.
template <typename T>
struct Head {
  int64_t start, length, ld, dim;
  T* at(T* base, int64_t h) const { return base + start * ld + h * dim; }
  const T* at(const T* base, int64_t h) const { return base + start * ld + h * dim; }
};

template <typename T>
void forward_task(const T* q, const T* k, const T* v, T* out, T* lse, const Head<T>& seq,
                  int64_t h, int64_t total, T scale, const Dropout* dropout, T* scores,
                  const at::TensorOptions& options) {
  const int64_t L = seq.length, D = seq.dim, ld = seq.ld;
  const T* qh = seq.at(q, h);
  const at::Tensor kt = view(seq.at(k, h), D, L, 1, ld, options);
  const at::Tensor vh = view(seq.at(v, h), L, D, ld, 1, options);
  T* lse_h = lse + h * total + seq.start;
  for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, L - i0);
    at::Tensor s = view(scores, m, L, L, 1, options);
    at::cpu::addmm_out(s, s, view(qh + i0 * ld, m, D, ld, 1, options), kt, 0, scale);
    for (int64_t r = 0; r < m; ++r) lse_h[i0 + r] = attention::softmax_row(scores + r * L, L);
    if (dropout != nullptr) {
      attention::dropout_rows(scores, m, L, static_cast<uint32_t>(i0), *dropout);
    }
    at::Tensor o = view(seq.at(out, h) + i0 * ld, m, D, ld, 1, options);
    at::cpu::addmm_out(o, o, s, vh, 0, 1);
  }
}

template <typename T>
void backward_task(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
                   T* dq, T* dk, T* dv, const Head<T>& seq, int64_t h, int64_t total, T scale,
                   const Dropout* dropout, T* probs, T* grads, T* dropped, T* drow,
                   const at::TensorOptions& options) {
  const int64_t L = seq.length, D = seq.dim, ld = seq.ld;
  const T* qh = seq.at(q, h);
  const T* doh = seq.at(dout, h);
  const T* oh = seq.at(out, h);
  const T* lse_h = lse + h * total + seq.start;
  for (int64_t i = 0; i < L; ++i) drow[i] = attention::dot(doh + i * ld, oh + i * ld, D);
  const at::Tensor kh = view(seq.at(k, h), L, D, ld, 1, options);
  const at::Tensor kt = view(seq.at(k, h), D, L, 1, ld, options);
  const at::Tensor vt = view(seq.at(v, h), D, L, 1, ld, options);
  at::Tensor dk_h = view(seq.at(dk, h), L, D, ld, 1, options);
  at::Tensor dv_h = view(seq.at(dv, h), L, D, ld, 1, options);
  for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, L - i0);
    const int beta = i0 == 0 ? 0 : 1;  // dK and dV accumulate over query blocks
    const at::Tensor q_blk = view(qh + i0 * ld, m, D, ld, 1, options);
    const at::Tensor do_blk = view(doh + i0 * ld, m, D, ld, 1, options);
    at::Tensor p = view(probs, m, L, L, 1, options);
    at::Tensor g = view(grads, m, L, L, 1, options);
    at::cpu::addmm_out(p, p, q_blk, kt, 0, scale);
    for (int64_t r = 0; r < m; ++r) attention::probs_row(probs + r * L, L, lse_h[i0 + r]);
    at::cpu::addmm_out(g, g, do_blk, vt, 0, 1);  // dPD
    const T* pd = probs;
    if (dropout != nullptr) {  // PD and dP = dropout(dPD) with one Philox pass
      attention::dropout_rows(probs, dropped, grads, m, L, static_cast<uint32_t>(i0), *dropout);
      pd = dropped;
    }
    at::cpu::addmm_out(dv_h, dv_h, view(pd, L, m, 1, L, options), do_blk, beta, 1);
    for (int64_t r = 0; r < m; ++r) attention::ds_row(probs + r * L, grads + r * L, L, drow[i0 + r]);
    at::Tensor dq_blk = view(seq.at(dq, h) + i0 * ld, m, D, ld, 1, options);
    at::cpu::addmm_out(dq_blk, dq_blk, p, kh, 0, scale);
    at::cpu::addmm_out(dk_h, dk_h, view(probs, L, m, 1, L, options), q_blk, beta, scale);
  }
}

// Runs task(b, h, thread-local buffers) for every non-empty (sequence, head). The tasks, longest
// sequence first, are pulled one at a time from a shared counter by every thread, so the threads
// stay balanced whatever the lengths and however busy each core is.
template <typename T, typename Task>
void for_each_head(const Layout& layout, int64_t heads, int64_t buffers,
                   const at::TensorOptions& options, const Task& task) {
  std::vector<int64_t> order;
  for (int64_t b = 0; b < layout.batch(); ++b) {
    if (layout.cu[b + 1] > layout.cu[b]) order.push_back(b);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return layout.cu[a + 1] - layout.cu[a] > layout.cu[b + 1] - layout.cu[b];
  });
  const int64_t tasks = static_cast<int64_t>(order.size()) * heads;
  if (tasks == 0) return;
  const int64_t scores = std::min(kQueryBlock, layout.longest) * layout.longest;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // at::empty is 64-byte aligned, so the gemm sees the same alignment on every run.
    at::Tensor scratch = at::empty({buffers * scores + layout.longest}, options);
    T* data = scratch.data_ptr<T>();
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      task(order[t / heads], t % heads, data, scores);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double dropout_p, int64_t seed, int64_t offset, double scale) {
  const char* op = "varlen_attention_fwd";
  const Layout layout = check_inputs(op, q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset);
  const at::ScalarType cdtype = compute_dtype(q.scalar_type());
  const at::Tensor qc = q.to(cdtype).contiguous();
  const at::Tensor kc = k.to(cdtype).contiguous();
  const at::Tensor vc = v.to(cdtype).contiguous();
  const int64_t total = q.size(0), heads = q.size(1), dim = q.size(2);
  at::Tensor out = at::empty(q.sizes(), qc.options());
  at::Tensor lse = at::empty({heads, total}, qc.options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "varlen_attention_fwd_cpu", [&] {
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = kc.data_ptr<scalar_t>();
    const scalar_t* v_ptr = vc.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    const Dropout base = make_dropout(dropout_p, seed, offset);
    const at::TensorOptions options = qc.options();
    for_each_head<scalar_t>(layout, heads, 1, options, [&](int64_t b, int64_t h, scalar_t* scratch,
                                                  int64_t) {
      const Head<scalar_t> seq{layout.cu[b], layout.cu[b + 1] - layout.cu[b], heads * dim, dim};
      Dropout d = base;
      d.stream = static_cast<uint32_t>(b * heads + h);
      forward_task(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seq, h, total,
                   static_cast<scalar_t>(scale), dropout_p > 0.0 ? &d : nullptr, scratch, options);
    });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double dropout_p, int64_t seed, int64_t offset, double scale) {
  const char* op = "varlen_attention_bwd";
  const Layout layout = check_inputs(op, q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": dout and out must have q's shape ", q.sizes(), ", got ", dout.sizes(),
                    " and ", out.sizes());
  TORCH_CHECK_VALUE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                    op, ": dout and out must have q's dtype ", q.scalar_type(), ", got ",
                    dout.scalar_type(), " and ", out.scalar_type());
  const int64_t total = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == total &&
                        at::isFloatingType(lse.scalar_type()),
                    op, ": lse must be a floating [H, T] = [", heads, ", ", total, "] tensor, got ",
                    lse.scalar_type(), " ", lse.sizes());
  for (const auto* t : {&dout, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ",
                      t->device());
  }
  const at::ScalarType cdtype = compute_dtype(q.scalar_type());
  const at::Tensor doc = dout.to(cdtype).contiguous();
  const at::Tensor qc = q.to(cdtype).contiguous();
  const at::Tensor kc = k.to(cdtype).contiguous();
  const at::Tensor vc = v.to(cdtype).contiguous();
  const at::Tensor oc = out.to(cdtype).contiguous();
  const at::Tensor lc = lse.to(cdtype).contiguous();
  at::Tensor dq = at::empty(q.sizes(), qc.options());
  at::Tensor dk = at::empty(q.sizes(), qc.options());
  at::Tensor dv = at::empty(q.sizes(), qc.options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "varlen_attention_bwd_cpu", [&] {
    const scalar_t* do_ptr = doc.data_ptr<scalar_t>();
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = kc.data_ptr<scalar_t>();
    const scalar_t* v_ptr = vc.data_ptr<scalar_t>();
    const scalar_t* o_ptr = oc.data_ptr<scalar_t>();
    const scalar_t* lse_ptr = lc.data_ptr<scalar_t>();
    scalar_t* dq_ptr = dq.data_ptr<scalar_t>();
    scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
    scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
    const Dropout base = make_dropout(dropout_p, seed, offset);
    const at::TensorOptions options = qc.options();
    for_each_head<scalar_t>(layout, heads, 3, options, [&](int64_t b, int64_t h, scalar_t* scratch,
                                                  int64_t scores) {
      const Head<scalar_t> seq{layout.cu[b], layout.cu[b + 1] - layout.cu[b], heads * dim, dim};
      Dropout d = base;
      d.stream = static_cast<uint32_t>(b * heads + h);
      backward_task(do_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, seq, h,
                    total, static_cast<scalar_t>(scale), dropout_p > 0.0 ? &d : nullptr, scratch,
                    scratch + scores, scratch + 2 * scores, scratch + 3 * scores, options);
    });
  });
  const at::ScalarType dtype = q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lub_fast, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace lub_fast
