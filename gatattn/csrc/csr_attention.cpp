// Attention over an edge set in CSR order, fused per target on the CPU: one pass over each
// target's in-edges reads a source's keys and values once for all heads, where the SDDMM and
// SpMM of the torch-ops form gather them once per head and product. The arithmetic is the
// torch-ops form's, step for step (gatattn/backends/sparse.py, edge_softmax): the row maximum
// propagates NaN, a row whose maximum is -inf shifts by 0, a sum that is not > 0 divides by 1,
// so non-finite inputs reach exactly the same outputs (float32's exponentials, vectorised, may
// differ from expf's by a few ulp). The backward takes each target's softmax shift from the
// output, <dO_i, out_i>, equal to the torch-ops form's sum_e alpha_e <dO_i, v_j> but for
// rounding: the values are then gathered by no pass (8% off the backward on 100k nodes with
// 16 random in-edges each, where the loops wait on memory).
//
// Layouts: q (N_dst, H, C), k (N_src, H, C), v (N_src, H, C_v), contiguous; per-edge tensors
// (E, H) in target-major (CSR) order; row_ptr (N_dst + 1,) and col (E,) the CSR, t_row_ptr
// (N_src + 1,), t_col (E,) (each edge's target) and t_perm (E,) (its target-major position)
// the transpose.

#include <torch/extension.h>

#include "kernels.h"

#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 64;  // rows per task: a few microseconds of work each

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

// out[h] = <a_h, b_h> for the H heads of two (H, n) rows. With AVX2, float and a compiled
// width that is a multiple of 8, four heads are summed across lanes together (three hadds and
// one add) instead of each reduced on its own, and stored at once.
template <typename T, int64_t kWidth>
inline void head_dots(const T* a, const T* b, int64_t H, int64_t n, T* out) {
  int64_t h = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float> && kWidth > 0 && kWidth % 8 == 0) {
    for (; h + 4 <= H; h += 4) {
      __m256 acc[4];
      for (int r = 0; r < 4; ++r) {
        const float* x = a + (h + r) * kWidth;
        const float* y = b + (h + r) * kWidth;
        acc[r] = _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y));
        for (int64_t c = 8; c < kWidth; c += 8)
          acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(y + c), acc[r]);
      }
      const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]),
                                         _mm256_hadd_ps(acc[2], acc[3]));
      _mm_storeu_ps(out + h, _mm_add_ps(_mm256_castps256_ps128(sums),
                                        _mm256_extractf128_ps(sums, 1)));
    }
  }
#endif
  for (; h < H; ++h) out[h] = dot(a + h * n, b + h * n, n);
}

// The forward's exponentials, eight at a time through glibc's vector expf (libmvec, which the
// build links where it finds it: GATATTN_LIBMVEC) for float, else one by one. -inf gives 0 and
// NaN stays NaN, as expf; results agree with expf to a few ulp (float32 rounding's order).
#if defined(__AVX2__) && defined(GATATTN_LIBMVEC)
extern "C" __m256 _ZGVdN8v_expf(__m256 x);
#endif

template <typename T>
inline void exp_in_place(T* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(GATATTN_LIBMVEC)
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _ZGVdN8v_expf(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

// A head width known at compile time lets the compiler unroll the dot products and updates
// and keep them in registers: C = C_v = 32 took a quarter to a half off the loops' time. The
// kernels are compiled for the common widths and once for any width (kWidth = 0).
template <int64_t kWidth>
inline void fix_widths(int64_t& C, int64_t& Cv) {
  if constexpr (kWidth > 0) C = Cv = kWidth;
}

template <typename F>
void with_head_width(int64_t C, int64_t Cv, const F& run) {
  if (C == Cv) {
    switch (C) {
      case 16: return run(std::integral_constant<int64_t, 16>{});
      case 32: return run(std::integral_constant<int64_t, 32>{});
      case 64: return run(std::integral_constant<int64_t, 64>{});
    }
  }
  run(std::integral_constant<int64_t, 0>{});
}

// The rows of sources a few edges ahead are requested early: the loops wait on memory (rows
// scattered over arrays far larger than the caches), not on arithmetic.
constexpr int64_t kAhead = 4;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t c = 0; c < n; c += 64 / sizeof(T)) __builtin_prefetch(row + c);
}

