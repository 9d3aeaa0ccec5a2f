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
  m.def("qc1_loss_forward(Tensor u, int window, str reduction) -> Tensor");
  m.def("qc1_loss_backward(Tensor grad, Tensor u, int window, str reduction) -> Tensor");
  // (loss, d loss / d u) in one pass, reduction "mean" or "sum" (CPU; autograd scales the grad)
  m.def("qc1_loss_value_and_grad(Tensor u, int window, str reduction) -> (Tensor, Tensor)");
  // Steps first_step+1 .. first_step+steps of the CGPM Adam loop from the state (o, m, v);
  // order 2 = qc2_loss (margin..activation used), 1 = qc1_loss (window used).
  // Returns (o, m, v, history); history has `steps` entries when return_history, else none.
  m.def(
      "cgpm_steps(Tensor o, Tensor m, Tensor v, Tensor u0, int first_step, int steps, float lr, "
      "float beta1, float beta2, float adam_eps, float weight, int order, float margin, "
      "float beta, float eps, float grad_threshold, str activation, int window, "
      "bool return_history) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- SPEC 1.6: midpoint convexification ----------------------------------------------------
  // (out, sources, sweeps): sources is int64 (B, C, H, W) if track_sources else empty; sweeps is a
  // 0-dim int64 tensor on u's device (no host sync needed to return it).
  m.def(
      "midpoint_convexify_forward(Tensor u, float radius, int max_iters, float tol, str mode, "
      "bool track_sources) -> (Tensor, Tensor, Tensor)");
  m.def("midpoint_convexify_backward(Tensor grad, Tensor sources) -> Tensor");

  // ---- SPEC 2.1-2.2: exact distance transform, contour-flow field ----------------------------
  // distance of every pixel to the nearest zero pixel (invert: to the nearest nonzero pixel)
  m.def("distance_transform(Tensor mask, bool invert, bool float64, str no_background) -> Tensor");
  // (B, C, H, W) mask -> (B, 2C, H, W) unit tangent field; channels 2c, 2c+1 belong to channel c
  m.def("contour_flow_field(Tensor mask, bool central, bool float64) -> Tensor");

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
  // Philox4x32-10 of N counters (N, 4) under key = seed: the raw stream of the noise (philox.h).
  m.def("philox4x32_10(Tensor counters, int seed) -> Tensor");
  // eps (B, K, C, H, W) exactly as the kernels regenerate it, for images image_offset + b.
  m.def("flow_mismatch_noise(Tensor x, int seed, int image_offset, int num_paths) -> Tensor");
  // x_t = (1 - t) eps_k + t x for paths n = b*K + k in [path_start, path_start + path_count).
  m.def(
      "flow_mismatch_paths(Tensor x, Tensor? noise, float t, int seed, int image_offset, "
      "int num_paths, int path_start, int path_count) -> Tensor");
  // delta[n] = sum_c (v[n] - (x - eps_k))^2 for paths n = path_start .. path_start + v.size(0) - 1.
  m.def(
      "flow_mismatch_delta(Tensor v, Tensor x, Tensor? noise, int seed, int image_offset, "
      "int num_paths, int path_start) -> Tensor");
  // Fused: heat += weight * agg_k delta (v holds all B*K paths); returns "non-finite seen".
  m.def(
      "flow_mismatch_accumulate_(Tensor(a!) heat, Tensor v, Tensor x, Tensor? noise, float weight, "
      "int seed, int image_offset, int num_paths, int rank, bool mean) -> Tensor");
  // heat += weight * agg_k delta[:, k] for a (B, K, H, W) delta buffer; returns "non-finite seen".
  m.def(
      "flow_mismatch_aggregate_(Tensor(a!) heat, Tensor delta, float weight, int rank, bool mean) "
      "-> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "geokernels compiled kernels (ops are under torch.ops.geokernels)";
  // the torch this binary was built against, in full (torch.__version__ at build time: a
  // "2.14.1a0+git..." source build is not the "2.14.1" of torch/version.h)
#ifdef GEOKERNELS_TORCH_VERSION
  mod.attr("TORCH_VERSION") = GEOKERNELS_TORCH_VERSION;
#else
  mod.attr("TORCH_VERSION") = TORCH_VERSION;
#endif
#ifdef GEOKERNELS_WITH_CUDA
  mod.attr("CUDA_VERSION") = GEOKERNELS_CUDA_VERSION_STRING;
  mod.attr("CUDA_ARCHS") = GEOKERNELS_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST of the build
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
