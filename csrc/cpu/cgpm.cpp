// CPU op of the fused CGPM loop (SPEC.md 1.5). Kernel: cgpm_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "geokernels/dconvex_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "cgpm_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kRowsPerBlock = 16;
// Smallest amount of work (pixels) worth a thread: tiny images run inline, since waking a thread
// team for every block (every CGPM step!) costs more than the work on a loaded machine.
constexpr int64_t kMinPixelsPerTask = 8192;

int64_t grain_blocks(int64_t W) {
  return std::max<int64_t>(1, kMinPixelsPerTask / std::max<int64_t>(1, kRowsPerBlock * W));
}

template <class S>
CgpmFns<S> cgpm_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return cgpm_fns_avx2<S>();
#endif
  return {&base::cgpm_step_block<S>};
}

// Runs steps first_step+1 .. first_step+steps of SPEC 1.5 from the state (o, m, v); returns the
// new state and the (steps,) loss history (empty unless return_history).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgpm_steps_cpu(
    const at::Tensor& o_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& u0_in,
    int64_t first_step, int64_t steps, double lr, double beta1, double beta2, double adam_eps,
    double weight, int64_t order, double margin, double beta, double eps, double grad_threshold,
    c10::string_view activation, int64_t window, bool return_history) {
  check_cgpm_tensors(o_in, m_in, v_in, u0_in);
  TORCH_CHECK_TYPE(o_in.scalar_type() == at::kFloat || o_in.scalar_type() == at::kDouble,
                   "o must be float32 or float64 on CPU, got ", o_in.scalar_type());
  const CgpmConfig cfg = make_cgpm_config(first_step, steps, lr, beta1, beta2, adam_eps, weight,
                                          order, margin, beta, eps, grad_threshold, activation,
                                          window, return_history);
  at::Tensor o = o_in.contiguous().clone();
  at::Tensor m = m_in.contiguous().clone();
  at::Tensor v = v_in.contiguous().clone();
  const at::Tensor u0 = u0_in.contiguous();
  at::Tensor history = at::zeros({return_history ? steps : 0}, o.options().dtype(at::kDouble));
  if (steps == 0) return {o, m, v, history.to(o.scalar_type())};
  at::Tensor u_cur = at::sigmoid(o);
  at::Tensor u_next = at::empty_like(o);
  at::Tensor grad_buf = at::empty_like(o);
  const int64_t H = o.size(2), W = o.size(3), planes = o.size(0) * o.size(1);
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_blocks(W);
  const double n = static_cast<double>(o.numel());
  const double n_qc = order == 1 ? n * static_cast<double>(window * window) : n;
  std::vector<double> partial(static_cast<size_t>(planes * row_blocks), 0.0);
  double* hist = history.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cgpm_steps_cpu", [&] {
    using S = scalar_t;
    const auto fns = cgpm_fns<S>();
    CgpmStepArgs<S> a{};
    a.u0 = u0.data_ptr<S>();
    a.o = o.data_ptr<S>();
    a.m = m.data_ptr<S>();
    a.v = v.data_ptr<S>();
    a.grad_buf = grad_buf.data_ptr<S>();
    a.H = H;
    a.W = W;
    a.order = static_cast<int>(order);
    a.qc2 = {static_cast<S>(margin), static_cast<S>(beta), static_cast<S>(eps),
             static_cast<S>(grad_threshold), cfg.relu};
    a.window = static_cast<int>(window);
    a.qc_weight = static_cast<S>(weight / n_qc);
    a.fid_weight = static_cast<S>(2.0 / n);
    a.beta1 = static_cast<S>(beta1);
    a.one_minus_beta1 = static_cast<S>(1.0 - beta1);
    a.beta2 = static_cast<S>(beta2);
    a.one_minus_beta2 = static_cast<S>(1.0 - beta2);
    a.lr = static_cast<S>(lr);
    a.adam_eps = static_cast<S>(adam_eps);
    a.with_loss = return_history;
    a.loss_fid_scale = 1.0 / n;
    a.loss_qc_scale = weight / n_qc;
    S* cur = u_cur.data_ptr<S>();
    S* next = u_next.data_ptr<S>();
    for (int64_t s = 0; s < steps; ++s) {
      const double t = static_cast<double>(first_step + s + 1);
      a.bias1 = static_cast<S>(1.0 - std::pow(beta1, t));
      a.bias2 = static_cast<S>(1.0 - std::pow(beta2, t));
      a.u_cur = cur;
      a.u_next = next;
      at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
          partial[b] = fns.step_block(a, plane, r0, std::min(r0 + kRowsPerBlock, H));
        }
      });
      if (return_history) {
        double total = 0.0;  // fixed order: deterministic for any thread count
        for (double p : partial) total += p;
        hist[s] = total;
      }
      std::swap(cur, next);
    }
  });
  return {o, m, v, history.to(o.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("cgpm_steps", &cgpm_steps_cpu);
}

}  // namespace cpu
}  // namespace geokernels
