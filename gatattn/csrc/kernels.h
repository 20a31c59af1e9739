// The functions of gatattn's CPU kernels that the Python module binds (module.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

// csr_attention.cpp
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& row_ptr, const at::Tensor& col, double scale);
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& alpha, const at::Tensor& out,
                                 const at::Tensor& grad_out,
                                 const c10::optional<at::Tensor>& grad_lse,
                                 const at::Tensor& row_ptr, const at::Tensor& col,
                                 const at::Tensor& t_row_ptr, const at::Tensor& t_col,
                                 const at::Tensor& t_perm, double scale, bool need_q,
                                 bool need_k, bool need_v);
// packed_sdpa.cpp
at::Tensor packed_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t count, int64_t len_dst, int64_t len_src, double scale,
                       bool is_causal);
at::Tensor complete_graph_logits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& ignored, double scale);
// nonfinite.cpp
at::Tensor all_finite(const std::vector<at::Tensor>& inputs);
bool inputs_are_finite(const std::vector<at::Tensor>& inputs);
void poison_if_nonfinite_(at::Tensor out, const std::vector<at::Tensor>& inputs);
