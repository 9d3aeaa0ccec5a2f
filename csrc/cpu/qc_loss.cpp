// CPU ops of the quasi-concavity loss family (SPEC.md 1.2). Kernels: qc2_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "geokernels/op_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "qc2_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kRowsPerBlock = 16;  // scratch of a backward block stays in L2
constexpr int64_t kMinPixelsPerTask = 1 << 15;

// Blocks per parallel task: small images stay on the calling thread (waking OpenMP workers
// costs more than the work, and stalls badly when the machine is oversubscribed).
int64_t block_grain(int64_t W) {
  return std::max<int64_t>(1, kMinPixelsPerTask / std::max<int64_t>(1, kRowsPerBlock * W));
}

template <class S>
Qc2Fns<S> qc2_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return qc2_fns_avx2<S>();
#endif
  return {&base::qc2_forward_block<S>, &base::qc2_backward_block<S>};
}

template <class S>
Qc2Params<S> qc2_params(double margin, double beta, double eps, double thr, bool relu) {
  return {static_cast<S>(margin), static_cast<S>(beta), static_cast<S>(eps), static_cast<S>(thr),
          relu};
}

void check_cpu_input(const at::Tensor& u) {
  check_image4d(u, "u");
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
                   "u must be float32 or float64 on CPU, got ", u.scalar_type());
}

at::Tensor qc2_loss_forward_cpu(const at::Tensor& u_in, double margin, double beta, double eps,
                                double grad_threshold, c10::string_view activation,
                                c10::string_view reduction) {
  check_cpu_input(u_in);
  const Reduction red = parse_reduction(reduction);
  const bool relu = parse_qc_activation(activation);
  check_qc2_params(margin, beta, eps, grad_threshold);
  const at::Tensor u = u_in.contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor map = red == Reduction::None ? at::empty_like(u) : at::Tensor();
  std::vector<double> sums(static_cast<size_t>(planes * row_blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "qc2_loss_forward_cpu", [&] {
    const auto p = qc2_params<scalar_t>(margin, beta, eps, grad_threshold, relu);
    const auto fns = qc2_fns<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* mp = map.defined() ? map.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, planes * row_blocks, block_grain(W), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        sums[b] = fns.forward_block(up + plane * H * W, H, W, r0, r1, p,
                                    mp ? mp + plane * H * W : nullptr);
      }
    });
  });
  if (red == Reduction::None) return map;
  double total = 0.0;  // fixed order: deterministic for any thread count
  for (double s : sums) total += s;
  if (red == Reduction::Mean) total /= static_cast<double>(u.numel());
  return at::scalar_tensor(total, u.options());
}

at::Tensor qc2_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& u_in, double margin,
                                 double beta, double eps, double grad_threshold,
                                 c10::string_view activation, c10::string_view reduction) {
  check_cpu_input(u_in);
  const Reduction red = parse_reduction(reduction);
  const bool relu = parse_qc_activation(activation);
  check_qc2_params(margin, beta, eps, grad_threshold);
  check_loss_grad(grad, u_in, red);
  const at::Tensor u = u_in.contiguous();
  const at::Tensor g = grad.to(u.scalar_type()).contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor grad_u = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "qc2_loss_backward_cpu", [&] {
    const auto p = qc2_params<scalar_t>(margin, beta, eps, grad_threshold, relu);
    const auto fns = qc2_fns<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* gmap = red == Reduction::None ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t w = 0;
    if (red != Reduction::None) {
      w = g.item<scalar_t>();
      if (red == Reduction::Mean) w = w / static_cast<scalar_t>(u.numel());
    }
    scalar_t* gp = grad_u.data_ptr<scalar_t>();
    at::parallel_for(0, planes * row_blocks, block_grain(W), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        const int64_t off = plane * H * W;
        fns.backward_block(up + off, gmap ? gmap + off : nullptr, w, H, W, r0, r1, p, gp + off);
      }
    });
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("qc2_loss_forward", &qc2_loss_forward_cpu);
  m.impl("qc2_loss_backward", &qc2_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace geokernels
