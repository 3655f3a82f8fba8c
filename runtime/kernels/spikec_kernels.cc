// spikec's spiking ops as onnxruntime CPU custom ops (build: runtime/kernels/build.sh, `make native`).
//
// runtime/ops.py is the definition: every op here is its step, written with the same float32
// operations in the same order, so that native and portable (ONNX function) results are identical.
// Compile without -ffast-math and without FMA contraction for that reason.
//
// Each op exists in both forms of runtime/ops.py, sharing one templated loop:
//   <Op>      inputs [T*B, ..., C] viewed time-major as [T, N] (N = B*...*C), attr `timesteps`;
//             all T steps of a block of elements run in one pass, the states held locally.
//   <Op>Step  one step: (inputs, states, params, t) -> (outputs, next states); a state may be a
//             single zero (the t=1 convention) or have the input's shape (and a UGO's hidden axis).
//             The next states may be written over the states (run_stateful's in-place steps).
// Parameters (thresholds) are per tensor (one value) or per channel (C values, the last axis); a UGO's
// hidden-layer parameters have N values.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "isa.h"
#include "spike_matmul.h"
#include "ttfs_kernels.h"

namespace {

// The models' own domain: onnxruntime prefers a registered kernel to the model-local function of the
// same name (runtime/native.py's docstring), so spikec models run natively unchanged.
constexpr const char* kDomain = "spikec";

int64_t int_attr(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// ------------------------------------------------------------------------------------- the steps

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }

// MT neuron (runtime/ops.py _mt_step): fires the largest power of two p <= |m|/theta + 1/2
// (p < on the negative side), capped at 2^(levels-1), nothing when p < 1; soft reset.
struct MTNeuron {
  static constexpr const char* kName = "MTNeuron";
  static constexpr int kParams = 2;  // theta_pos, theta_neg
  static constexpr int kStates = 1;  // v
  float top;                         // 2^(levels-1), as ops.py's Pow(2, levels-1)

  explicit MTNeuron(const OrtKernelInfo* info) {
    const int64_t levels = int_attr(info, "levels", 8);
    // 2^(levels-1) must be a finite float (the negative side's step down from inf relies on it)
    if (levels > 128) throw Ort::Exception("MTNeuron: levels > 128 overflows float32", ORT_INVALID_ARGUMENT);
    top = std::ldexp(1.0f, static_cast<int>(levels) - 1);
  }

