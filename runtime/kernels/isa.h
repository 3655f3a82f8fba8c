// The widest vector ISA that spikec's loops use, each loop being compiled once per ISA: the CPU's,
// capped by the environment variable SPIKEC_KERNEL_ISA (baseline, avx2 or avx512; runtime/native.py
// refuses other values) so that one machine can check every variant against the ONNX functions
// (tests/test_native.py). Chosen once per process, at the first kernel call.
#pragma once

#include <cstdlib>
#include <cstring>

namespace spikec_isa {

enum Level { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
inline constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

inline Level cpu_level() {
  if (!__builtin_cpu_supports("avx2")) return kBaseline;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return avx512 ? kAvx512 : kAvx2;
}

inline Level level() {
  static const Level chosen = [] {
    const Level cpu = cpu_level();
    const char* cap = std::getenv("SPIKEC_KERNEL_ISA");
    for (int l = kBaseline; cap && l <= kAvx512; ++l)
      if (std::strcmp(cap, kNames[l]) == 0) return l < cpu ? static_cast<Level>(l) : cpu;
    return cpu;
  }();
  return chosen;
}

}  // namespace spikec_isa
