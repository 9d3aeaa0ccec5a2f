// CPU ops of the first-order quasi-concavity loss (SPEC.md 1.3). Kernels: qc1_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "geokernels/dconvex_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "qc1_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

template <class S>
Qc1Fns<S> qc1_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return qc1_fns_avx2<S>();
#endif
  return {&base::qc1_forward_block<S>, &base::qc1_backward_block<S>};
}

constexpr int64_t kRowsPerBlock = 16;
// Smallest amount of work (pixels) worth a thread: tiny images run inline, since waking a thread
// team for every block (every CGPM step!) costs more than the work on a loaded machine.
constexpr int64_t kMinPixelsPerTask = 8192;

int64_t grain_blocks(int64_t W) {
  return std::max<int64_t>(1, kMinPixelsPerTask / std::max<int64_t>(1, kRowsPerBlock * W));
}

void check_cpu_input(const at::Tensor& u) {
  check_image4d(u, "u");
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
                   "u must be float32 or float64 on CPU, got ", u.scalar_type());
}

at::Tensor qc1_loss_forward_cpu(const at::Tensor& u_in, int64_t window, c10::string_view reduction) {
  check_cpu_input(u_in);
  check_qc1_window(window);
  const Reduction red = parse_reduction(reduction);
  const at::Tensor u = u_in.contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_blocks(W);
  at::Tensor map = red == Reduction::None ? at::empty_like(u) : at::Tensor();
  std::vector<double> sums(static_cast<size_t>(planes * row_blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "qc1_loss_forward_cpu", [&] {
    const auto fns = qc1_fns<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* mp = map.defined() ? map.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        sums[b] = fns.forward_block(up + plane * H * W, H, W, r0, r1, static_cast<int>(window),
                                    mp ? mp + plane * H * W : nullptr);
      }
    });
  });
  if (red == Reduction::None) return map;
  double total = 0.0;  // fixed order: deterministic for any thread count
  for (double s : sums) total += s;
  if (red == Reduction::Mean) total /= static_cast<double>(u.numel()) * static_cast<double>(window * window);
  return at::scalar_tensor(total, u.options());
}

at::Tensor qc1_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& u_in, int64_t window,
                                 c10::string_view reduction) {
  check_cpu_input(u_in);
  check_qc1_window(window);
  const Reduction red = parse_reduction(reduction);
  check_loss_grad(grad, u_in, red);
  const at::Tensor u = u_in.contiguous();
  const at::Tensor g = grad.to(u.scalar_type()).contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_blocks(W);
  at::Tensor grad_u = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "qc1_loss_backward_cpu", [&] {
    const auto fns = qc1_fns<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* gmap = red == Reduction::None ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t w = 0;
    if (red != Reduction::None) {
      w = g.item<scalar_t>();
      if (red == Reduction::Mean) w = w / static_cast<scalar_t>(u.numel() * window * window);
    }
    scalar_t* gp = grad_u.data_ptr<scalar_t>();
    at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        const int64_t off = plane * H * W;
        fns.backward_block(up + off, gmap ? gmap + off : nullptr, w, H, W, r0, r1,
                           static_cast<int>(window), gp + off);
      }
    });
  });
  return grad_u;
}

// The reduced loss and its gradient for an upstream gradient of 1, in ONE pass (the backward
// pass evaluates every sigmoid the forward needs): autograd then only scales the gradient.
std::tuple<at::Tensor, at::Tensor> qc1_loss_value_and_grad_cpu(const at::Tensor& u_in, int64_t window,
                                                               c10::string_view reduction) {
  check_cpu_input(u_in);
  check_qc1_window(window);
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(red != Reduction::None, "qc1_loss_value_and_grad needs reduction 'mean' or 'sum'");
  const at::Tensor u = u_in.contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_blocks(W);
  const double terms = static_cast<double>(u.numel()) * static_cast<double>(window * window);
  std::vector<double> sums(static_cast<size_t>(planes * row_blocks), 0.0);
  at::Tensor grad_u = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "qc1_loss_value_and_grad_cpu", [&] {
    const auto fns = qc1_fns<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    // same scalar as qc1_loss_backward with grad = 1
    const scalar_t w = red == Reduction::Mean
        ? scalar_t(1) / static_cast<scalar_t>(u.numel() * window * window) : scalar_t(1);
    scalar_t* gp = grad_u.data_ptr<scalar_t>();
    at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        const int64_t off = plane * H * W;
        sums[b] = fns.backward_block(up + off, nullptr, w, H, W, r0, r1, static_cast<int>(window), gp + off);
      }
    });
  });
  double total = 0.0;  // fixed order: deterministic for any thread count
  for (double s : sums) total += s;
  if (red == Reduction::Mean) total /= terms;
  return {at::scalar_tensor(total, u.options()), grad_u};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("qc1_loss_forward", &qc1_loss_forward_cpu);
  m.impl("qc1_loss_backward", &qc1_loss_backward_cpu);
  m.impl("qc1_loss_value_and_grad", &qc1_loss_value_and_grad_cpu);
}

}  // namespace cpu
}  // namespace geokernels