// Before a loop over positions [first, last): the rows (n values each) of its first kAhead
// indices; inside it, at position p, the row kAhead positions on.
template <typename T>
inline void prefetch_first(const T* rows, const int64_t* index, int64_t first, int64_t last,
                           int64_t n) {
  for (int64_t p = first; p < std::min(first + kAhead, last); ++p)
    prefetch_row(rows + index[p] * n, n);
}

template <typename T>
inline void prefetch_next(const T* rows, const int64_t* index, int64_t p, int64_t last,
                          int64_t n) {
  if (p + kAhead < last) prefetch_row(rows + index[p + kAhead] * n, n);
}

template <typename T, int64_t kWidth>
void forward_rows(const T* q, const T* k, const T* v, const T* bias, const int64_t* row_ptr,
                  const int64_t* col, T scale, int64_t H, int64_t C, int64_t Cv, T* out,
                  T* alpha, T* lse, int64_t begin, int64_t end) {
  fix_widths<kWidth>(C, Cv);
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> divisor(H), maxima(H);
  std::vector<char> has_nan(H);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t first = row_ptr[i], last = row_ptr[i + 1];
    const T* q_i = q + i * H * C;
    prefetch_first(k, col, first, last, H * C);
    for (int64_t e = first; e < last; ++e) {  // logits, written where the weights go
      prefetch_next(k, col, e, last, H * C);
      T* s = alpha + e * H;
      head_dots<T, kWidth>(q_i, k + col[e] * H * C, H, C, s);
      for (int64_t h = 0; h < H; ++h) s[h] = bias ? s[h] * scale + bias[e * H + h] : s[h] * scale;
    }
    prefetch_first(v, col, first, last, H * Cv);
    // Maxima per head in one pass over the block, exponentials over the block as one array.
    for (int64_t h = 0; h < H; ++h) { maxima[h] = -inf; has_nan[h] = 0; }
    for (int64_t e = first; e < last; ++e)
      for (int64_t h = 0; h < H; ++h) {
        const T s = alpha[e * H + h];
        if (std::isnan(s)) has_nan[h] = 1;
        else if (s > maxima[h]) maxima[h] = s;
      }
    for (int64_t h = 0; h < H; ++h) {
      if (has_nan[h]) maxima[h] = nan;
      if (maxima[h] == -inf) maxima[h] = 0;
    }
    T* block = alpha + first * H;
    const int64_t n = (last - first) * H;
    for (int64_t e = 0; e < last - first; ++e)
      for (int64_t h = 0; h < H; ++h) block[e * H + h] -= maxima[h];
    exp_in_place(block, n);
    for (int64_t h = 0; h < H; ++h) divisor[h] = 0;
    for (int64_t e = 0; e < last - first; ++e)
      for (int64_t h = 0; h < H; ++h) divisor[h] += block[e * H + h];
    for (int64_t h = 0; h < H; ++h) {
      const T total = divisor[h];
      divisor[h] = total > 0 ? total : T(1);
      lse[i * H + h] = total == 0 ? -inf : maxima[h] + std::log(total);
    }
    T* out_i = out + i * H * Cv;
    for (int64_t c = 0; c < H * Cv; ++c) out_i[c] = 0;
    for (int64_t e = first; e < last; ++e) {
      prefetch_next(v, col, e, last, H * Cv);
      const T* v_j = v + col[e] * H * Cv;
      for (int64_t h = 0; h < H; ++h) {
        const T a = alpha[e * H + h] / divisor[h];
        alpha[e * H + h] = a;
        axpy(a, v_j + h * Cv, out_i + h * Cv, Cv);
      }
    }
  }
}

// The softmax backward's shift per target and head: D_i = <dO_i, out_i> - grad_lse_i, which
// equals sum_e alpha_e <dO_i, v_j> - grad_lse_i (out_i = sum_e alpha_e v_j) without gathering
// a source's values (FlashAttention's rowsum(dO * O)).
template <typename T, int64_t kWidth>
void target_shifts(const T* out, const T* grad_out, const T* grad_lse, int64_t H, int64_t Cv,
                   T* shift, int64_t begin, int64_t end) {
  if constexpr (kWidth > 0) Cv = kWidth;
  for (int64_t i = begin; i < end; ++i) {
    head_dots<T, kWidth>(grad_out + i * H * Cv, out + i * H * Cv, H, Cv, shift + i * H);
    if (grad_lse)
      for (int64_t h = 0; h < H; ++h) shift[i * H + h] -= grad_lse[i * H + h];
  }
}

