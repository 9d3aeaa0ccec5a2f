// CPU ops of the unrolled CFSS iterations (SPEC.md 2.4). Kernels: cfss_kernel.h.
//
// Forward: iters fused iterations; with save_states, the (u, q) state is kept every
// `checkpoint_every` = k iterations (t = k, 2k, ... < iters; t = 0 is recomputed from o).
// Backward: a hand-written reverse sweep, with one of two schedules:
// * k >= 1 (two levels): segments (t0, t0 + k] are processed from the last one; the segment's
//   states are replayed from its checkpoint into a k-state buffer, then the reverse steps run
//   t = t0 + k .. t0 + 1. Memory: (iters / k + k) states of 2 planes; time: one extra forward
//   pass (none when k = 1, which stores every state).
// * k = 0 (bisection, "recompute"): the forward keeps nothing; reverse_range(a, b) replays a ->
//   mid into a slot, reverses (mid, b] with one slot less, then (a, mid]. Memory:
//   ceil(log2 iters) + 1 states whatever the image count (7 for 50 iterations); time: about
//   log2(iters) / 2 extra forward passes. The initial state is regenerated from o when needed.
//
// Work is split into fixed (plane, row-block) blocks; scalar-gradient sums are kept per block
// in double and added in block order at the end, so results do not depend on the thread count.
// With at least as many planes as threads each thread runs whole planes through all iterations
// (its working set stays in cache); otherwise every iteration is split over row blocks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <functional>
#include <tuple>
#include <vector>

#include "geokernels/contour_flow_args.h"
#include "geokernels/op_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "cfss_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kRowsPerBlock = 32;

template <class S>
CfssFns<S> cfss_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return cfss_fns_avx2<S>();
#endif
  return {&base::cfss_init_block<S>, &base::cfss_forward_block<S>, &base::cfss_backward_block<S>,
          &base::cfss_finish_block<S>};
}

void check_cfss_inputs(const at::Tensor& o, const at::Tensor& T, const at::Tensor& params,
                       int64_t iters, int64_t halfsize, int64_t k) {
  check_image4d(o, "o");
  TORCH_CHECK_TYPE(o.scalar_type() == at::kFloat || o.scalar_type() == at::kDouble,
                   "o must be float32 or float64 on CPU, got ", o.scalar_type());
  check_flow_pairs(o, T, "o", "T");
  TORCH_CHECK_VALUE(params.numel() == 4 && params.device() == o.device(),
                    "params must hold [eps, tau, lam, sigma] on the device of o");
  TORCH_CHECK_VALUE(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK_VALUE(halfsize >= 0 && halfsize <= kCfssMaxHalfsize, "halfsize must be in [0, ",
                    kCfssMaxHalfsize, "], got ", halfsize);
  TORCH_CHECK_VALUE(k >= 0, "checkpoint_every must be >= 0 (0 = bisection), got ", k);
}

// Everything a block function needs about the call, per scalar type.
template <class S>
struct CfssCall {
  int64_t planes, H, W, row_blocks;
  S eps, tau, lam, sigma;
  std::vector<S> w, dw;
  const S* o;
  const S* T;
  int h;
  bool nonneg;

  CfssCall(const at::Tensor& o_t, const at::Tensor& T_t, const at::Tensor& params, int64_t halfsize,
           bool q_nonneg)
      : planes(o_t.size(0) * o_t.size(1)), H(o_t.size(2)), W(o_t.size(3)),
        row_blocks((o_t.size(2) + kRowsPerBlock - 1) / kRowsPerBlock),
        o(o_t.data_ptr<S>()), T(T_t.data_ptr<S>()), h(static_cast<int>(halfsize)), nonneg(q_nonneg) {
    const at::Tensor pc = params.to(at::kDouble).contiguous();
    const double* pp = pc.data_ptr<double>();
    TORCH_CHECK_VALUE(pp[0] > 0.0 || pp[0] < 0.0, "eps must be nonzero, got ", pp[0]);
    TORCH_CHECK_VALUE(pp[3] > 0.0, "sigma must be > 0, got ", pp[3]);
    eps = static_cast<S>(pp[0]);
    tau = static_cast<S>(pp[1]);
    lam = static_cast<S>(pp[2]);
    sigma = static_cast<S>(pp[3]);
    w.resize(2 * h + 1);
    dw.resize(2 * h + 1);
    cfss_gaussian_taps<S>(sigma, h, w.data(), dw.data());
  }
  int64_t hw() const { return H * W; }
  CfssPlane<S> plane(int64_t p) const {
    return {o + p * hw(), T + 2 * p * hw(), T + (2 * p + 1) * hw(), H, W, eps, tau, lam,
            w.data(), dw.data(), h, nonneg};
  }
  // fn(plane, r0, r1, block_index) over the blocks of planes [p0, p1), in parallel unless this
  // runs inside an outer parallel region (then in order, on this thread)
  template <class F>
  void for_blocks(int64_t p0, int64_t p1, const F& fn) const {
    at::parallel_for(p0 * row_blocks, p1 * row_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
        fn(p, r0, std::min(r0 + kRowsPerBlock, H), b);
      }
    });
  }
  // run(p0, p1) on whole planes per thread when there are enough planes, else on all at once
  template <class F>
  void for_planes(const F& run) const {
    if (planes >= at::get_num_threads() && planes > 1) {
      at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) { run(p0, p1); });
    } else {
      run(0, planes);
    }
  }
};

