// lub_fast::varlen_attention_fwd and lub_fast::varlen_attention_bwd on CPU: input checks, the
// kernels and dispatcher registration. The schemas, the references (the specification these
// kernels reproduce: same math and lse convention, bit-identical dropout keep decisions), fake and
// autograd registration live in lub_fast/ops/attention.py.
//
// Thread mapping: one task per (sequence b, head h) with queries and keys. at::parallel_for starts
// one worker per thread; the workers pull tasks, most expensive (Lq * Lk) first, from a shared
// atomic counter (dynamic scheduling: balanced for any mix of lengths and on busy cores). A task
// owns query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of head h in out, lse and dq, and key rows
// cu_seqlens_k[b] .. cu_seqlens_k[b + 1] in dk and dv, so no two threads write the same memory and
// the result does not depend on the thread count or on which thread runs what: the backward is
// deterministic (bit-identical across runs) whatever its `deterministic` argument says, with no
// atomics and each task's query blocks summed in order. Nothing is padded:
// a task of Lq queries and Lk keys costs O(Lq Lk D). Queries of a sequence without keys keep the
// initial zeros (out, dq) and lse = +inf; keys of a sequence without queries zero dk, dv.
//
// A task walks its query rows in blocks of kQueryBlock = 128 (BERT's whole row at L <= 128):
//   forward:  S = scale * Q_blk K^T; per row lse = logsumexp(S), P = exp(S - lse), Philox dropout
//             fused into the scaling (PD); out_blk = PD V.
//   backward: Drow = rowsum(dout * out); S and P = exp(S - lse) recomputed; dV += PD^T dout_blk;
//             dP = dropout(dout_blk V^T); dS = P * (dP - Drow); dq_blk = scale * dS K;
//             dK += scale * dS^T Q_blk.
// Dropout row ids: q_positions[row] when given, else the query's position in its sequence.
// The products are ATen's CPU addmm (MKL/oneDNN gemm, single-threaded inside the parallel region)
// on strided views of the [T, H, D] tensors, so no head is copied out; the row steps are
// attention_core.cpp.
//
// Precision: fp32 and fp64 inputs compute in their own type (softmax included); fp16 and bf16
// inputs are converted to fp32 up front and the results back, as the reference does. lse is fp32
// (fp64 for fp64 inputs). fp32 exp is a vectorised polynomial (relative error <= 2e-7).
//
// Size limits: per thread one (forward) or three (backward) [min(Lq, 128), Lk] buffers of the
// compute type, Lq, Lk the longest query and key sequences (64 KiB each for fp32 at L = 128,
// 2 MiB at L = 4096); B * H < 2**32 and positions < 2**31 (Philox counter words c2 and c1);
// T < 2**31 (int32 cu_seqlens). max_seqlen_q / max_seqlen_k are only checked (>= every length),
// never used to pad.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention_core.h"

