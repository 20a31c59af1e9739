// Whether q, k, v are finite, as one pass over them: the flag a keyword call reads with its
// graph (all_finite), and the guard of a graph= call on a dense route (poison_if_nonfinite_:
// `out` is filled with NaN, in place, when an entry is not finite; torch ops need three sums,
// two adds and a pass over the output for the same, on small graphs each about what the
// attention costs). The guard is only for an output that no autograd graph holds.

#include <ATen/ATen.h>

#include "kernels.h"
#include <ATen/core/grad_mode.h>

#include <limits>
#include <vector>

namespace {

// x * 0 is 0 for a finite x and NaN for inf or NaN; lanes of independent sums vectorise
// without reassociating (no fast-math, which would assume every value finite). Eight
// 256-bit registers of lanes: with fewer, each add waits on the last one to the same register
// (the scan ran at a quarter of the loads' rate with two).
template <typename T>
bool finite_run(const T* x, int64_t n) {
  constexpr int kLanes = 256 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * T(0);
  T total = 0;
  for (; i < n; ++i) total += x[i] * T(0);
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total == T(0);  // NaN compares unequal
}

// Every entry of a tensor whose last dimension is contiguous, run by run (the leading
// dimensions by their strides, as an odometer).
template <typename T>
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const T* base = t.const_data_ptr<T>();
  if (t.is_contiguous()) return finite_run(base, t.numel());
  const int64_t dims = t.dim(), run = t.size(dims - 1);
  std::vector<int64_t> index(dims - 1, 0);
  while (true) {
    int64_t offset = 0;
    for (int64_t d = 0; d < dims - 1; ++d) offset += index[d] * t.stride(d);
    if (!finite_run(base + offset, run)) return false;
    int64_t d = dims - 2;
    for (; d >= 0 && ++index[d] == t.size(d); --d) index[d] = 0;
    if (d < 0) return true;
  }
}

}  // namespace

namespace {

bool inputs_finite(const std::vector<at::Tensor>& inputs, const char* name) {
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == inputs[0].scalar_type(),
                name, ": inputs must be CPU tensors of one dtype");
    TORCH_CHECK(t.dim() > 0 && t.stride(-1) == 1, name,
                ": inputs need a contiguous last dimension");
  }
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(inputs[0].scalar_type(), "inputs_finite", [&] {
    for (const at::Tensor& t : inputs)
      if (finite && !all_finite<scalar_t>(t)) finite = false;
  });
  return finite;
}

}  // namespace

// A 0-dim bool tensor: every entry of the inputs is finite (the flag a keyword call reads
// with its graph; three torch sums cost twice this pass).
at::Tensor all_finite(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(!inputs.empty(), "all_finite: no inputs");
  return at::scalar_tensor(inputs_finite(inputs, "all_finite"), at::kBool);
}

// The same answer as a Python bool (a keyword call's planned step reads it directly).
bool inputs_are_finite(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(!inputs.empty(), "inputs_are_finite: no inputs");
  return inputs_finite(inputs, "inputs_are_finite");
}

void poison_if_nonfinite_(at::Tensor out, const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(out.device().is_cpu(), "poison_if_nonfinite_: CPU tensors only");
  TORCH_CHECK(!(at::GradMode::is_enabled() && out.requires_grad()),
              "poison_if_nonfinite_ writes in place: not for an output autograd records");
  TORCH_CHECK(!inputs.empty() && inputs[0].scalar_type() == out.scalar_type(),
              "poison_if_nonfinite_: inputs must have the output's dtype");
  if (!inputs_finite(inputs, "poison_if_nonfinite_"))
    out.fill_(std::numeric_limits<double>::quiet_NaN());
}
