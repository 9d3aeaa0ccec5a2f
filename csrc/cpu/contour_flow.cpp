// CPU ops of the contour-flow shape loss (SPEC.md 2.3). Kernels: contour_flow_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "geokernels/contour_flow_args.h"
#include "geokernels/op_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "contour_flow_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kRowsPerBlock = 32;

template <class S>
CflFns<S> cfl_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return cfl_fns_avx2<S>();
#endif
  return {&base::cfl_forward_block<S>, &base::cfl_backward_block<S>};
}

void check_cfl_inputs(const at::Tensor& logits, const at::Tensor& flow) {
  check_image4d(logits, "logits");
  check_image4d(flow, "flow");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "logits must be float32 or float64 on CPU, got ", logits.scalar_type());
  check_flow_pairs(logits, flow);
}

at::Tensor contour_flow_loss_forward_cpu(const at::Tensor& logits_in, const at::Tensor& flow_in,
                                         double eps, c10::string_view reduction) {
  check_cfl_inputs(logits_in, flow_in);
  const Reduction red = parse_reduction(reduction);
  check_cfl_eps(eps);
  const at::Tensor x = logits_in.contiguous();
  const at::Tensor f = flow_in.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(2), W = x.size(3), planes = x.size(0) * x.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor map = red == Reduction::None ? at::empty_like(x) : at::Tensor();
  std::vector<double> sums(static_cast<size_t>(planes * row_blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contour_flow_loss_forward_cpu", [&] {
    const auto fns = cfl_fns<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* mp = map.defined() ? map.data_ptr<scalar_t>() : nullptr;
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, planes * row_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        const int64_t off = plane * H * W;
        sums[b] = fns.forward_block(xp + off, fp + 2 * off, fp + 2 * off + H * W, H, W, r0, r1, e,
                                    mp ? mp + off : nullptr);
      }
    });
  });
  if (red == Reduction::None) return map;
  double total = 0.0;  // fixed order: deterministic for any thread count
  for (double s : sums) total += s;
  if (red == Reduction::Mean) total /= static_cast<double>(x.numel());
  return at::scalar_tensor(total, x.options());
}

std::tuple<at::Tensor, at::Tensor> contour_flow_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits_in, const at::Tensor& flow_in, double eps,
    c10::string_view reduction) {
  check_cfl_inputs(logits_in, flow_in);
  const Reduction red = parse_reduction(reduction);
  check_cfl_eps(eps);
  check_loss_grad(grad, logits_in, red);
  const at::Tensor x = logits_in.contiguous();
  const at::Tensor f = flow_in.to(x.scalar_type()).contiguous();
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(2), W = x.size(3), planes = x.size(0) * x.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_f = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contour_flow_loss_backward_cpu", [&] {
    const auto fns = cfl_fns<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* gmap = red == Reduction::None ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t w = 0;
    if (red != Reduction::None) {
      w = g.item<scalar_t>();
      if (red == Reduction::Mean) w = w / static_cast<scalar_t>(x.numel());
    }
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gfp = grad_f.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, planes * row_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
        const int64_t off = plane * H * W;
        fns.backward_block(xp + off, fp + 2 * off, fp + 2 * off + H * W,
                           gmap ? gmap + off : nullptr, w, H, W, r0, r1, e, gxp + off,
                           gfp + 2 * off, gfp + 2 * off + H * W);
      }
    });
  });
  return {grad_x, grad_f.to(flow_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("contour_flow_loss_forward", &contour_flow_loss_forward_cpu);
  m.impl("contour_flow_loss_backward", &contour_flow_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace geokernels
