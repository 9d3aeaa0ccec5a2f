// geokernels._C: the one binding translation unit. Every op schema is declared here, once;
// backends register their kernels next to their code with TORCH_LIBRARY_IMPL
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA). Python adds fake kernels and autograd
// (geokernels/ops). Schemas are grouped by SPEC section.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "../csrc/cpu/isa.h"

namespace {

bool cuda_compiled() {
#ifdef GEOKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(geokernels, m) {
  // Build information (no tensors): was the CUDA backend compiled into this binary?
  m.def("cuda_compiled() -> bool", &cuda_compiled);

  // ---- SPEC 1.2: second-order quasi-concavity loss ------------------------------------------
  m.def(
      "qc2_loss_forward(Tensor u, float margin, float beta, float eps, float grad_threshold, "
      "str activation, str reduction) -> Tensor");
  m.def(
      "qc2_loss_backward(Tensor grad, Tensor u, float margin, float beta, float eps, "
      "float grad_threshold, str activation, str reduction) -> Tensor");

  // ---- SPEC 1.3-1.5: qc1_loss, fidelity_loss, CGPM fused steps --------------------------------

  // ---- SPEC 1.6: midpoint convexification ----------------------------------------------------

  // ---- SPEC 2.1-2.2: exact distance transform, contour-flow field ----------------------------

  // ---- SPEC 2.3-2.4: contour-flow loss, CFSS iterations -------------------------------------
  m.def("contour_flow_loss_forward(Tensor logits, Tensor flow, float eps, str reduction) -> Tensor");
  m.def(
      "contour_flow_loss_backward(Tensor grad, Tensor logits, Tensor flow, float eps, "
      "str reduction) -> (Tensor, Tensor)");
  // params = [eps, tau, lam, sigma] (a tensor so that gradients reach them without a host sync);
  // states = the saved (u, q) checkpoints, shape (n, 2, B, C, H, W).
  m.def(
      "cfss_forward(Tensor o, Tensor T, Tensor params, int iters, int halfsize, bool q_nonneg, "
      "int checkpoint_every, bool save_states) -> (Tensor, Tensor)");
  m.def(
      "cfss_backward(Tensor grad_z, Tensor o, Tensor T, Tensor params, Tensor states, int iters, "
      "int halfsize, bool q_nonneg, int checkpoint_every) -> (Tensor, Tensor, Tensor)");

  // ---- SPEC 3: flow-mismatching path building and reduction ----------------------------------
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "geokernels compiled kernels (ops are under torch.ops.geokernels)";
  mod.attr("TORCH_VERSION") = TORCH_VERSION;  // the torch this binary was built against
#ifdef GEOKERNELS_WITH_CUDA
  mod.attr("CUDA_VERSION") = GEOKERNELS_CUDA_VERSION_STRING;
#else
  mod.attr("CUDA_VERSION") = pybind11::none();
#endif
  mod.def("cuda_compiled", &cuda_compiled, "True if the CUDA kernels were compiled in");
  mod.def(
      "_set_cpu_isa",
      [](const std::string& isa) {
        using geokernels::cpu::Isa;
        Isa v;
        if (isa == "auto") v = Isa::Auto;
        else if (isa == "base") v = Isa::Base;
        else if (isa == "avx2") v = Isa::Avx2;
        else throw pybind11::value_error("isa must be 'auto', 'base' or 'avx2', got '" + isa + "'");
        geokernels::cpu::isa_override().store(static_cast<int>(v));
      },
      "Force the baseline ('base') or the AVX2 build of the CPU kernels (testing aid).");
  mod.def("_active_cpu_isa", &geokernels::cpu::active_isa,
          "Which CPU kernel build runs now: 'avx2' or 'base'.");
}
