// The TTFS kernels (ttfs_kernels.cc) join the spikec domain that spikec_kernels.cc registers.
#pragma once

namespace Ort { struct CustomOpDomain; }

namespace spikec_ttfs {
void add_ops(Ort::CustomOpDomain& domain);
}
