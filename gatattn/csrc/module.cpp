// The Python module of gatattn's CPU kernels (gatattn/backends/native.py builds it).

#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "CSR attention forward (CPU)");
  m.def("backward", &backward, "CSR attention backward (CPU)");
  m.def("packed_sdpa", &packed_sdpa,
        "SDPA over one group of equal-size graphs, from and to packed rows (inference)");
  m.def("complete_graph_logits", &complete_graph_logits,
        "the written-out logits route on one complete graph, in one step");
  m.def("all_finite", &all_finite, "0-dim bool tensor: every entry is finite (CPU)");
  m.def("inputs_are_finite", &inputs_are_finite, "every entry is finite, as a bool (CPU)");
  m.def("poison_if_nonfinite_", &poison_if_nonfinite_,
        "fills out with NaN, in place, if an input holds a non-finite entry (CPU)");
}