namespace lub_fast {
namespace {

using attention::Dropout;

constexpr int64_t kQueryBlock = 128;

// Sequence boundaries read from one cu_seqlens, plus the longest length.
struct Bounds {
  std::vector<int64_t> cu;
  int64_t longest = 0;
  int64_t batch() const { return static_cast<int64_t>(cu.size()) - 1; }
  int64_t start(int64_t b) const { return cu[b]; }
  int64_t length(int64_t b) const { return cu[b + 1] - cu[b]; }
};

// The query and key layouts of one call, and the dropout row ids (null: positions in the query
// sequence).
struct Layout {
  Bounds q, k;
  const int32_t* q_positions = nullptr;
  int64_t batch() const { return q.batch(); }
};

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Bounds check_bounds(const char* op, const char* side, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                    int64_t total) {
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                        cu_seqlens.numel() >= 1,
                    op, ": cu_seqlens_", side, " must be int32 [B + 1], got ", cu_seqlens.scalar_type(),
                    " ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.device().is_cpu(), op, ": every tensor must be on the CPU, got ",
                    cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* cu_ptr = cu.data_ptr<int32_t>();
  Bounds bounds;
  bounds.cu.assign(cu_ptr, cu_ptr + cu.numel());
  const int64_t batch = bounds.batch();
  TORCH_CHECK_VALUE(bounds.cu[0] == 0, op, ": cu_seqlens_", side,
                    " must start at 0, be non-decreasing and end at T", side, "=", total,
                    "; got cu_seqlens_", side, "[0]=", bounds.cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(bounds.length(b) >= 0, op, ": cu_seqlens_", side,
                      " must start at 0, be non-decreasing and end at T", side, "=", total,
                      "; got cu_seqlens_", side, "[", b + 1, "]=", bounds.cu[b + 1], " < cu_seqlens_", side,
                      "[", b, "]=", bounds.cu[b]);
    bounds.longest = std::max(bounds.longest, bounds.length(b));
  }
  TORCH_CHECK_VALUE(bounds.cu[batch] == total, op, ": cu_seqlens_", side,
                    " must start at 0, be non-decreasing and end at T", side, "=", total,
                    "; got cu_seqlens_", side, "[", batch, "]=", bounds.cu[batch]);
  TORCH_CHECK_VALUE(bounds.longest <= max_seqlen, op, ": max_seqlen_", side, "=", max_seqlen,
                    " < longest sequence ", bounds.longest);
  return bounds;
}

Layout check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                    int64_t max_seqlen_k, double dropout_p, int64_t seed, int64_t offset,
                    const std::optional<at::Tensor>& q_positions) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == q.size(1) &&
                        k.size(2) == q.size(2),
                    op, ": q must be [Tq, H, D] and k, v [Tk, H, D], got ", q.sizes(), ", ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                        v.scalar_type() == q.scalar_type(),
                    op, ": q, k, v must share a floating dtype, got ", q.scalar_type(), ", ",
                    k.scalar_type(), ", ", v.scalar_type());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= 0xFFFFFFFFll, op,
                    ": offset must be in [0, 2**32), got ", offset);
  Layout layout;
  layout.q = check_bounds(op, "q", cu_seqlens_q, max_seqlen_q, q.size(0));
  layout.k = check_bounds(op, "k", cu_seqlens_k, max_seqlen_k, k.size(0));
  TORCH_CHECK_VALUE(layout.q.batch() == layout.k.batch(), op,
                    ": cu_seqlens_q and cu_seqlens_k must have B + 1 entries each, got ", layout.q.cu.size(),
                    " and ", layout.k.cu.size());
  TORCH_CHECK_VALUE(layout.batch() * q.size(1) <= 0xFFFFFFFFll, op,
                    ": B * H must be < 2**32 (the Philox counter word b * H + h), got B=", layout.batch(),
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

// The contiguous int32 [Tq] q_positions (undefined when absent) after its checks.
at::Tensor check_positions(const char* op, const std::optional<at::Tensor>& q_positions, const at::Tensor& q) {
  if (!q_positions.has_value()) return at::Tensor();
  const at::Tensor& t = *q_positions;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == q.size(0) && t.device().is_cpu(),
                    op, ": q_positions must be int32 [Tq] = [", q.size(0), "] on the CPU, got ", t.scalar_type(),
                    " ", t.sizes(), " on ", t.device());
  at::Tensor c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0, op, ": q_positions must be >= 0, got ", p[i], " at ", i);
  }
  return c;
}

// One task's rows in a [T, H, D] tensor: row r of head h is at base + (start + r) * ld + h * dim.
template <typename T>
struct Head {
  int64_t start, length, ld, dim;
  T* at(T* base, int64_t h) const { return base + start * ld + h * dim; }
  const T* at(const T* base, int64_t h) const { return base + start * ld + h * dim; }
};

// The query and key rows of one (sequence, head) task, and its dropout (null without).
template <typename T>
struct Task {
  Head<T> q, k;
  int64_t h;
  const Dropout* dropout;
  const int32_t* q_positions;  // the task's first query's entry, or null
};

// Philox row ids (counter word c1) of query rows [i0, i0 + m) of a task.
template <typename T>
void row_ids_of(const Task<T>& task, int64_t i0, int64_t m, uint32_t* ids) {
  for (int64_t r = 0; r < m; ++r) {
    ids[r] = static_cast<uint32_t>(task.q_positions != nullptr ? task.q_positions[i0 + r] : i0 + r);
  }
}

template <typename T>
void forward_task(const T* q, const T* k, const T* v, T* out, T* lse, const Task<T>& task, int64_t total_q,
                  T scale, T* scores, const at::TensorOptions& options) {
  const int64_t Lq = task.q.length, Lk = task.k.length, D = task.q.dim, ld = task.q.ld, h = task.h;
  const T* qh = task.q.at(q, h);
  const at::Tensor kt = view(task.k.at(k, h), D, Lk, 1, ld, options);
  const at::Tensor vh = view(task.k.at(v, h), Lk, D, ld, 1, options);
  T* lse_h = lse + h * total_q + task.q.start;
  uint32_t ids[kQueryBlock];
  for (int64_t i0 = 0; i0 < Lq; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, Lq - i0);
    at::Tensor s = view(scores, m, Lk, Lk, 1, options);
    at::cpu::addmm_out(s, s, view(qh + i0 * ld, m, D, ld, 1, options), kt, 0, scale);
    for (int64_t r = 0; r < m; ++r) lse_h[i0 + r] = attention::softmax_row(scores + r * Lk, Lk);
    if (task.dropout != nullptr) {
      row_ids_of(task, i0, m, ids);
      attention::dropout_rows(scores, m, Lk, ids, *task.dropout);
    }
    at::Tensor o = view(task.q.at(out, h) + i0 * ld, m, D, ld, 1, options);
    at::cpu::addmm_out(o, o, s, vh, 0, 1);
  }
}