// Per source, along the transpose (a source's own keys and values stay in cache, its targets'
// rows are gathered once for all of it): dS_e = alpha_e (<dO_i, v_j> - D_i), the logits'
// gradient, dv_j = sum_e alpha_e dO_i, dk_j = scale * sum_e dS_e q_i.
template <typename T, int64_t kWidth>
void source_grads(const T* q, const T* v, const T* alpha, const T* shift, const T* grad_out,
                  const int64_t* t_row_ptr, const int64_t* t_col, const int64_t* t_perm,
                  T scale, int64_t H, int64_t C, int64_t Cv, T* grad_s, T* grad_k, T* grad_v,
                  int64_t begin, int64_t end) {
  fix_widths<kWidth>(C, Cv);
  std::vector<T> dp(H);
  for (int64_t j = begin; j < end; ++j) {
    T* dk_j = grad_k ? grad_k + j * H * C : nullptr;
    T* dv_j = grad_v ? grad_v + j * H * Cv : nullptr;
    const T* v_j = v + j * H * Cv;
    if (dk_j) for (int64_t c = 0; c < H * C; ++c) dk_j[c] = 0;
    if (dv_j) for (int64_t c = 0; c < H * Cv; ++c) dv_j[c] = 0;
    const int64_t first = t_row_ptr[j], last = t_row_ptr[j + 1];
    prefetch_first(grad_out, t_col, first, last, H * Cv);
    if (dk_j) prefetch_first(q, t_col, first, last, H * C);
    for (int64_t p = first; p < last; ++p) {
      prefetch_next(grad_out, t_col, p, last, H * Cv);
      if (dk_j) prefetch_next(q, t_col, p, last, H * C);
      prefetch_next(alpha, t_perm, p, last, H);  // the edge's H weights and H dS
      prefetch_next(grad_s, t_perm, p, last, H);
      prefetch_next(shift, t_col, p, last, H);
      const int64_t e = t_perm[p], i = t_col[p];
      const T* g_i = grad_out + i * H * Cv;
      head_dots<T, kWidth>(g_i, v_j, H, Cv, dp.data());
      for (int64_t h = 0; h < H; ++h) {
        const T a = alpha[e * H + h];
        const T s = a * (dp[h] - shift[i * H + h]);
        grad_s[e * H + h] = s;
        if (dv_j) axpy(a, g_i + h * Cv, dv_j + h * Cv, Cv);
        if (dk_j) axpy(s * scale, q + (i * H + h) * C, dk_j + h * C, C);
      }
    }
  }
}

// Per target: dq_i = scale * sum_e dS_e k_j.
template <typename T, int64_t kWidth>
void query_grads(const T* k, const T* grad_s, const int64_t* row_ptr, const int64_t* col,
                 T scale, int64_t H, int64_t C, T* grad_q, int64_t begin, int64_t end) {
  if constexpr (kWidth > 0) C = kWidth;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t first = row_ptr[i], last = row_ptr[i + 1];
    T* dq_i = grad_q + i * H * C;
    for (int64_t c = 0; c < H * C; ++c) dq_i[c] = 0;
    prefetch_first(k, col, first, last, H * C);
    for (int64_t e = first; e < last; ++e) {
      prefetch_next(k, col, e, last, H * C);
      const T* k_j = k + col[e] * H * C;
      for (int64_t h = 0; h < H; ++h) axpy(grad_s[e * H + h] * scale, k_j + h * C, dq_i + h * C, C);
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), "csr_attention runs on the CPU");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "csr_attention needs contiguous q, k, v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "csr_attention needs one dtype for q, k, v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(1) == k.size(1) &&
                  k.size(1) == v.size(1) && q.size(2) == k.size(2) && k.size(0) == v.size(0),
              "csr_attention needs q (N_dst, H, C), k (N_src, H, C), v (N_src, H, C_v)");
}

// The CSR arrays are read as contiguous int64 (out-of-range values are the caller's to avoid:
// gatattn builds them from validated edges).
void check_rows(const at::Tensor& row_ptr, const at::Tensor& index, int64_t rows,
                int64_t edges) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && index.scalar_type() == at::kLong &&
                  row_ptr.is_contiguous() && index.is_contiguous() &&
                  row_ptr.numel() == rows + 1 && index.numel() == edges,
              "csr_attention needs contiguous int64 row pointers (rows + 1) and indices (E)");
}