// Plane-major buffer of 2 tensors' worth (u then q) per state: state s, plane p.
template <class S>
struct StateRef {
  S* base;  // u of plane 0; q at base + planes * hw
  int64_t planes, hw;
  S* u(int64_t p) const { return base + p * hw; }
  S* q(int64_t p) const { return base + (planes + p) * hw; }
};

std::tuple<at::Tensor, at::Tensor> cfss_forward_cpu(const at::Tensor& o_in, const at::Tensor& T_in,
                                                    const at::Tensor& params, int64_t iters,
                                                    int64_t halfsize, bool q_nonneg,
                                                    int64_t checkpoint_every, bool save_states) {
  check_cfss_inputs(o_in, T_in, params, iters, halfsize, checkpoint_every);
  const at::Tensor o = o_in.contiguous();
  const at::Tensor T = T_in.to(o.scalar_type()).contiguous();
  const int64_t B = o.size(0), C = o.size(1), H = o.size(2), W = o.size(3);
  const int64_t k = checkpoint_every;
  const int64_t n_saved = save_states ? cfss_num_saved(iters, k) : 0;
  at::Tensor states = at::empty({n_saved, 2, B, C, H, W}, o.options());
  at::Tensor z = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cfss_forward_cpu", [&] {
    using S = scalar_t;
    const CfssCall<S> call(o, T, params, halfsize, q_nonneg);
    if (iters == 0) {
      z.copy_(o / static_cast<double>(call.eps));
      return;
    }
    const auto fns = cfss_fns<S>();
    const int64_t hw = call.hw(), planes = call.planes;
    at::Tensor work = at::empty({2, 2, planes, H, W}, o.options());
    const StateRef<S> ping{work.data_ptr<S>(), planes, hw};
    const StateRef<S> pong{work.data_ptr<S>() + 2 * planes * hw, planes, hw};
    S* zp = z.data_ptr<S>();
    S* sp = states.data_ptr<S>();
    call.for_planes([&](int64_t p0, int64_t p1) {
      call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t) {
        fns.init_block(call.plane(p), r0, r1, ping.u(p), ping.q(p));
      });
      StateRef<S> src = ping;
      for (int64_t t = 1; t <= iters; ++t) {
        const bool last = t == iters;
        StateRef<S> dst = src.base == ping.base ? pong : ping;
        if (!last && n_saved > 0 && t % k == 0) dst = {sp + (t / k - 1) * 2 * planes * hw, planes, hw};
        call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t) {
          fns.forward_block(call.plane(p), src.u(p), src.q(p), r0, r1, last ? nullptr : dst.u(p),
                            last ? nullptr : dst.q(p), last ? zp + p * hw : nullptr);
        });
        src = dst;
      }
    });
  });
  return {z, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfss_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& o_in, const at::Tensor& T_in,
    const at::Tensor& params, const at::Tensor& states_in, int64_t iters, int64_t halfsize,
    bool q_nonneg, int64_t checkpoint_every) {
  check_cfss_inputs(o_in, T_in, params, iters, halfsize, checkpoint_every);
  const at::Tensor o = o_in.contiguous();
  const at::Tensor T = T_in.to(o.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(grad_z.sizes() == o.sizes(), "grad_z must have the shape of o ", o.sizes(),
                    ", got ", grad_z.sizes());
  const at::Tensor gz = grad_z.to(o.scalar_type()).contiguous();
  const int64_t H = o.size(2), W = o.size(3);
  // states saved by a forward run with save_states=false (none): fall back to the bisection
  // schedule, which needs no saved state, so the op is always differentiable
  const bool none_saved = states_in.dim() == 6 && states_in.size(0) == 0;
  const int64_t k = none_saved ? 0 : checkpoint_every;
  const int64_t n_saved = cfss_num_saved(iters, k);
  TORCH_CHECK_VALUE(states_in.dim() == 6 && states_in.size(0) == n_saved && states_in.size(1) == 2 &&
                        states_in.numel() == n_saved * 2 * o.numel(),
                    "states must have shape (", n_saved, ", 2, B, C, H, W) for iters=", iters,
                    ", checkpoint_every=", k, ", got ", states_in.sizes());
  const at::Tensor states = states_in.to(o.scalar_type()).contiguous();
  at::Tensor g_o = at::zeros_like(o);
  at::Tensor g_T = at::zeros_like(T);
  at::Tensor g_params = at::zeros({4}, params.options());
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cfss_backward_cpu", [&] {
    using S = scalar_t;
    const CfssCall<S> call(o, T, params, halfsize, q_nonneg);
    const auto fns = cfss_fns<S>();
    const int64_t hw = call.hw(), planes = call.planes;
    const bool bisect = k == 0;
    // buffers of whole states (u, q): two-level: the replayed segment (slot 0 = its start);
    // bisection: one slot per recursion depth, then the replay's ping-pong partner
    const int64_t n_buf = bisect ? cfss_bisection_slots(iters) + 1
                                 : std::min<int64_t>(k, std::max<int64_t>(iters, 1));
    at::Tensor buf = at::empty({n_buf, 2, planes, H, W}, o.options());
    at::Tensor adj = at::empty({2, 2, planes, H, W}, o.options());  // (A, gq) ping-pong
    std::vector<double> sums(static_cast<size_t>(planes * call.row_blocks * kNumSums), 0.0);
    S* go = g_o.data_ptr<S>();
    S* gT = g_T.data_ptr<S>();
    const S* gzp = gz.data_ptr<S>();
    const S* sp = states.data_ptr<S>();
    S* bufp = buf.data_ptr<S>();
    S* adjp = adj.data_ptr<S>();
    auto buf_state = [&](int64_t slot) { return StateRef<S>{bufp + slot * 2 * planes * hw, planes, hw}; };
    const StateRef<S> adj_a{adjp, planes, hw}, adj_b{adjp + 2 * planes * hw, planes, hw};
    const StateRef<S> init_src{nullptr, planes, hw};  // "the initial state": rebuilt from o

    call.for_planes([&](int64_t p0, int64_t p1) {
      const S* A_cur = gzp;        // dL/dz_t, plane-major (B*C, H, W)
      const S* gq_cur = nullptr;   // dL/dq_t; none at t = iters
      StateRef<S> out = adj_a;
      auto init_into = [&](const StateRef<S>& d) {
        call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t) {
          fns.init_block(call.plane(p), r0, r1, d.u(p), d.q(p));
        });
      };
      auto step = [&](const StateRef<S>& a, const StateRef<S>& b) {
        call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t) {
          fns.forward_block(call.plane(p), a.u(p), a.q(p), r0, r1, b.u(p), b.q(p), nullptr);
        });
      };
      // the reverse of iteration t, given the state before it
      auto reverse = [&](const StateRef<S>& x) {
        const S* A_base = A_cur;
        const S* gq_base = gq_cur;
        const StateRef<S> o_ref = out;
        call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t blk) {
          fns.backward_block(call.plane(p), x.u(p), x.q(p), A_base + p * hw,
                             gq_base ? gq_base + p * hw : nullptr, r0, r1, o_ref.u(p), o_ref.q(p),
                             go + p * hw, gT + 2 * p * hw, gT + (2 * p + 1) * hw,
                             sums.data() + blk * kNumSums);
        });
        A_cur = out.u(0);
        gq_cur = out.q(0);
        out = out.base == adj_a.base ? adj_b : adj_a;
      };
      if (bisect && iters >= 1) {
        const StateRef<S> work = buf_state(n_buf - 1);
        // n >= 1 iterations from src into dst; intermediate states alternate so that the last
        // lands in dst (an initial src is built in whichever buffer the first step does not write)
        auto replay = [&](const StateRef<S>& src, int64_t n, const StateRef<S>& dst) {
          StateRef<S> cur = src;
          if (src.base == nullptr) {
            cur = n % 2 == 0 ? dst : work;
            init_into(cur);
          }
          for (int64_t j = 1; j <= n; ++j) {
            const StateRef<S> tgt = (n - j) % 2 == 0 ? dst : work;
            step(cur, tgt);
            cur = tgt;
          }
        };
        std::function<void(int64_t, const StateRef<S>&, int64_t, int)> reverse_range =
            [&](int64_t a, const StateRef<S>& sa, int64_t b, int depth) {
              if (b - a == 1) {
                if (sa.base == nullptr) {
                  init_into(work);
                  reverse(work);
                } else {
                  reverse(sa);
                }
                return;
              }
              const int64_t mid = a + (b - a) / 2;
              const StateRef<S> sm = buf_state(depth);
              replay(sa, mid - a, sm);
              reverse_range(mid, sm, b, depth + 1);
              reverse_range(a, sa, mid, depth);
            };
        reverse_range(0, init_src, iters, 0);
      } else if (iters >= 1) {
        const int64_t n_seg = n_saved + 1;
        for (int64_t s = n_seg - 1; s >= 0; --s) {
          const int64_t t0 = s * k, t1 = std::min((s + 1) * k, iters);
          std::vector<StateRef<S>> st(static_cast<size_t>(t1 - t0));  // states t0 .. t1-1
          if (s == 0) {
            st[0] = buf_state(0);
            init_into(st[0]);
          } else {
            st[0] = {const_cast<S*>(sp) + (s - 1) * 2 * planes * hw, planes, hw};
          }
          for (int64_t t = t0 + 1; t < t1; ++t) {
            st[t - t0] = buf_state(t - t0);
            step(st[t - t0 - 1], st[t - t0]);
          }
          for (int64_t t = t1; t > t0; --t) reverse(st[t - t0 - 1]);
        }
      }
      const S* A0 = A_cur;
      call.for_blocks(p0, p1, [&](int64_t p, int64_t r0, int64_t r1, int64_t blk) {
        fns.finish_block(call.plane(p), A0 + p * hw, r0, r1, go + p * hw,
                         sums.data() + blk * kNumSums);
      });
    });
    g_o.div_(static_cast<double>(call.eps));
    double tot[kNumSums] = {0.0, 0.0, 0.0, 0.0};
    for (size_t b = 0; b < sums.size() / kNumSums; ++b)
      for (int c = 0; c < kNumSums; ++c) tot[c] += sums[b * kNumSums + c];
    const double eps = static_cast<double>(call.eps), lam = static_cast<double>(call.lam);
    g_params.copy_(at::tensor({-tot[kSumZA] / eps, -tot[kSumRG], -tot[kSumPA] / eps,
                               -lam / eps * tot[kSumSigma]}, at::kDouble));
  });
  return {g_o, g_T.to(T_in.scalar_type()), g_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("cfss_forward", &cfss_forward_cpu);
  m.impl("cfss_backward", &cfss_backward_cpu);
}

}  // namespace cpu
}  // namespace geokernels
