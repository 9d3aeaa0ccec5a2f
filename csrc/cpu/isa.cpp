#include "isa.h"

namespace geokernels {
namespace cpu {

std::atomic<int>& isa_override() {
  static std::atomic<int> value{static_cast<int>(Isa::Auto)};
  return value;
}

static bool cpu_supports_avx2() {
#if GK_AVX2_COMPILED
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool use_avx2() {
  const int o = isa_override().load(std::memory_order_relaxed);
  if (o == static_cast<int>(Isa::Base)) return false;
  return cpu_supports_avx2();
}

std::string active_isa() { return use_avx2() ? "avx2" : "base"; }

}  // namespace cpu
}  // namespace geokernels