  float step(float x, float* state, const float* p, float /*t*/) const {
    float& v = state[0];
    const float theta_pos = p[0], theta_neg = p[1];
    const float membrane = v + x;
    const bool positive = membrane >= 0.0f;
    const float theta = positive ? theta_pos : theta_neg;
    const float ratio = std::fabs(membrane) / theta + 0.5f;
    // ratio >= 1/2 is a normal float (or inf/NaN): clearing its mantissa gives exactly the largest
    // power of two <= ratio; on the negative side, an exact power of two (mantissa zero) steps down
    // one exponent (p < ratio). Integer selects, not branches, so the loop over elements vectorizes.
    const uint32_t bits = float_to_bits(ratio);
    const uint32_t at_bound = ((bits & 0x007fffffu) == 0) & !positive;
    const float power = bits_to_float((bits & 0x7f800000u) - (at_bound << 23));
    // `ratio >= 1` keeps NaN out (ops.py: NaN >= 1 is false); for numbers it adds nothing to power >= 1.
    const bool fires = (ratio >= 1.0f) & (power >= 1.0f);
    const float level = fires ? (top < power ? top : power) : 0.0f;
    const float emitted = (positive ? level : -level) * theta;
    v = membrane - emitted;
    return emitted / theta_pos;
  }
};

// w(t) = average*t + (1-average), as runtime/ops.py _time_weight: exactly t (mean semantics) or 1 (sum).
struct TimeWeighted {
  float average;
  explicit TimeWeighted(const OrtKernelInfo* info)
      : average(static_cast<float>(int_attr(info, "average", 1))) {}
  float weight(float t) const { return average * t + (1.0f - average); }
};

// Running mean S(t)/t or running sum S(t) (runtime/ops.py _accumulate_step).
struct ECAccumulate : TimeWeighted {
  static constexpr const char* kName = "ECAccumulate";
  static constexpr int kParams = 0;
  static constexpr int kStates = 1;  // sum
  // The unrolled function is a CumSum, whose sums start from the first input: -0 + x is x for every x,
  // +0 + x is not for x = -0.
  static constexpr float kUnrolledStart = -0.0f;
  using TimeWeighted::TimeWeighted;
  float step(float x, float* sum, const float*, float t) const {
    sum[0] = sum[0] + x;
    return sum[0] / weight(t);
  }
};

// t*Y(t) - (t-1)*Y(t-1) or Y(t) - Y(t-1) (runtime/ops.py _compensate_step).
struct ECCompensate : TimeWeighted {
  static constexpr const char* kName = "ECCompensate";
  static constexpr int kParams = 0;
  static constexpr int kStates = 1;  // previous
  using TimeWeighted::TimeWeighted;
  float step(float y, float* previous, const float*, float t) const {
    const float weighted = weight(t) * y;
    const float out = weighted - previous[0];
    previous[0] = weighted;
    return out;
  }
};

// ST-BIF+ neuron (runtime/ops.py _stbif_step): v holds V - theta/2, so zero-initialised states give
// V_0 = theta/2; +1 when v + x >= theta/2 and tracer < s_max, -1 when v + x < -theta/2 and tracer > s_min.
struct STBIFNeuron {
  static constexpr const char* kName = "STBIFNeuron";
  static constexpr int kParams = 3;  // theta, s_min, s_max
  static constexpr int kStates = 2;  // v, tracer
  static constexpr bool kSpikeCount = true;  // runtime/ops.py spike_count: counted = |spike|
  explicit STBIFNeuron(const OrtKernelInfo*) {}
  float step(float x, float* state, const float* p, float /*t*/, float& counted) const {
    const float membrane = state[0] + x;
    const float half = p[0] * 0.5f;
    const float up = (membrane >= half) & (state[1] < p[2]) ? 1.0f : 0.0f;
    const float down = (membrane < -half) & (state[1] > p[1]) ? 1.0f : 0.0f;
    const float spike = up - down;
    state[0] = membrane - spike * p[0];
    state[1] = state[1] + spike;
    counted = std::fabs(spike);
    return spike;
  }
};

// ONNX Max(x, low) then Min(.., high) where only x can be NaN (low and high are parameters, finite): the
// comparisons are false for a NaN x, which the selects then keep, as Min/Max propagate it. (A two-sided
// NaN test kept the neuron's loop from vectorizing.)
inline float clamp_nan_first(float x, float low, float high) {
  const float raised = x < low ? low : x;
  return raised > high ? high : raised;
}

// Integer ST-BIF+ neuron (runtime/ops.py _stbif_integer_step): y is the running total the quantizer
// reads; the membrane is its level less the tracer, up to burst spikes of +-1 per step.
struct STBIFIntegerNeuron {
  static constexpr const char* kName = "STBIFIntegerNeuron";
  static constexpr int kParams = 3;  // theta, s_min, s_max
  static constexpr int kStates = 1;  // tracer
  static constexpr bool kSpikeCount = true;
  float burst;
  bool half_even;
  explicit STBIFIntegerNeuron(const OrtKernelInfo* info)
      : burst(static_cast<float>(int_attr(info, "burst", 1))), half_even(int_attr(info, "half_even", 1) != 0) {}
  float step(float y, float* state, const float* p, float /*t*/, float& counted) const {
    const float scaled = y / p[0];
    // nearbyint rounds halves to even in the default rounding mode, as ONNX Round
    const float rounded = half_even ? std::nearbyint(scaled) : std::floor(scaled + 0.5f);
    const float level = clamp_nan_first(rounded, p[1], p[2]);
    const float spike = clamp_nan_first(level - state[0], -burst, burst);
    state[0] = state[0] + spike;
    counted = std::fabs(spike);
    return spike;
  }
};

// STA's IF neuron (runtime/ops.py _if_step): spikes of theta/burst, up to burst per step; signed ones
// only while the emitted total stays >= 0.
struct IFNeuron {
  static constexpr const char* kName = "IFNeuron";
  static constexpr int kParams = 1;  // theta
  static constexpr int kStates = 2;  // v, emitted: in units of theta/burst
  float burst, minus_sign_on;  // -signed: ONNX Mul(emitted, -signed)
  explicit IFNeuron(const OrtKernelInfo* info)
      : burst(static_cast<float>(int_attr(info, "burst", 2))), minus_sign_on(-static_cast<float>(int_attr(info, "signed", 1))) {}
  float spike_value(float theta) const { return theta / burst; }
  float per_spike_value(float theta) const { return burst / theta; }
  // runtime/ops.py _if_count: the spikes fired on a drive in units of the spike value (subtracted where
  // kNegated), an integer in [-burst, burst].
  template <bool kNegated = false>
  float count(float drive, float* state) const {
    const float membrane = kNegated ? state[0] - drive : state[0] + drive;
    const float lower = state[1] * minus_sign_on;
    // ONNX Max(membrane, lower), NaN propagating: a NaN membrane is kept by this select, and lower is NaN
    // only when emitted is, which the step makes NaN only together with v, so with membrane. (The
    // two-sided NaN test this replaced kept the loop from vectorizing: 1.8x slower.)
    const float reach = membrane < lower ? lower : membrane;
    // ONNX Clip(reach, -burst, burst): NaN stays NaN through both selects
    const float clamped = burst < reach ? burst : (reach < -burst ? -burst : reach);
    // the int32 round trip truncates; a NaN clamp gives ONNX Max(truncated, NaN) = NaN through this select
    // (the conversion of NaN is whatever the CPU makes it, an integer either way)
    const float truncated = static_cast<float>(static_cast<int32_t>(clamped));
    const float below = clamped - 1.0f;
    const float spikes = below < truncated ? truncated : below;
    state[0] = membrane - spikes;
    state[1] = state[1] + spikes;
    return spikes;
  }
  // runtime/ops.py _if_step: the spike value fired on x (on -x where kNegated)
  template <bool kNegated = false>
  float spikes(float x, float* state, float theta) const {
    return count<kNegated>(x * per_spike_value(theta), state) * spike_value(theta);
  }
  float step(float x, float* state, const float* p, float /*t*/) const { return spikes(x, state, p[0]); }
};

// STA's X2X encoder (runtime/ops.py _x2x_step): IFNeuron's step on x and on -x, subtracted.
struct X2XEncoder {
  static constexpr const char* kName = "X2XEncoder";
  static constexpr int kParams = 2;  // theta_pos, theta_neg
  static constexpr int kStates = 4;  // v_pos, emitted_pos, v_neg, emitted_neg
  IFNeuron neuron;
  explicit X2XEncoder(const OrtKernelInfo* info) : neuron(info) {}
  float step(float x, float* state, const float* p, float /*t*/) const {
    return neuron.spikes(x, state, p[0]) - neuron.spikes<true>(x, state + 2, p[1]);
  }
};

// Whether an op has runtime/ops.py's optional count output (|output| summed per row of the leading axis).
template <class Op, class = void>
struct SpikeCount { static constexpr bool value = false; };
template <class Op>
struct SpikeCount<Op, std::void_t<decltype(Op::kSpikeCount)>> { static constexpr bool value = Op::kSpikeCount; };

// Where an unrolled op's states start: zero, or the op's kUnrolledStart.
template <class Op, class = void>
struct UnrolledStart { static constexpr float value = 0.0f; };
template <class Op>
struct UnrolledStart<Op, std::void_t<decltype(Op::kUnrolledStart)>> { static constexpr float value = Op::kUnrolledStart; };

// One step of op, which reports its element's spikes in `counted` if it counts them.
template <class Op>
inline float step_of(const Op& op, float x, float* state, const float* p, float t, float& counted) {
  if constexpr (SpikeCount<Op>::value) return op.step(x, state, p, t, counted);
  else return op.step(x, state, p, t);
}

// A chain of two ops as one (runtime/ops.py compose): B reads A's output, times A's parameter kScale
// when kScale >= 0. States and parameters are A's then B's; the spikes counted are whichever's counts.
template <class A, class B, int kScale>
struct Composed {
  static constexpr int kParams = A::kParams + B::kParams;
  static constexpr int kStates = A::kStates + B::kStates;
  static constexpr bool kSpikeCount = SpikeCount<A>::value || SpikeCount<B>::value;
  static_assert(!(SpikeCount<A>::value && SpikeCount<B>::value), "a composite counts one op's spikes");
  A a;
  B b;
  explicit Composed(const OrtKernelInfo* info) : a(info), b(info) {}
  float step(float x, float* state, const float* p, float t, float& counted) const {
    float value = step_of(a, x, state, p, t, counted);
    if (kScale >= 0) value = value * p[kScale];
    return step_of(b, value, state + A::kStates, p + A::kParams, t, counted);
  }
  float step(float x, float* state, const float* p, float t) const {
    float counted;
    return step(x, state, p, t, counted);
  }
};

struct ECCompensateMTNeuron : Composed<ECCompensate, MTNeuron, -1> {
  static constexpr const char* kName = "ECCompensate_MTNeuron";
  using Composed::Composed;
};
struct ECCompensateSTBIFNeuron : Composed<ECCompensate, STBIFNeuron, -1> {
  static constexpr const char* kName = "ECCompensate_STBIFNeuron";
  using Composed::Composed;
};
struct ECCompensateX2XEncoder : Composed<ECCompensate, X2XEncoder, -1> {
  static constexpr const char* kName = "ECCompensate_X2XEncoder";
  using Composed::Composed;
};
struct MTNeuronECAccumulate : Composed<MTNeuron, ECAccumulate, 0> {  // spike value: code * theta_pos
  static constexpr const char* kName = "MTNeuron_ECAccumulate";
  using Composed::Composed;
};
struct ECCompensateMTNeuronECAccumulate : Composed<ECCompensateMTNeuron, ECAccumulate, 0> {
  static constexpr const char* kName = "ECCompensate_MTNeuron_ECAccumulate";
  using Composed::Composed;
};
struct STBIFNeuronECAccumulate : Composed<STBIFNeuron, ECAccumulate, 0> {  // spike value: code * theta
  static constexpr const char* kName = "STBIFNeuron_ECAccumulate";
  using Composed::Composed;
};
struct ECCompensateSTBIFNeuronECAccumulate : Composed<ECCompensateSTBIFNeuron, ECAccumulate, 0> {
  static constexpr const char* kName = "ECCompensate_STBIFNeuron_ECAccumulate";
  using Composed::Composed;
};

// STA's universal group operator (runtime/ops.py _ugo_step): per element, N IF neurons on w1_j x + b1_j;
// y = sum_j w2_j * spike_j + b2, summed in order of j (CumSum's order: the first term, then each next
// one added). Parameters: w1, b1, theta, w2 along the hidden axis (N values each), then b2 (one value or
// one per channel). States [N, ...], hidden-major as the ONNX tensors. Runs in UGOLoop.
struct UGOLoop;
struct UGO {
  static constexpr const char* kName = "UGO";
  static constexpr int kParams = 5;
  static constexpr int kHiddenParams = 4;  // the first four
  static constexpr int kStates = 2;        // IFNeuron's v, emitted per hidden neuron
  using Loop = UGOLoop;
  IFNeuron neuron;
  explicit UGO(const OrtKernelInfo* info) : neuron(info) {}
};

// ---------------------------------------------------------------------------- the shared loop

struct Param {
  const float* data = nullptr;
  size_t stride = 0;  // 0: one value; 1: one per channel
  float at(size_t channel) const { return data ? data[channel * stride] : 0.0f; }
};

constexpr int kMaxParams = 5;  // UGO's w1, b1, theta, w2, b2
constexpr int kMaxStates = 5;  // ECCompensate_X2XEncoder's previous and the X2X encoder's four

struct State {
  const float* in = nullptr;  // nullptr: zeros
  size_t stride = 0;          // 0: one value broadcast, 1: per element
  float* out = nullptr;       // nullptr: discarded
};

struct Job {
  const float* x;          // [steps, rows]
  float* out;              // [steps, rows]
  State states[kMaxStates];  // [rows] each, [hidden, rows] for a UGO
  Param params[kMaxParams];
  size_t hidden = 1;       // a UGO's N; its hidden parameters are params[k].data[0..hidden)
  size_t rows, channels, chunk;
  int64_t steps;
  float t0;                // t at the first step
  float* count = nullptr;  // the count output, [leading rows] zeroed, or nullptr: not asked for
  size_t row_size = 1;     // elements per row of the leading axis
};

// Adds the spikes counted in the block [begin, begin + n) of step s to the counts of the leading rows it
// covers. The sums are integers far below 2^24: exact in any order, so chunks running on other threads
// may add to the same row in any order and still give the portable function's bits.
inline void add_counts(const Job& job, int64_t s, size_t begin, const float* counted, size_t n) {
  const size_t first = static_cast<size_t>(s) * job.rows + begin;  // the block's first element overall
  size_t row = first / job.row_size;
  for (size_t i = 0; i < n; ++row) {
    const size_t end = std::min(n, (row + 1) * job.row_size - first);
    // Eight running sums, one per vector lane (a single sum's dependency chain would cost more than the
    // neuron's step); reassociation changes nothing for integers.
    constexpr size_t kLanes = 8;
    float lanes[kLanes] = {};
    for (; i + kLanes <= end; i += kLanes)
      for (size_t k = 0; k < kLanes; ++k) lanes[k] += counted[i + k];
    float sum = 0.0f;
    for (; i < end; ++i) sum += counted[i];
    for (size_t k = 0; k < kLanes; ++k) sum += lanes[k];
    std::atomic_ref<float>(job.count[row]).fetch_add(sum, std::memory_order_relaxed);
  }
}

// The n states of a block that start at `offset` of the state tensor, into `dst`: copied from the state
// input unless dst is that input (run_stateful's in-place steps), or the input's single value (t=1), or
// `start` (the unrolled form: UnrolledStart).
inline void load_states(const State& in, size_t offset, size_t n, float* dst, float start) {
  if (in.in && in.stride) {
    if (in.in + offset != dst) std::copy(in.in + offset, in.in + offset + n, dst);
  } else {
    std::fill(dst, dst + n, in.in ? in.in[0] : start);
  }
}

// A parameter's values for the elements [begin, begin + n): one value, or cycling through the channels.
inline void load_param(const Param& p, size_t begin, size_t n, size_t channels, float* dst) {
  if (!p.stride) {
    std::fill(dst, dst + n, p.at(0));
    return;
  }
  size_t channel = begin % channels;  // one division per block, not per element
  for (size_t i = 0; i < n; ++i) {
    dst[i] = p.data[channel];
    if (++channel == channels) channel = 0;
  }
}

// The loop over elements [lo, hi): blocks of elements advance together through all steps (one step
// in the Step form), their states and parameters held in local arrays.
struct ElementwiseLoop {
  template <class Op>
  static inline __attribute__((always_inline)) void run(const Op& op, const Job& job, size_t lo, size_t hi) {
    // Long enough that each step streams through x and out (short blocks read T streams at rows*4-byte
    // strides, which alias in the L1 sets), short enough that the block's states and parameters stay in L2.
    constexpr size_t kBlock = 4096;
    constexpr int S = Op::kStates, P = Op::kParams > 0 ? Op::kParams : 1;
    // Structure of arrays: each state and parameter contiguous over the block, so the step loop
    // below vectorizes (the per-element copies into st/pr are scalar-replaced by the compiler). The
    // unrolled form's states live in a local block; a Step form's are updated right in its next-state
    // tensors (after a copy from the state inputs, none when run_stateful passes them in place).
    constexpr bool kCounts = SpikeCount<Op>::value;
    std::vector<float> buffer((S + P + kCounts) * kBlock);  // 112 KB at most: heap, not a pool thread's stack
    float* local_state[S];
    float* param[P];
    for (int k = 0; k < S; ++k) local_state[k] = buffer.data() + k * kBlock;
    for (int k = 0; k < P; ++k) param[k] = buffer.data() + (S + k) * kBlock;
    float* counted = buffer.data() + (S + P) * kBlock;  // each element's spikes at this step
    const Op local = op;  // attributes in registers, not reloaded after every store
    for (size_t begin = lo; begin < hi; begin += kBlock) {
      const size_t n = std::min(kBlock, hi - begin);
      float* state[S];
      for (int k = 0; k < S; ++k) {
        state[k] = job.states[k].out ? job.states[k].out + begin : local_state[k];
        load_states(job.states[k], begin, n, state[k], UnrolledStart<Op>::value);
      }
      for (int k = 0; k < P; ++k) load_param(job.params[k], begin, n, job.channels, param[k]);
      for (int64_t s = 0; s < job.steps; ++s) {
        const float t = job.t0 + static_cast<float>(s);
        const float* x = job.x + static_cast<size_t>(s) * job.rows + begin;
        float* out = job.out + static_cast<size_t>(s) * job.rows + begin;
        // Iteration i touches index i of every array only, so no iteration depends on another, whatever
        // the pointers: without the pragma, composites with three states exceeded GCC's ten run-time
        // alias checks and stayed scalar.
#pragma GCC ivdep
        for (size_t i = 0; i < n; ++i) {
          float st[S], pr[P];
          for (int k = 0; k < S; ++k) st[k] = state[k][i];
          for (int k = 0; k < P; ++k) pr[k] = param[k][i];
          if constexpr (kCounts) out[i] = local.step(x[i], st, pr, t, counted[i]);
          else out[i] = local.step(x[i], st, pr, t);
          for (int k = 0; k < S; ++k) state[k][i] = st[k];
        }
        if (kCounts && job.count) add_counts(job, s, begin, counted, n);
      }
    }
  }
};

// A UGO: blocks of elements, run hidden unit by hidden unit so that the loops vectorize across elements;
// each element still sums its terms in order of j. The state tensors are hidden-major ([N][rows]): a
// block of a unit's states is one contiguous run, updated right in the next-state tensor as
// ElementwiseLoop does (the unrolled form keeps them in a local [N][block]).
struct UGOLoop {
  template <bool kFirst>
  static inline __attribute__((always_inline)) void hidden_unit(
      const IFNeuron& neuron, const float* x, float w1, float b1, float theta, float w2, float* v, float* emitted,
      float* sum, size_t n) {
    // runtime/ops.py _ugo_step: the unit's drive and weight in units of its spike value
    const float to_units = neuron.per_spike_value(theta);
    const float slope = w1 * to_units, offset = b1 * to_units;
    const float weight = w2 * neuron.spike_value(theta);
    for (size_t e = 0; e < n; ++e) {
      float st[2] = {v[e], emitted[e]};
      const float term = neuron.count(x[e] * slope + offset, st) * weight;
      v[e] = st[0];
      emitted[e] = st[1];
      sum[e] = kFirst ? term : sum[e] + term;
    }
  }

