// SpikeMatMul (runtime/ops.py): MatMul(spikes, weight) whose cost follows the firing rate. A dense
// MatMul multiplies every zero too; here each row of spike codes is compacted to the columns where it
// fires, and the output row is the sum of those weight rows, added for +1, subtracted for -1 (any
// other value, rare, is multiplied in). SpikeZIP-TF's codes are 70-99 % zeros: the product then costs
// a fraction of onnxruntime's MatMul (benchmarks/bench_spike_matmul.py, bench_native.py).
//
// Each output element sums its terms in a fixed order (the +1 rows by increasing k, then the -1 rows,
// then the others), whatever the thread count or ISA: native runs repeat themselves bit for bit, but
// differ from MatMul's blocked FMA sums by float rounding (tests/test_native.py bounds it).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "isa.h"
#include "spike_matmul.h"

namespace spikec_matmul {

// Above which fraction of nonzero codes onnxruntime's MatMul is faster, from costs measured with
// benchmarks/bench_spike_matmul.py (2 threads, this VM, every [K, N] of the digits ViT and MiniLM,
// densities 0.02-0.4), in ns: MatMul 0.010 per multiply-add; adding rows 0.67 per row and input or
// output column (compacting the codes, writing the output) plus, per fired code and output column,
// 0.016 + 0.00001 K (a panel of K rows outgrows the caches as K grows); less 10 %. That is 0.36 for
// MiniLM's 384 x 1536, 0.30 for its 384 x 384, 0.22 for its 1536 x 384, and below zero (always
// MatMul) for the digits ViT's 64 x 128.
float dense_threshold(size_t k, size_t n) {
  const float kf = static_cast<float>(k), nf = static_cast<float>(n);
  const float fixed = 0.67f * (kf + nf) / (kf * nf);  // per multiply-add of the product
  const float per_code = 0.016f + 0.00001f * kf;
  return 0.9f * (0.010f - fixed) / per_code;
}

namespace {

typedef float v8 __attribute__((vector_size(32)));

// The weight in panels of kCols columns, [panels][K][kCols], zero-padded: a fired row of one panel is
// one contiguous 256-byte run, and the panel's 8 vector accumulators stay in registers.
constexpr size_t kCols = 64;
constexpr size_t kVectors = kCols / 8;
// Rows of spikes per task: a task compacts them once, then sweeps every panel over them while the
// panel (K x 256 bytes) stays in L2.
constexpr size_t kRows = 32;

// Packed weight rows start on cache lines: a fired row is four whole lines, no load straddles two.
struct Packed {
  std::vector<float> storage;
  const float* data = nullptr;

