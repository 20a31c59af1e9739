// The SDPA route's call for one group of equal-size graphs, from packed rows, in one step: the
// (count * len, H, C) rows viewed as SDPA's (count, H, len, C) batches, the call, and its output
// viewed back as rows. Written in Python these are eight view ops and the call, whose dispatch
// costs more than the attention itself on graphs of a few dozen nodes. Inference only (the
// caller checks): the backward's second derivatives need the Python wrapper around the call.

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