  static inline __attribute__((always_inline)) void run(const UGO& op, const Job& job, size_t lo, size_t hi) {
    constexpr size_t kBlock = 256;  // 2 x N x 256 floats of local state: 64 KB at N = 32, in L2
    const size_t hidden = job.hidden;
    std::vector<float> buffer((2 * hidden + 2) * kBlock);
    float* local_state[2] = {buffer.data(), buffer.data() + hidden * kBlock};
    float* sum = buffer.data() + 2 * hidden * kBlock;
    float* bias = sum + kBlock;
    const float *w1 = job.params[0].data, *b1 = job.params[1].data, *theta = job.params[2].data,
                *w2 = job.params[3].data;
    const IFNeuron neuron = op.neuron;
    for (size_t begin = lo; begin < hi; begin += kBlock) {
      const size_t n = std::min(kBlock, hi - begin);
      float* state[2];
      size_t stride[2];  // from one hidden unit's states to the next's
      for (int k = 0; k < 2; ++k) {
        const State& in = job.states[k];
        state[k] = in.out ? in.out + begin : local_state[k];
        stride[k] = in.out ? job.rows : kBlock;
        for (size_t j = 0; j < hidden; ++j) load_states(in, j * job.rows + begin, n, state[k] + j * stride[k], UnrolledStart<UGO>::value);
      }
      load_param(job.params[4], begin, n, job.channels, bias);
      for (int64_t s = 0; s < job.steps; ++s) {
        const float* x = job.x + static_cast<size_t>(s) * job.rows + begin;
        for (size_t j = 0; j < hidden; ++j) {
          float* v = state[0] + j * stride[0];
          float* emitted = state[1] + j * stride[1];
          if (j == 0) hidden_unit<true>(neuron, x, w1[j], b1[j], theta[j], w2[j], v, emitted, sum, n);
          else hidden_unit<false>(neuron, x, w1[j], b1[j], theta[j], w2[j], v, emitted, sum, n);
        }
        float* out = job.out + static_cast<size_t>(s) * job.rows + begin;
        for (size_t e = 0; e < n; ++e) out[e] = sum[e] + bias[e];
      }
    }
  }
};

template <class Op, class = void>
struct LoopOf { using type = ElementwiseLoop; };
template <class Op>
struct LoopOf<Op, std::void_t<typename Op::Loop>> { using type = typename Op::Loop; };

template <class Op, class = void>
struct HiddenParams { static constexpr int value = 0; };
template <class Op>
struct HiddenParams<Op, std::void_t<decltype(Op::kHiddenParams)>> { static constexpr int value = Op::kHiddenParams; };

// The loops compiled three times: for the build's baseline ISA and, taken where the CPU has them, for
// AVX2 (8 floats a vector instead of 4: -18 % on the digits ViT's unrolled ECMT run) and AVX-512 (16:
// -7 % per stateful STA step, -2 % per unrolled STA or ECMT run, side by side on this VM's Zen 4, whose
// units split 512-bit vectors in two; the UGO's loop is bound by its ~24 vector ops per 8 neuron updates,
// not by the division or its states' cache level, both measured). The arithmetic is the same IEEE
// float32 operations every way (no FMA: -ffp-contract=off), so all give the same bits.
template <class Op>
__attribute__((target("avx2"))) void loop_avx2(const Op& op, const Job& job, size_t lo, size_t hi) {
  LoopOf<Op>::type::run(op, job, lo, hi);
}

template <class Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")))
void loop_avx512(const Op& op, const Job& job, size_t lo, size_t hi) {
  LoopOf<Op>::type::run(op, job, lo, hi);
}

template <class Op>
void loop_baseline(const Op& op, const Job& job, size_t lo, size_t hi) {
  LoopOf<Op>::type::run(op, job, lo, hi);
}

template <class Op>
void run_chunk(const Op& op, const Job& job, size_t lo, size_t hi) {
  switch (spikec_isa::level()) {
    case spikec_isa::kAvx512: loop_avx512(op, job, lo, hi); break;
    case spikec_isa::kAvx2: loop_avx2(op, job, lo, hi); break;
    default: loop_baseline(op, job, lo, hi);
  }
}

template <class Op>
void run(const Ort::KernelContext& ctx, const Op& op, Job& job) {
  // Chunks of about 64k neuron-steps (a UGO element is N neurons), onnxruntime's intra-op pool spreading
  // them; but at least kMinChunks of them where there is enough work: two uneven chunks (a stateful
  // step's 64k + 4k elements) would leave one thread with almost all of it.
  constexpr size_t kWork = 1 << 16, kMinChunks = 8, kMinRows = 4096;
  const size_t per_row = static_cast<size_t>(std::max<int64_t>(job.steps, 1)) * job.hidden;
  const size_t by_work = (kWork / per_row + 255) / 256 * 256;
  const size_t by_count = (job.rows / kMinChunks + 255) / 256 * 256;
  const size_t per_chunk = std::max<size_t>({256, std::min(by_work, std::max(by_count, kMinRows / job.hidden))});
  job.chunk = per_chunk;
  const size_t chunks = (job.rows + per_chunk - 1) / per_chunk;
  if (chunks <= 1) {
    run_chunk(op, job, 0, job.rows);
    return;
  }
  struct Task { const Op* op; const Job* job; };
  Task task{&op, &job};
  ctx.ParallelFor(
      [](void* data, size_t index) {
        const auto* task = static_cast<const Task*>(data);
        const size_t lo = index * task->job->chunk;
        run_chunk(*task->op, *task->job, lo, std::min(lo + task->job->chunk, task->job->rows));
      },
      chunks, 0, &task);
}

size_t numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

Param param(const Ort::ConstValue& value, size_t channels, const char* op) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  const size_t n = info.GetElementCount();
  if (n != 1 && (n != channels || static_cast<size_t>(info.GetShape().back()) != channels))
    throw Ort::Exception(std::string(op) + ": a parameter must be one value or C values on the last axis",
                         ORT_INVALID_ARGUMENT);
  return {value.GetTensorData<float>(), n == 1 ? 0u : 1u};
}