  void pack(const float* weight, size_t k, size_t n) {
    const size_t panels = (n + kCols - 1) / kCols;
    constexpr size_t kLine = 64 / sizeof(float);
    storage.assign(panels * k * kCols + kLine, 0.0f);
    const size_t misalign = reinterpret_cast<uintptr_t>(storage.data()) / sizeof(float) % kLine;
    float* packed = storage.data() + (misalign ? kLine - misalign : 0);
    for (size_t p = 0; p < panels; ++p) {
      const size_t width = std::min(kCols, n - p * kCols);
      for (size_t r = 0; r < k; ++r)
        std::memcpy(packed + (p * k + r) * kCols, weight + r * n + p * kCols, width * sizeof(float));
    }
    data = packed;
  }
};

// One row's fired columns: +1 at plus[0..n_plus), -1 at minus[0..n_minus), other values at other[].
struct Fired {
  int32_t* plus;
  int32_t* minus;
  int32_t* other;
  float* other_value;
  size_t n_plus, n_minus, n_other;
};

inline void compact(const float* x, size_t k, Fired& f) {
  size_t np = 0, nm = 0, no = 0;
  for (size_t i = 0; i < k; ++i) {
    const float c = x[i];
    // both lists take the index; only the one that matches keeps it (no branch on the common codes)
    f.plus[np] = static_cast<int32_t>(i);
    f.minus[nm] = static_cast<int32_t>(i);
    np += c == 1.0f;
    nm += c == -1.0f;
    if (c != 0.0f && c != 1.0f && c != -1.0f) {  // NaN included
      f.other[no] = static_cast<int32_t>(i);
      f.other_value[no++] = c;
    }
  }
  f.n_plus = np, f.n_minus = nm, f.n_other = no;
}

// acc[j] += sign * the fired row's j-th vector of the panel (loaded element-wise into a local: memcpy
// into an array of vectors made GCC keep the accumulators on the stack, 4x slower)
#define SPIKEC_PANEL_ROWS(list, n, update)                                    \
  for (size_t i = 0; i < (n); ++i) {                                          \
    const float* w = panel + static_cast<size_t>((list)[i]) * kCols;          \
    for (size_t j = 0; j < kVectors; ++j) {                                   \
      v8 x;                                                                   \
      std::memcpy(&x, w + 8 * j, sizeof x);                                   \
      update;                                                                 \
    }                                                                         \
  }

inline __attribute__((always_inline)) void panel_row(const Fired& f, const float* panel, float* out, size_t width) {
  v8 acc[kVectors];
  for (size_t j = 0; j < kVectors; ++j) acc[j] = v8{};
  SPIKEC_PANEL_ROWS(f.plus, f.n_plus, acc[j] = acc[j] + x)
  SPIKEC_PANEL_ROWS(f.minus, f.n_minus, acc[j] = acc[j] - x)
  SPIKEC_PANEL_ROWS(f.other, f.n_other, acc[j] = acc[j] + (v8{} + f.other_value[i]) * x)
  std::memcpy(out, acc, width * sizeof(float));
}
#undef SPIKEC_PANEL_ROWS

struct Job {
  const float* spikes;
  const float* packed;
  float* out;
  size_t rows, k, n;
};

inline __attribute__((always_inline)) void rows_loop(const Job& job, size_t lo, size_t hi) {
  thread_local std::vector<int32_t> indices;
  thread_local std::vector<float> values;
  const size_t count = hi - lo;
  indices.resize(3 * kRows * job.k);
  values.resize(kRows * job.k);
  Fired fired[kRows];
  for (size_t r = 0; r < count; ++r) {
    int32_t* base = indices.data() + 3 * r * job.k;
    fired[r] = {base, base + job.k, base + 2 * job.k, values.data() + r * job.k, 0, 0, 0};
    compact(job.spikes + (lo + r) * job.k, job.k, fired[r]);
  }
  const size_t panels = (job.n + kCols - 1) / kCols;
  for (size_t p = 0; p < panels; ++p) {
    const float* panel = job.packed + p * job.k * kCols;
    const size_t width = std::min(kCols, job.n - p * kCols);
    for (size_t r = 0; r < count; ++r) panel_row(fired[r], panel, job.out + (lo + r) * job.n + p * kCols, width);
  }
}

// Compiled for the baseline ISA and for AVX2, as spikec_kernels.cc's loops: the same float additions
// in the same order either way. (AVX-512 measured no faster: the row adds wait on the weight panel.)
__attribute__((target("avx2"))) void rows_avx2(const Job& job, size_t lo, size_t hi) { rows_loop(job, lo, hi); }
void rows_baseline(const Job& job, size_t lo, size_t hi) { rows_loop(job, lo, hi); }

void rows(const Job& job, size_t lo, size_t hi) {
  if (spikec_isa::level() >= spikec_isa::kAvx2) rows_avx2(job, lo, hi);
  else rows_baseline(job, lo, hi);
}

// The fraction of nonzero codes in every kSampleStride-th row.
float sampled_density(const float* spikes, size_t rows, size_t k) {
  constexpr size_t kSampleStride = 8;
  size_t fired = 0, seen = 0;
  for (size_t r = 0; r < rows; r += kSampleStride, seen += k) {
    const float* x = spikes + r * k;
    for (size_t i = 0; i < k; ++i) fired += x[i] != 0.0f;
  }
  return static_cast<float>(fired) / static_cast<float>(seen);
}

struct Kernel {
  // A constant weight (the only kind spike_matmuls chooses) is packed once, when the session starts
  // (data stays null for any other).
  Packed constant_packed;
  // onnxruntime's own MatMul, for spikes too dense for adding rows to pay
  Ort::Op dense{nullptr};
  // a node's dense_above attribute, where it has one, instead of dense_threshold (tests force each path)
  float dense_above = 0.0f;
  bool fixed_threshold = false;

