// CPU ops of flow-mismatch scoring (SPEC.md 3): noise regeneration, path building, the fused
// mismatch reduction and its two-step variant. Kernels: flow_mismatch_kernel.h; noise: philox.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "flow_mismatch_args.h"
#include "isa.h"

#define GK_CPU_ISA base
#include "flow_mismatch_kernel.h"
#undef GK_CPU_ISA

namespace geokernels {
namespace cpu {
namespace {

template <class S>
FlowMismatchFns<S> fm_fns() {
#if GK_AVX2_COMPILED
  if (use_avx2()) return flow_mismatch_fns_avx2<S>();
#endif
  return base::fns<S>();
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernels");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64 on CPU, got ", x.scalar_type());
}

template <class S>
FmGeometry<S> geometry(const FmShape& s, int64_t seed, int64_t image_offset, const at::Tensor& noise) {
  return {s.C, s.HW(), s.K, static_cast<uint64_t>(seed), image_offset,
          noise.defined() ? noise.data_ptr<S>() : nullptr};
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

at::Tensor philox4x32_10_cpu(const at::Tensor& counters_in, int64_t seed) {
  TORCH_CHECK_VALUE(counters_in.dim() == 2 && counters_in.size(1) == 4,
                    "counters must have shape (N, 4), got ", counters_in.sizes());
  TORCH_CHECK_TYPE(counters_in.scalar_type() == at::kLong, "counters must be int64, got ",
                   counters_in.scalar_type());
  const at::Tensor counters = counters_in.contiguous();
  at::Tensor out = at::empty_like(counters);
  const int64_t* c = counters.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, counters.size(0), 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t* ci = c + 4 * i;
      const Philox4 r = gk_philox4x32_10(
          static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]), static_cast<uint32_t>(ci[2]),
          static_cast<uint32_t>(ci[3]), static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(r.x[j]);
    }
  });
  return out;
}

at::Tensor flow_mismatch_noise_cpu(const at::Tensor& x, int64_t seed, int64_t image_offset,
                                   int64_t num_paths) {
  const FmShape s = check_fm_x(x, num_paths, image_offset);
  check_cpu(x);
  at::Tensor out = at::empty({s.B, s.K, s.C, s.H, s.W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flow_mismatch_noise_cpu", [&] {
    fm_fns<scalar_t>().noise(geometry<scalar_t>(s, seed, image_offset, at::Tensor()), s.B,
                             out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor flow_mismatch_paths_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& noise_in,
                                   double t, int64_t seed, int64_t image_offset, int64_t num_paths,
                                   int64_t path_start, int64_t path_count) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cpu(x_in);
  check_fm_noise(noise_in, x_in, s);
  check_fm_path_range(s, path_start, path_count);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  at::Tensor out = at::empty({path_count, s.C, s.H, s.W}, x.options());
  if (path_count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flow_mismatch_paths_cpu", [&] {
    fm_fns<scalar_t>().paths(geometry<scalar_t>(s, seed, image_offset, noise), x.data_ptr<scalar_t>(),
                             path_start, path_count, t, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor flow_mismatch_delta_cpu(const at::Tensor& v_in, const at::Tensor& x_in,
                                   const c10::optional<at::Tensor>& noise_in, int64_t seed,
                                   int64_t image_offset, int64_t num_paths, int64_t path_start) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cpu(x_in);
  check_fm_noise(noise_in, x_in, s);
  TORCH_CHECK_VALUE(v_in.dim() == 4, "v must have shape (paths, C, H, W), got ", v_in.sizes());
  const int64_t count = v_in.size(0);
  check_fm_path_range(s, path_start, count);
  check_fm_velocity(v_in, x_in, s, count);
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  at::Tensor out = at::empty({count, s.H, s.W}, x.options());
  if (count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flow_mismatch_delta_cpu", [&] {
    fm_fns<scalar_t>().delta(geometry<scalar_t>(s, seed, image_offset, noise), v.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), path_start, count, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor flow_mismatch_accumulate_cpu(at::Tensor& heat, const at::Tensor& v_in, const at::Tensor& x_in,
                                        const c10::optional<at::Tensor>& noise_in, double weight,
                                        int64_t seed, int64_t image_offset, int64_t num_paths,
                                        int64_t rank, bool mean) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cpu(x_in);
  check_fm_noise(noise_in, x_in, s);
  check_fm_velocity(v_in, x_in, s, s.B * s.K);
  check_fm_heat(heat, x_in.scalar_type(), x_in.device(), s.B, s.H, s.W);
  check_fm_rank(rank, mean, s.K);
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  at::Tensor work = heat.is_contiguous() ? heat : heat.contiguous();
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flow_mismatch_accumulate_cpu", [&] {
    bad = fm_fns<scalar_t>().accumulate(geometry<scalar_t>(s, seed, image_offset, noise),
                                        work.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                        x.data_ptr<scalar_t>(), s.B, weight, rank, mean);
  });
  if (!work.is_same(heat)) heat.copy_(work);
  return at::scalar_tensor(bad, x.options().dtype(at::kBool));
}

at::Tensor flow_mismatch_aggregate_cpu(at::Tensor& heat, const at::Tensor& delta_in, double weight,
                                       int64_t rank, bool mean) {
  TORCH_CHECK_VALUE(delta_in.dim() == 4 && delta_in.numel() > 0,
                    "delta must have shape (B, K, H, W), got ", delta_in.sizes());
  TORCH_CHECK_VALUE(delta_in.device().is_cpu(), "delta must be a CPU tensor");
  TORCH_CHECK_TYPE(delta_in.scalar_type() == at::kFloat || delta_in.scalar_type() == at::kDouble,
                   "delta must be float32 or float64 on CPU, got ", delta_in.scalar_type());
  const int64_t B = delta_in.size(0), K = delta_in.size(1), H = delta_in.size(2), W = delta_in.size(3);
  check_fm_heat(heat, delta_in.scalar_type(), delta_in.device(), B, H, W);
  check_fm_rank(rank, mean, K);
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor work = heat.is_contiguous() ? heat : heat.contiguous();
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "flow_mismatch_aggregate_cpu", [&] {
    bad = fm_fns<scalar_t>().aggregate(work.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), B, K,
                                       H * W, weight, rank, mean);
  });
  if (!work.is_same(heat)) heat.copy_(work);
  return at::scalar_tensor(bad, delta.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("philox4x32_10", &philox4x32_10_cpu);
  m.impl("flow_mismatch_noise", &flow_mismatch_noise_cpu);
  m.impl("flow_mismatch_paths", &flow_mismatch_paths_cpu);
  m.impl("flow_mismatch_delta", &flow_mismatch_delta_cpu);
  m.impl("flow_mismatch_accumulate_", &flow_mismatch_accumulate_cpu);
  m.impl("flow_mismatch_aggregate_", &flow_mismatch_aggregate_cpu);
}

}  // namespace cpu
}  // namespace geokernels