// Inputs: unrolled (x, params...), step (x, states..., params..., t). Outputs: (out) or (out, states...).
template <class Op, bool kStep>
struct Kernel {
  static_assert(Op::kStates <= kMaxStates && Op::kParams <= kMaxParams, "raise kMaxStates / kMaxParams");
  Op op;
  int64_t timesteps;

  Kernel(const OrtKernelInfo* info) : op(info), timesteps(kStep ? 1 : int_attr(info, "timesteps", 0)) {
    if (!kStep && timesteps < 1)
      throw Ort::Exception(std::string(Op::kName) + ": attribute timesteps >= 1 required", ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      const auto x = ctx.GetInput(0);
      const std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
      const size_t total = numel(shape);
      const size_t channels = shape.empty() ? 1 : static_cast<size_t>(shape.back());
      if (total % static_cast<size_t>(timesteps) != 0)
        throw Ort::Exception(std::string(Op::kName) + ": leading axis not a multiple of timesteps", ORT_INVALID_ARGUMENT);
      Job job{};
      job.x = x.GetTensorData<float>();
      job.out = ctx.GetOutput(0, shape).template GetTensorMutableData<float>();
      job.rows = total / static_cast<size_t>(timesteps);
      job.channels = std::max<size_t>(channels, 1);
      job.steps = timesteps;
      const size_t first_param = kStep ? 1 + Op::kStates : 1;
      constexpr int kHidden = HiddenParams<Op>::value;
      for (int p = 0; p < kHidden; ++p) {
        const auto value = ctx.GetInput(first_param + p);
        const size_t n = value.GetTensorTypeAndShapeInfo().GetElementCount();
        if (p == 0) job.hidden = n;
        if (n == 0 || n != job.hidden)
          throw Ort::Exception(std::string(Op::kName) + ": the hidden-axis parameters must have the same N >= 1 values",
                               ORT_INVALID_ARGUMENT);
        job.params[p] = {value.GetTensorData<float>(), 1};
      }
      for (int p = kHidden; p < Op::kParams; ++p) job.params[p] = param(ctx.GetInput(first_param + p), channels, Op::kName);
      if (kStep) {
        std::vector<int64_t> state_shape = shape;
        if (kHidden) state_shape.insert(state_shape.begin(), static_cast<int64_t>(job.hidden));
        for (int k = 0; k < Op::kStates; ++k) {
          const auto state = ctx.GetInput(1 + k);
          const size_t n = state.GetTensorTypeAndShapeInfo().GetElementCount();
          if (n != 1 && n != total * job.hidden)
            throw Ort::Exception(std::string(Op::kName) + "Step: a state must be one value or the input's shape" +
                                 (kHidden ? " and N" : ""), ORT_INVALID_ARGUMENT);
          job.states[k].in = state.GetTensorData<float>();
          job.states[k].stride = n == 1 ? 0 : 1;
          job.states[k].out = ctx.GetOutput(1 + k, state_shape).template GetTensorMutableData<float>();
        }
        const Ort::ConstValue t = ctx.GetInput(first_param + Op::kParams);
        job.t0 = *t.GetTensorData<float>();
      } else {
        job.t0 = 1.0f;
      }
      constexpr size_t kCountOutput = kStep ? 1 + Op::kStates : 1;
      if (SpikeCount<Op>::value && ctx.GetOutputCount() > kCountOutput) {
        if (shape.empty()) throw Ort::Exception(std::string(Op::kName) + ": counting needs a leading axis", ORT_INVALID_ARGUMENT);
        const int64_t leading = shape[0];
        auto count = ctx.GetOutput(kCountOutput, {leading});
        if (static_cast<OrtValue*>(count) != nullptr) {  // a node may name the output "": not wanted
          job.count = count.template GetTensorMutableData<float>();
          std::fill(job.count, job.count + leading, 0.0f);
          job.row_size = leading > 0 ? total / static_cast<size_t>(leading) : 1;
        }
      }
      if (total > 0) run(ctx, op, job);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

template <class Op, bool kStep>
struct CustomOp : Ort::CustomOpBase<CustomOp<Op, kStep>, Kernel<Op, kStep>, true> {
  static constexpr size_t kInputs = 1 + (kStep ? Op::kStates : 0) + Op::kParams + (kStep ? 1 : 0);
  std::string name = std::string(Op::kName) + (kStep ? "Step" : "");

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel<Op, kStep>(info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
  const char* GetName() const { return name.c_str(); }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr size_t kOutputs = (kStep ? 1 + Op::kStates : 1) + SpikeCount<Op>::value;
  size_t GetOutputTypeCount() const { return kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return SpikeCount<Op>::value && index + 1 == kOutputs ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

struct Library {
  CustomOp<MTNeuron, false> mt;
  CustomOp<MTNeuron, true> mt_step;
  CustomOp<STBIFNeuron, false> stbif;
  CustomOp<STBIFNeuron, true> stbif_step;
  CustomOp<STBIFIntegerNeuron, false> stbif_integer;
  CustomOp<STBIFIntegerNeuron, true> stbif_integer_step;
  CustomOp<IFNeuron, false> if_neuron;
  CustomOp<IFNeuron, true> if_neuron_step;
  CustomOp<X2XEncoder, false> x2x;
  CustomOp<X2XEncoder, true> x2x_step;
  CustomOp<UGO, false> ugo;
  CustomOp<UGO, true> ugo_step;
  CustomOp<ECAccumulate, false> accumulate;
  CustomOp<ECAccumulate, true> accumulate_step;
  CustomOp<ECCompensate, false> compensate;
  CustomOp<ECCompensate, true> compensate_step;
  CustomOp<ECCompensateMTNeuron, false> compensate_mt;
  CustomOp<ECCompensateMTNeuron, true> compensate_mt_step;
  CustomOp<ECCompensateSTBIFNeuron, false> compensate_stbif;
  CustomOp<ECCompensateSTBIFNeuron, true> compensate_stbif_step;
  CustomOp<ECCompensateX2XEncoder, false> compensate_x2x;
  CustomOp<ECCompensateX2XEncoder, true> compensate_x2x_step;
  CustomOp<MTNeuronECAccumulate, false> mt_accumulate;
  CustomOp<MTNeuronECAccumulate, true> mt_accumulate_step;
  CustomOp<ECCompensateMTNeuronECAccumulate, false> compensate_mt_accumulate;
  CustomOp<ECCompensateMTNeuronECAccumulate, true> compensate_mt_accumulate_step;
  CustomOp<STBIFNeuronECAccumulate, false> stbif_accumulate;
  CustomOp<STBIFNeuronECAccumulate, true> stbif_accumulate_step;
  CustomOp<ECCompensateSTBIFNeuronECAccumulate, false> compensate_stbif_accumulate;
  CustomOp<ECCompensateSTBIFNeuronECAccumulate, true> compensate_stbif_accumulate_step;
  Ort::CustomOpDomain domain{kDomain};

  Library() {
    for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{
             &mt, &mt_step, &stbif, &stbif_step, &stbif_integer, &stbif_integer_step, &if_neuron, &if_neuron_step, &x2x, &x2x_step, &ugo, &ugo_step, &accumulate, &accumulate_step,
             &compensate, &compensate_step, &compensate_mt, &compensate_mt_step, &compensate_stbif,
             &compensate_stbif_step, &compensate_x2x, &compensate_x2x_step, &mt_accumulate, &mt_accumulate_step,
             &compensate_mt_accumulate, &compensate_mt_accumulate_step, &stbif_accumulate, &stbif_accumulate_step,
             &compensate_stbif_accumulate, &compensate_stbif_accumulate_step})
      domain.Add(op);
    spikec_ttfs::add_ops(domain);
    spikec_matmul::add_ops(domain);
  }
};

}  // namespace

// The digest of the kernel sources this library was built from (build.sh): runtime/native.py refuses a
// library whose sources changed since, whose kernels would not be the ops' current definition.
#ifndef SPIKEC_SOURCE_DIGEST
#define SPIKEC_SOURCE_DIGEST "unknown"
#endif
extern "C" __attribute__((visibility("default"))) const char* SpikecSourceDigest() { return SPIKEC_SOURCE_DIGEST; }
extern "C" __attribute__((visibility("default"))) const char* SpikecKernelIsa() {
  return spikec_isa::kNames[spikec_isa::level()];
}

// onnxruntime's entry point (SessionOptions.register_custom_ops_library). The domain outlives every
// session: it is created once and never released.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api)  // onnxruntime older than the headers: report it through the oldest API
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "spikec kernels: onnxruntime older than the headers they were built with");
  Ort::InitApi(api);
  try {
    static Library* library = new Library();
    Ort::UnownedSessionOptions(options).Add(library->domain);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}
