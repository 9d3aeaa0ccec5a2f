// CPU ops of local midpoint convexification (SPEC.md 1.6). Tile kernel: midpoint_kernel.h.
//
// mode "jacobi" is the published iteration, exactly: two padded buffers, every sweep reads one
// and writes the other. A tile is recomputed only if some pixel within reach of it changed in the
// previous sweep; otherwise its values (and sources) are provably those of two sweeps ago, which
// the output buffer still holds, so it is not even copied. Tiles run in parallel; each writes only
// its own pixels, so the result does not depend on the thread count.
//
// mode "fast" is Gauss-Seidel: one buffer updated in place, tiles coloured so that tiles run in
// parallel never read each other's pixels, colours visited one after the other, and the scan
// direction alternating from pass to pass. Deterministic for any thread count; reaches the same
// fixed point as Jacobi (the operator is monotone and extensive, see SPEC 1.6) in fewer passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "geokernels/op_args.h"
#include "isa.h"
#include "midpoint_common.h"

#define GK_CPU_ISA base
#include "midpoint_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 8;
constexpr int64_t kTileCols = 64;  // a multiple of every dtype's vector chunk

template <class S>
MidpointFns<S> midpoint_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return midpoint_fns_avx2<S>();
#endif
  return {&base::midpoint_tile<S>};
}

MidpointMode parse_mode(c10::string_view mode) {
  if (mode == "jacobi") return MidpointMode::Jacobi;
  if (mode == "fast") return MidpointMode::Fast;
  TORCH_CHECK_VALUE(false, "mode must be 'jacobi' or 'fast', got '", std::string(mode), "'");
  return MidpointMode::Jacobi;
}

void check_args(const at::Tensor& u, double radius, int64_t max_iters, double tol) {
  check_image4d(u, "u");
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
                   "u must be float32 or float64 on CPU, got ", u.scalar_type());
  TORCH_CHECK_VALUE(radius >= 0.0 && radius <= kMidpointMaxRadius,
                    "radius must be in [0, ", kMidpointMaxRadius, "], got ", radius);
  TORCH_CHECK_VALUE(max_iters >= 0, "max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK_VALUE(tol >= 0.0, "tol must be >= 0, got ", tol);
}

// Plane geometry: padded buffers and the tile grid.
struct Geometry {
  int64_t planes, H, W, R, ld, padded_rows, plane_size;
  int64_t tiles_y, tiles_x, reach_y, reach_x;  // reach_*: neighbour tiles within R pixels
  Geometry(const at::Tensor& u, int64_t reach) {
    planes = u.size(0) * u.size(1);
    H = u.size(2);
    W = u.size(3);
    R = reach;
    ld = W + 2 * R + kMidpointSlack;
    padded_rows = H + 2 * R;
    plane_size = padded_rows * ld;
    tiles_y = (H + kTileRows - 1) / kTileRows;
    tiles_x = (W + kTileCols - 1) / kTileCols;
    reach_y = (R + kTileRows - 1) / kTileRows;
    reach_x = (R + kTileCols - 1) / kTileCols;
  }
  int64_t tiles() const { return tiles_y * tiles_x; }
  int64_t origin() const { return R * ld + R; }
  // the interior (B, C, H, W) view of a padded (planes, padded_rows, ld) buffer
  at::Tensor interior(const at::Tensor& padded) const {
    return padded.narrow(1, R, H).narrow(2, R, W);
  }
};

// Tiles per parallel task: ~16M pair evaluations (~1-2 ms on one core). A sweep is a barrier, and
// on a busy machine a thread hand-off per sweep costs more than it saves, so a sweep that small
// (one 256x256 plane at r = 15) runs on one thread; batches and large images run in parallel.
int64_t tile_grain(const MidpointPairs& pairs) {
  return std::max<int64_t>(1, (int64_t{1} << 24) / ((pairs.K + 1) * kTileRows * kTileCols));
}

// Tile index t of a plane -> rows and columns.
template <class S>
MidpointTile<S> make_tile(const Geometry& g, int64_t t, const S* in, S* out, const int64_t* src_in,
                          int64_t* src_out, bool reverse) {
  const int64_t ty = t / g.tiles_x, tx = t % g.tiles_x;
  MidpointTile<S> tile;
  tile.in = in;
  tile.out = out;
  tile.src_in = src_in;
  tile.src_out = src_out;
  tile.ld = g.ld;
  tile.i0 = ty * kTileRows;
  tile.i1 = std::min(tile.i0 + kTileRows, g.H);
  tile.j0 = tx * kTileCols;
  tile.j1 = std::min(tile.j0 + kTileCols, g.W);
  tile.reverse = reverse;
  return tile;
}