  explicit Kernel(const OrtKernelInfo* info) {
    const char* type_names[] = {"T"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    dense = Ort::Op::Create(info, "MatMul", "", 13, type_names, types, 1, nullptr, 0, 2, 1);
    try {
      dense_above = Ort::ConstKernelInfo(info).GetAttribute<float>("dense_above");
      fixed_threshold = true;
    } catch (const Ort::Exception&) {
    }
    int is_constant = 0;
    const Ort::ConstValue weight = Ort::ConstKernelInfo(info).GetTensorConstantInput(1, &is_constant);
    if (is_constant) {
      const auto shape = weight.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() == 2) {
        constant_packed.pack(weight.GetTensorData<float>(), static_cast<size_t>(shape[0]), static_cast<size_t>(shape[1]));
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      const auto spikes = ctx.GetInput(0);
      const auto weight = ctx.GetInput(1);
      std::vector<int64_t> shape = spikes.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> wshape = weight.GetTensorTypeAndShapeInfo().GetShape();
      if (wshape.size() != 2 || shape.empty() || shape.back() != wshape[0])
        throw Ort::Exception("SpikeMatMul: needs spikes [..., K] and a weight [K, N]", ORT_INVALID_ARGUMENT);
      Job job{};
      job.k = static_cast<size_t>(wshape[0]);
      job.n = static_cast<size_t>(wshape[1]);
      job.rows = spikes.GetTensorTypeAndShapeInfo().GetElementCount() / std::max<size_t>(job.k, 1);
      shape.back() = wshape[1];
      auto out = ctx.GetOutput(0, shape);
      job.out = out.GetTensorMutableData<float>();
      if (job.rows == 0 || job.n == 0) return nullptr;
      if (job.k == 0) {
        std::fill(job.out, job.out + job.rows * job.n, 0.0f);
        return nullptr;
      }
      job.spikes = spikes.GetTensorData<float>();
      const float threshold = fixed_threshold ? dense_above : dense_threshold(job.k, job.n);
      if (sampled_density(job.spikes, job.rows, job.k) > threshold) {
        const OrtValue* inputs[] = {spikes, weight};
        OrtValue* outputs[] = {out};
        dense.Invoke(raw, inputs, 2, outputs, 1);
        return nullptr;
      }
      Packed packed;
      if (!constant_packed.data) packed.pack(weight.GetTensorData<float>(), job.k, job.n);
      job.packed = constant_packed.data ? constant_packed.data : packed.data;
      const size_t tasks = (job.rows + kRows - 1) / kRows;
      if (tasks == 1) {
        rows(job, 0, job.rows);
        return nullptr;
      }
      ctx.ParallelFor(
          [](void* data, size_t index) {
            const auto* j = static_cast<const Job*>(data);
            rows(*j, index * kRows, std::min(j->rows, (index + 1) * kRows));
          },
          tasks, 0, &job);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

struct CustomOp : Ort::CustomOpBase<CustomOp, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
  const char* GetName() const { return "SpikeMatMul"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void add_ops(Ort::CustomOpDomain& domain) {
  static CustomOp* op = new CustomOp();  // outlives every session, as the domain does
  domain.Add(op);
}

}  // namespace spikec_matmul

// The density above which a [k, n] SpikeMatMul runs MatMul: at or below zero it always does, and
// sessions (runtime/native.py) leave such products MatMuls rather than pay for the detour.
extern "C" __attribute__((visibility("default"))) float SpikecSpikeMatMulThreshold(int64_t k, int64_t n) {
  return spikec_matmul::dense_threshold(static_cast<size_t>(k), static_cast<size_t>(n));
}
