// Small graphs' attention in one step, where each torch op called from Python costs about what
// the attention does. packed_sdpa: the SDPA route's call for one group of equal-size graphs,
// from packed rows: the (count * len, H, C) rows viewed as SDPA's (count, H, len, C) batches,
// the call, and its output viewed back as rows (eight view ops and the call in Python).
// Inference only (the caller checks): the backward's second derivatives need the Python
// wrapper around the call. complete_graph_logits: the written-out logits route on one complete
// graph, the same torch ops as gatattn/backends/sdpa.py's, so autograd records them as it
// does there (any grad mode; the caller keeps it from traces, torch.func and torch.compile).

#include <ATen/ATen.h>

#include "kernels.h"

#include <optional>

at::Tensor packed_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t count, int64_t len_dst, int64_t len_src, double scale,
                       bool is_causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "packed_sdpa: q, k, v must be (rows, heads, channels)");
  TORCH_CHECK(q.size(0) == count * len_dst && k.size(0) == count * len_src &&
                  v.size(0) == count * len_src,
              "packed_sdpa: the rows do not match count x len");
  const auto batches = [count](const at::Tensor& rows, int64_t len) {
    return rows.view({count, len, rows.size(1), rows.size(2)}).transpose(1, 2);
  };
  const at::Tensor out = at::scaled_dot_product_attention(
      batches(q, len_dst), batches(k, len_src), batches(v, len_src), std::nullopt, 0.0,
      is_causal, scale, /*enable_gqa=*/k.size(1) != q.size(1));
  return out.transpose(1, 2).reshape({count * len_dst, q.size(1), v.size(2)});
}

// (N, H, C) rows of one complete graph: softmax(scale * q k^T) v per head, as (N, H, C_v)
// (a view of the (H, N, C_v) product). ignored: baddbmm's input, never read (beta = 0).
at::Tensor complete_graph_logits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& ignored, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "complete_graph_logits: q, k, v must be (rows, heads, channels)");
  const at::Tensor logits =
      at::baddbmm(ignored, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2), 0, scale);
  return at::bmm(at::softmax(logits, -1), v.transpose(0, 1)).transpose(0, 1);
}
