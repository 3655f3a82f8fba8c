"""spikec: compile Transformer ANNs (ONNX) into spiking neural networks that run in onnxruntime."""

from spikec.errors import SpikecError

__all__ = ["SpikecError", "compile", "finetune", "quantize"]


def __getattr__(name: str):
    # Running a compiled model (spikec.runtime) must not pay for importing the compiler.
    if name in ("compile", "finetune", "quantize"):
        from spikec import compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'spikec' has no attribute {name!r}")