// True if a tile within reach of tile t (itself included) has flag(tile) true.
template <class F>
bool any_in_reach(const Geometry& g, int64_t t, F flag) {
  const int64_t ty = t / g.tiles_x, tx = t % g.tiles_x;
  for (int64_t y = std::max<int64_t>(0, ty - g.reach_y); y <= std::min(g.tiles_y - 1, ty + g.reach_y); ++y)
    for (int64_t x = std::max<int64_t>(0, tx - g.reach_x); x <= std::min(g.tiles_x - 1, tx + g.reach_x); ++x)
      if (flag(y * g.tiles_x + x)) return true;
  return false;
}

struct Pairs {
  std::vector<int> dy, dx;
  std::vector<int64_t> linear;
  Pairs(double radius, int64_t ld) {
    for (const MidpointOffset& o : midpoint_pair_offsets(radius)) {
      dy.push_back(o.dy);
      dx.push_back(o.dx);
      linear.push_back(static_cast<int64_t>(o.dy) * ld + o.dx);
    }
  }
  MidpointPairs view() const {
    return {static_cast<int>(dy.size()), linear.data(), dy.data(), dx.data()};
  }
};

// Jacobi: returns the number of sweeps; `cur` / `src_cur` end up holding the result.
template <class S>
int64_t run_jacobi(const Geometry& g, const MidpointPairs& pairs, int64_t max_iters, double tol,
                   at::Tensor& cur, at::Tensor& nxt, at::Tensor& src_cur, at::Tensor& src_nxt) {
  const auto fns = midpoint_fns<S>();
  const int64_t n_tiles = g.planes * g.tiles();
  std::vector<uint8_t> changed_prev(n_tiles, 1), changed_now(n_tiles, 0);
  std::vector<int64_t> active;
  std::vector<MidpointTileOutcome> outcome;
  const bool track = src_cur.defined();
  int64_t sweeps = 0;
  while (sweeps < max_iters) {
    active.clear();
    for (int64_t p = 0; p < g.planes; ++p) {
      const uint8_t* prev = changed_prev.data() + p * g.tiles();
      for (int64_t t = 0; t < g.tiles(); ++t)
        if (any_in_reach(g, t, [prev](int64_t k) { return prev[k] != 0; })) active.push_back(p * g.tiles() + t);
    }
    outcome.assign(active.size(), MidpointTileOutcome{0.0, false});
    const S* in = cur.data_ptr<S>();
    S* out = nxt.data_ptr<S>();
    const int64_t* sin = track ? src_cur.data_ptr<int64_t>() : nullptr;
    int64_t* sout = track ? src_nxt.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(active.size()), tile_grain(pairs), [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t p = active[a] / g.tiles(), t = active[a] % g.tiles();
        const int64_t off = p * g.plane_size + g.origin();
        const auto tile = make_tile<S>(g, t, in + off, out + off, track ? sin + off : nullptr,
                                       track ? sout + off : nullptr, false);
        outcome[a] = fns.tile(tile, pairs);
      }
    });
    std::fill(changed_now.begin(), changed_now.end(), 0);
    double change = 0.0;
    for (size_t a = 0; a < active.size(); ++a) {
      changed_now[active[a]] = outcome[a].changed ? 1 : 0;
      change = std::max(change, outcome[a].max_change);
    }
    std::swap(cur, nxt);
    if (track) std::swap(src_cur, src_nxt);
    std::swap(changed_prev, changed_now);
    ++sweeps;
    if (change <= tol) break;
  }
  return sweeps;
}