template <typename T>
void backward_task(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse, T* dq, T* dk,
                   T* dv, const Task<T>& task, int64_t total_q, T scale, T* probs, T* grads, T* dropped, T* drow,
                   const at::TensorOptions& options) {
  const int64_t Lq = task.q.length, Lk = task.k.length, D = task.q.dim, ld = task.q.ld, h = task.h;
  const T* qh = task.q.at(q, h);
  const T* doh = task.q.at(dout, h);
  const T* oh = task.q.at(out, h);
  const T* lse_h = lse + h * total_q + task.q.start;
  for (int64_t i = 0; i < Lq; ++i) drow[i] = attention::dot(doh + i * ld, oh + i * ld, D);
  const at::Tensor kh = view(task.k.at(k, h), Lk, D, ld, 1, options);
  const at::Tensor kt = view(task.k.at(k, h), D, Lk, 1, ld, options);
  const at::Tensor vt = view(task.k.at(v, h), D, Lk, 1, ld, options);
  at::Tensor dk_h = view(task.k.at(dk, h), Lk, D, ld, 1, options);
  at::Tensor dv_h = view(task.k.at(dv, h), Lk, D, ld, 1, options);
  uint32_t ids[kQueryBlock];
  for (int64_t i0 = 0; i0 < Lq; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, Lq - i0);
    const int beta = i0 == 0 ? 0 : 1;  // dK and dV accumulate over query blocks
    const at::Tensor q_blk = view(qh + i0 * ld, m, D, ld, 1, options);
    const at::Tensor do_blk = view(doh + i0 * ld, m, D, ld, 1, options);
    at::Tensor p = view(probs, m, Lk, Lk, 1, options);
    at::Tensor g = view(grads, m, Lk, Lk, 1, options);
    at::cpu::addmm_out(p, p, q_blk, kt, 0, scale);
    for (int64_t r = 0; r < m; ++r) attention::probs_row(probs + r * Lk, Lk, lse_h[i0 + r]);
    at::cpu::addmm_out(g, g, do_blk, vt, 0, 1);  // dPD
    const T* pd = probs;
    if (task.dropout != nullptr) {  // PD and dP = dropout(dPD) with one Philox pass
      row_ids_of(task, i0, m, ids);
      attention::dropout_rows(probs, dropped, grads, m, Lk, ids, *task.dropout);
      pd = dropped;
    }
    at::cpu::addmm_out(dv_h, dv_h, view(pd, Lk, m, 1, Lk, options), do_blk, beta, 1);
    for (int64_t r = 0; r < m; ++r) attention::ds_row(probs + r * Lk, grads + r * Lk, Lk, drow[i0 + r]);
    at::Tensor dq_blk = view(task.q.at(dq, h) + i0 * ld, m, D, ld, 1, options);
    at::cpu::addmm_out(dq_blk, dq_blk, p, kh, 0, scale);
    at::cpu::addmm_out(dk_h, dk_h, view(probs, Lk, m, 1, Lk, options), q_blk, beta, scale);
  }
}

