// SpikeMatMul (spike_matmul.cc) joins the spikec domain that spikec_kernels.cc registers.
#pragma once

namespace Ort { struct CustomOpDomain; }

namespace spikec_matmul {
void add_ops(Ort::CustomOpDomain& domain);
}