// Gauss-Seidel in place: returns the number of passes; `cur` / `src_cur` hold the result.
template <class S>
int64_t run_fast(const Geometry& g, const MidpointPairs& pairs, int64_t max_iters, double tol,
                 at::Tensor& cur, at::Tensor& src_cur) {
  const auto fns = midpoint_fns<S>();
  const int64_t n_tiles = g.planes * g.tiles();
  // A tile needs a visit if some tile within reach (itself included) changed at or after the
  // step of its own last visit; steps count colour phases.
  std::vector<int64_t> last_changed(n_tiles, 0), last_visit(n_tiles, -1);
  const int64_t colours_y = g.reach_y + 1, colours_x = g.reach_x + 1;
  const bool track = src_cur.defined();
  S* buf = cur.data_ptr<S>();
  int64_t* sbuf = track ? src_cur.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> active;
  std::vector<MidpointTileOutcome> outcome;
  int64_t passes = 0, step = 0;
  while (passes < max_iters) {
    const bool reverse = passes % 2 == 1;
    double change = 0.0;
    for (int64_t ci = 0; ci < colours_y * colours_x; ++ci, ++step) {
      const int64_t colour = reverse ? colours_y * colours_x - 1 - ci : ci;
      const int64_t cy = colour / colours_x, cx = colour % colours_x;
      active.clear();
      for (int64_t p = 0; p < g.planes; ++p) {
        const int64_t* lc = last_changed.data() + p * g.tiles();
        for (int64_t ty = cy; ty < g.tiles_y; ty += colours_y)
          for (int64_t tx = cx; tx < g.tiles_x; tx += colours_x) {
            const int64_t t = ty * g.tiles_x + tx;
            const int64_t visited = last_visit[p * g.tiles() + t];
            if (any_in_reach(g, t, [lc, visited](int64_t k) { return lc[k] >= visited; }))
              active.push_back(p * g.tiles() + t);
          }
      }
      outcome.assign(active.size(), MidpointTileOutcome{0.0, false});
      at::parallel_for(0, static_cast<int64_t>(active.size()), tile_grain(pairs), [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          const int64_t p = active[a] / g.tiles(), t = active[a] % g.tiles();
          const int64_t off = p * g.plane_size + g.origin();
          const auto tile = make_tile<S>(g, t, buf + off, buf + off, track ? sbuf + off : nullptr,
                                         track ? sbuf + off : nullptr, reverse);
          outcome[a] = fns.tile(tile, pairs);
        }
      });
      for (size_t a = 0; a < active.size(); ++a) {
        last_visit[active[a]] = step;
        if (outcome[a].changed) last_changed[active[a]] = step;
        change = std::max(change, outcome[a].max_change);
      }
    }
    ++passes;
    if (change <= tol) break;
  }
  return passes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midpoint_convexify_forward_cpu(
    const at::Tensor& u_in, double radius, int64_t max_iters, double tol, c10::string_view mode,
    bool track_sources) {
  check_args(u_in, radius, max_iters, tol);
  const MidpointMode md = parse_mode(mode);
  const at::Tensor u = u_in.contiguous();
  const Geometry g(u, midpoint_reach(radius));
  const Pairs pairs(radius, g.ld);
  const std::vector<int64_t> padded_shape{g.planes, g.padded_rows, g.ld};
  const at::Tensor u3 = u.view({g.planes, g.H, g.W});
  at::Tensor cur = at::zeros(padded_shape, u.options());
  g.interior(cur).copy_(u3);
  at::Tensor nxt;
  if (md == MidpointMode::Jacobi) nxt = cur.clone();  // both hold sweep 0 (see run_jacobi)
  at::Tensor src_cur, src_nxt;
  if (track_sources) {
    src_cur = at::full(padded_shape, -1, u.options().dtype(at::kLong));
    g.interior(src_cur).copy_(at::arange(g.H * g.W, src_cur.options()).view({1, g.H, g.W}));
    if (md == MidpointMode::Jacobi) src_nxt = src_cur.clone();
  }
  int64_t sweeps = 0;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "midpoint_convexify_forward_cpu", [&] {
    if (md == MidpointMode::Jacobi) {
      sweeps = run_jacobi<scalar_t>(g, pairs.view(), max_iters, tol, cur, nxt, src_cur, src_nxt);
    } else {
      sweeps = run_fast<scalar_t>(g, pairs.view(), max_iters, tol, cur, src_cur);
    }
  });
  at::Tensor out = g.interior(cur).contiguous().view(u.sizes());
  at::Tensor sources = track_sources ? g.interior(src_cur).contiguous().view(u.sizes())
                                     : at::empty({0}, u.options().dtype(at::kLong));
  return {out, sources, at::scalar_tensor(sweeps, u.options().dtype(at::kLong))};
}

// grad_u[sources[q]] += grad[q] within each plane, in row-major order of q (deterministic).
at::Tensor midpoint_convexify_backward_cpu(const at::Tensor& grad_in, const at::Tensor& sources_in) {
  check_image4d(grad_in, "grad");
  TORCH_CHECK_TYPE(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
                   "grad must be float32 or float64 on CPU, got ", grad_in.scalar_type());
  TORCH_CHECK_TYPE(sources_in.scalar_type() == at::kLong, "sources must be int64, got ",
                   sources_in.scalar_type());
  TORCH_CHECK_VALUE(sources_in.sizes() == grad_in.sizes(), "sources must have the shape of grad ",
                    grad_in.sizes(), ", got ", sources_in.sizes(),
                    " (was the forward run with track_sources=True?)");
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor sources = sources_in.contiguous();
  const int64_t planes = grad.size(0) * grad.size(1), n = grad.size(2) * grad.size(3);
  at::Tensor grad_u = at::zeros_like(grad);
  std::vector<uint8_t> bad(planes, 0);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "midpoint_convexify_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t* sp = sources.data_ptr<int64_t>();
    scalar_t* out = grad_u.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* g = gp + p * n;
        const int64_t* s = sp + p * n;
        scalar_t* o = out + p * n;
        for (int64_t q = 0; q < n; ++q) {
          const int64_t src = s[q];
          if (src >= 0 && src < n) {
            o[src] += g[q];
          } else if (src != -1) {
            bad[p] = 1;
          }
        }
      }
    });
  });
  for (uint8_t b : bad)
    TORCH_CHECK_VALUE(!b, "sources must hold flat pixel indices in [-1, H*W), got an out-of-range value");
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("midpoint_convexify_forward", &midpoint_convexify_forward_cpu);
  m.impl("midpoint_convexify_backward", &midpoint_convexify_backward_cpu);
}

}  // namespace cpu
}  // namespace geokernels