void check_per_edge(const c10::optional<at::Tensor>& values, const at::Tensor& q,
                    int64_t rows) {
  TORCH_CHECK(!values.has_value() || (values->is_contiguous() &&
                                      values->scalar_type() == q.scalar_type() &&
                                      values->numel() == rows * q.size(1)),
              "csr_attention needs per-edge (or per-target) values of shape (rows, H), "
              "contiguous, in q's dtype");
}

}  // namespace

// Returns out (N_dst, H, C_v), alpha (E, H) and lse (N_dst, H).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& row_ptr, const at::Tensor& col, double scale) {
  check_inputs(q, k, v);
  const int64_t N = q.size(0), H = q.size(1), C = q.size(2), Cv = v.size(2);
  const int64_t E = col.numel();
  check_rows(row_ptr, col, N, E);
  check_per_edge(bias, q, E);
  auto out = at::empty({N, H, Cv}, q.options());
  auto alpha = at::empty({E, H}, q.options());
  auto lse = at::empty({N, H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "csr_attention_forward", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    with_head_width(C, Cv, [&](auto width) {
      at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(width)::value>(
            q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), b,
            row_ptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), static_cast<scalar_t>(scale),
            H, C, Cv, out.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
            lse.data_ptr<scalar_t>(), begin, end);
      });
    });
  });
  return {out, alpha, lse};
}

// Returns dq, dk, dv (undefined where not needed) and dS (E, H), the logits' gradient. out is
// the forward's output (N_dst, H, C_v), which gives each target's shift without a gather.
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& alpha, const at::Tensor& out,
                                 const at::Tensor& grad_out,
                                 const c10::optional<at::Tensor>& grad_lse,
                                 const at::Tensor& row_ptr, const at::Tensor& col,
                                 const at::Tensor& t_row_ptr, const at::Tensor& t_col,
                                 const at::Tensor& t_perm, double scale, bool need_q,
                                 bool need_k, bool need_v) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.is_contiguous() && alpha.is_contiguous() && out.is_contiguous(),
              "csr_attention's backward needs contiguous gradients, weights and output");
  const int64_t N_dst = q.size(0), N_src = k.size(0), H = q.size(1), C = q.size(2);
  const int64_t Cv = v.size(2), E = col.numel();
  check_rows(row_ptr, col, N_dst, E);
  check_rows(t_row_ptr, t_col, N_src, E);
  check_rows(t_row_ptr, t_perm, N_src, E);
  check_per_edge(alpha, q, E);
  check_per_edge(grad_lse, q, N_dst);
  for (const at::Tensor* t : {&grad_out, &out})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({N_dst, H, Cv}) &&
                    t->scalar_type() == q.scalar_type(),
                "csr_attention's backward needs grad_out and out (N_dst, H, C_v) in q's dtype");
  auto grad_s = at::empty({E, H}, q.options());
  auto shift = at::empty({N_dst, H}, q.options());
  at::Tensor dq = need_q ? at::empty_like(q) : at::Tensor();
  at::Tensor dk = need_k ? at::empty_like(k) : at::Tensor();
  at::Tensor dv = need_v ? at::empty_like(v) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "csr_attention_backward", [&] {
    const scalar_t s = static_cast<scalar_t>(scale);
    const scalar_t* g_lse = grad_lse.has_value() ? grad_lse->data_ptr<scalar_t>() : nullptr;
    with_head_width(C, Cv, [&](auto width) {
      constexpr int64_t kWidth = decltype(width)::value;
      at::parallel_for(0, N_dst, kGrain, [&](int64_t begin, int64_t end) {
        target_shifts<scalar_t, kWidth>(out.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                        g_lse, H, Cv, shift.data_ptr<scalar_t>(), begin, end);
      });
      at::parallel_for(0, N_src, kGrain, [&](int64_t begin, int64_t end) {
        source_grads<scalar_t, kWidth>(
            q.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
            shift.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
            t_row_ptr.data_ptr<int64_t>(), t_col.data_ptr<int64_t>(),
            t_perm.data_ptr<int64_t>(), s, H, C, Cv, grad_s.data_ptr<scalar_t>(),
            need_k ? dk.data_ptr<scalar_t>() : nullptr,
            need_v ? dv.data_ptr<scalar_t>() : nullptr, begin, end);
      });
      if (!need_q) return;
      at::parallel_for(0, N_dst, kGrain, [&](int64_t begin, int64_t end) {
        query_grads<scalar_t, kWidth>(k.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(),
                                      row_ptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), s,
                                      H, C, dq.data_ptr<scalar_t>(), begin, end);
      });
    });
  });
  return {dq, dk, dv, grad_s};
}
