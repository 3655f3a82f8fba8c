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
//             single zero (the t=1 convention) or have the input's shape.
// Parameters (thresholds) are per tensor (one value) or per channel (C values, the last axis).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

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
  float top;                         // 2^(levels-1), as ops.py's Pow(2, levels-1)

  explicit MTNeuron(const OrtKernelInfo* info) {
    const int64_t levels = int_attr(info, "levels", 8);
    // 2^(levels-1) must be a finite float (the negative side's step down from inf relies on it)
    if (levels > 128) throw Ort::Exception("MTNeuron: levels > 128 overflows float32", ORT_INVALID_ARGUMENT);
    top = std::ldexp(1.0f, static_cast<int>(levels) - 1);
  }

  float step(float x, float& v, float theta_pos, float theta_neg, float /*t*/) const {
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

// Running mean S(t)/t (runtime/ops.py _accumulate_step).
struct ECAccumulate {
  static constexpr const char* kName = "ECAccumulate";
  static constexpr int kParams = 0;
  explicit ECAccumulate(const OrtKernelInfo*) {}
  float step(float x, float& sum, float, float, float t) const {
    sum = sum + x;
    return sum / t;
  }
};

// t*Y(t) - (t-1)*Y(t-1) (runtime/ops.py _compensate_step).
struct ECCompensate {
  static constexpr const char* kName = "ECCompensate";
  static constexpr int kParams = 0;
  explicit ECCompensate(const OrtKernelInfo*) {}
  float step(float y, float& previous, float, float, float t) const {
    const float weighted = t * y;
    const float out = weighted - previous;
    previous = weighted;
    return out;
  }
};

// ---------------------------------------------------------------------------- the shared loop

struct Param {
  const float* data = nullptr;
  size_t stride = 0;  // 0: one value; 1: one per channel
  float at(size_t channel) const { return data ? data[channel * stride] : 0.0f; }
};

struct Job {
  const float* x;          // [steps, rows]
  float* out;              // [steps, rows]
  const float* state_in;   // nullptr: zeros
  size_t state_stride;     // 0: one value broadcast, 1: per element
  float* state_out;        // nullptr: discarded
  Param params[2];
  size_t rows, channels, chunk;
  int64_t steps;
  float t0;                // t at the first step
};

template <class Op>
void run_chunk(const Op& op, const Job& job, size_t lo, size_t hi) {
  constexpr size_t kBlock = 256;  // elements advanced together through all steps
  float state[kBlock], p0[kBlock], p1[kBlock];
  const Op local = op;  // attributes in registers, not reloaded after every store
  for (size_t begin = lo; begin < hi; begin += kBlock) {
    const size_t n = std::min(kBlock, hi - begin);
    for (size_t i = 0; i < n; ++i) {
      state[i] = job.state_in ? job.state_in[(begin + i) * job.state_stride] : 0.0f;
      if constexpr (Op::kParams > 0) {
        const size_t channel = (begin + i) % job.channels;
        p0[i] = job.params[0].at(channel);
        p1[i] = job.params[1].at(channel);
      } else {
        p0[i] = p1[i] = 0.0f;
      }
    }
    for (int64_t s = 0; s < job.steps; ++s) {
      const float t = job.t0 + static_cast<float>(s);
      const float* x = job.x + static_cast<size_t>(s) * job.rows + begin;
      float* out = job.out + static_cast<size_t>(s) * job.rows + begin;
      for (size_t i = 0; i < n; ++i) {  // plain loads and stores: this loop vectorizes
        float s_i = state[i];
        const float a = p0[i], b = p1[i];
        out[i] = local.step(x[i], s_i, a, b, t);
        state[i] = s_i;
      }
    }
    if (job.state_out) std::copy(state, state + n, job.state_out + begin);
  }
}

template <class Op>
void run(const Ort::KernelContext& ctx, const Op& op, Job& job) {
  // Chunks of at least ~64k element-steps: onnxruntime's intra-op pool spreads them.
  constexpr size_t kWork = 1 << 16;
  const size_t per_chunk = std::max<size_t>(256, (kWork / std::max<int64_t>(job.steps, 1) + 255) / 256 * 256);
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

// Inputs: unrolled (x, params...), step (x, state, params..., t). Outputs: (out) or (out, state).
template <class Op, bool kStep>
struct Kernel {
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
      const size_t first_param = kStep ? 2 : 1;
      for (int p = 0; p < Op::kParams; ++p) job.params[p] = param(ctx.GetInput(first_param + p), channels, Op::kName);
      if (kStep) {
        const auto state = ctx.GetInput(1);
        const size_t n = state.GetTensorTypeAndShapeInfo().GetElementCount();
        if (n != 1 && n != total)
          throw Ort::Exception(std::string(Op::kName) + "Step: state must be one value or the input's shape", ORT_INVALID_ARGUMENT);
        job.state_in = state.GetTensorData<float>();
        job.state_stride = n == 1 ? 0 : 1;
        job.state_out = ctx.GetOutput(1, shape).template GetTensorMutableData<float>();
        const Ort::ConstValue t = ctx.GetInput(first_param + Op::kParams);
        job.t0 = *t.GetTensorData<float>();
      } else {
        job.t0 = 1.0f;
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
  static constexpr size_t kInputs = 1 + (kStep ? 1 : 0) + Op::kParams + (kStep ? 1 : 0);
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
  size_t GetOutputTypeCount() const { return kStep ? 2 : 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct Library {
  CustomOp<MTNeuron, false> mt;
  CustomOp<MTNeuron, true> mt_step;
  CustomOp<ECAccumulate, false> accumulate;
  CustomOp<ECAccumulate, true> accumulate_step;
  CustomOp<ECCompensate, false> compensate;
  CustomOp<ECCompensate, true> compensate_step;
  Ort::CustomOpDomain domain{kDomain};

  Library() {
    for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{
             &mt, &mt_step, &accumulate, &accumulate_step, &compensate, &compensate_step})
      domain.Add(op);
  }
};

}  // namespace

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