// Runs run(task, thread-local buffers, buffer size) for every (sequence, head) with queries and
// keys. The tasks, most expensive first, are pulled one at a time from a shared counter by every
// thread, so the threads stay balanced whatever the lengths and however busy each core is.
template <typename T, typename Run>
void for_each_head(const Layout& layout, int64_t heads, int64_t dim, const Dropout& dropout, bool with_dropout,
                   int64_t buffers, const at::TensorOptions& options, const Run& run) {
  std::vector<int64_t> order;
  for (int64_t b = 0; b < layout.batch(); ++b) {
    if (layout.q.length(b) > 0 && layout.k.length(b) > 0) order.push_back(b);
  }
  const auto cost = [&](int64_t b) { return layout.q.length(b) * layout.k.length(b); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  const int64_t tasks = static_cast<int64_t>(order.size()) * heads;
  if (tasks == 0) return;
  const int64_t scores = std::min(kQueryBlock, layout.q.longest) * layout.k.longest;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // at::empty is 64-byte aligned, so the gemm sees the same alignment on every run.
    at::Tensor scratch = at::empty({buffers * scores + layout.q.longest}, options);
    T* data = scratch.data_ptr<T>();
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      const int64_t b = order[t / heads], h = t % heads;
      Dropout d = dropout;
      d.stream = static_cast<uint32_t>(b * heads + h);
      const Task<T> task{Head<T>{layout.q.start(b), layout.q.length(b), heads * dim, dim},
                         Head<T>{layout.k.start(b), layout.k.length(b), heads * dim, dim}, h,
                         with_dropout ? &d : nullptr,
                         layout.q_positions != nullptr ? layout.q_positions + layout.q.start(b) : nullptr};
      run(task, data, scores);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t seed,
    int64_t offset, double scale, const std::optional<at::Tensor>& q_positions) {
  const char* op = "varlen_attention_fwd";
  Layout layout = check_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               seed, offset, q_positions);
  const at::Tensor positions = check_positions(op, q_positions, q);
  if (positions.defined()) layout.q_positions = positions.data_ptr<int32_t>();
  const at::ScalarType cdtype = compute_dtype(q.scalar_type());
  const at::Tensor qc = q.to(cdtype).contiguous();
  const at::Tensor kc = k.to(cdtype).contiguous();
  const at::Tensor vc = v.to(cdtype).contiguous();
  const int64_t total_q = q.size(0), heads = q.size(1), dim = q.size(2);
  at::Tensor out = at::zeros(q.sizes(), qc.options());  // rows without keys stay 0
  at::Tensor lse = at::full({heads, total_q}, INFINITY, qc.options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "varlen_attention_fwd_cpu", [&] {
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = kc.data_ptr<scalar_t>();
    const scalar_t* v_ptr = vc.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    const at::TensorOptions options = qc.options();
    for_each_head<scalar_t>(layout, heads, dim, make_dropout(dropout_p, seed, offset), dropout_p > 0.0, 1,
                            options, [&](const Task<scalar_t>& task, scalar_t* scratch, int64_t) {
                              forward_task(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, task, total_q,
                                           static_cast<scalar_t>(scale), scratch, options);
                            });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, int64_t seed, int64_t offset, double scale,
    const std::optional<at::Tensor>& q_positions, bool /*deterministic: this backward always is*/) {
  const char* op = "varlen_attention_bwd";
  Layout layout = check_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               seed, offset, q_positions);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": dout and out must have q's shape ", q.sizes(), ", got ", dout.sizes(),
                    " and ", out.sizes());
  TORCH_CHECK_VALUE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                    op, ": dout and out must have q's dtype ", q.scalar_type(), ", got ",
                    dout.scalar_type(), " and ", out.scalar_type());
  const int64_t total_q = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == total_q &&
                        at::isFloatingType(lse.scalar_type()),
                    op, ": lse must be a floating [H, Tq] = [", heads, ", ", total_q, "] tensor, got ",
                    lse.scalar_type(), " ", lse.sizes());
  for (const auto* t : {&dout, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ",
                      t->device());
  }
  const at::Tensor positions = check_positions(op, q_positions, q);
  if (positions.defined()) layout.q_positions = positions.data_ptr<int32_t>();
  const at::ScalarType cdtype = compute_dtype(q.scalar_type());
  const at::Tensor doc = dout.to(cdtype).contiguous();
  const at::Tensor qc = q.to(cdtype).contiguous();
  const at::Tensor kc = k.to(cdtype).contiguous();
  const at::Tensor vc = v.to(cdtype).contiguous();
  const at::Tensor oc = out.to(cdtype).contiguous();
  const at::Tensor lc = lse.to(cdtype).contiguous();
  // Zeros: rows of sequences without keys (dq) or without queries (dk, dv) get no task.
  at::Tensor dq = at::zeros(q.sizes(), qc.options());
  at::Tensor dk = at::zeros(k.sizes(), qc.options());
  at::Tensor dv = at::zeros(k.sizes(), qc.options());
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
    const at::TensorOptions options = qc.options();
    for_each_head<scalar_t>(layout, heads, dim, make_dropout(dropout_p, seed, offset), dropout_p > 0.0, 3,
                            options, [&](const Task<scalar_t>& task, scalar_t* scratch, int64_t scores) {
                              backward_task(do_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
                                            task, total_q, static_cast<scalar_t>(scale), scratch,
                                            scratch + scores, scratch + 2 * scores, scratch + 3 * scores,
                                            options);
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
