"""One way for a pass to add nodes to a graphsurgeon graph (see GraphBuilder)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from spikec.runtime import ops as spec


def export_like(graph: gs.Graph, source: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a model with ``source``'s opsets, IR version and producer (graphsurgeon's export writes
    its own)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = source.ir_version
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    model.producer_name = source.producer_name
    return model


class GraphBuilder:
    """Nodes into a graphsurgeon graph, as runtime.ops.NodeBuilder builds function bodies: ``op`` makes a
    node and returns its output, named ``<prefix>/<op>_<n>`` in creation order (deterministic); ``const``
    a constant, ``reduce`` a last-axis reduction in the form of the graph's opset, ``spikec`` a spikec op
    with its attribute defaults. It remembers the nodes it made (``created``). With ``like``, new tensors
    are float32 of ``like``'s rank (what the time passes read before inference runs); else untyped."""

    def __init__(self, graph: gs.Graph, prefix: str, opset: int | None = None, like: gs.Tensor | None = None):
        self.graph, self.prefix, self.count = graph, prefix, 0
        self.opset = graph.opset if opset is None else opset
        self.created: set[int] = set()
        rank = None if like is None or like.shape is None else len(like.shape)
        self._typed = like is not None
        self._shape = None if rank is None else [None] * rank

    def fresh(self, hint: str) -> gs.Variable:
        self.count += 1
        name = f"{self.prefix}/{hint}_{self.count}"
        if self._typed:
            return gs.Variable(name, dtype=np.float32, shape=self._shape)
        return gs.Variable(name)  # types come from inference

    def op(
        self,
        op_type: str,
        *inputs,
        out: gs.Variable | None = None,
        name: str | None = None,
        domain: str | None = None,
        **attrs,
    ) -> gs.Variable:
        """``name`` names the node where a pass's readers know it by name (default ``<output>/<op>``)."""
        out = out if out is not None else self.fresh(op_type)
        self.node(op_type, inputs, [out], name or f"{out.name}/{op_type}", domain=domain, **attrs)
        return out

    def node(self, op_type: str, inputs, outputs, name: str, *, domain: str | None = None, **attrs) -> gs.Node:
        """A node with the given outputs (several, or empty ones for optional outputs left out)."""
        node = gs.Node(op_type, name, attrs=attrs, inputs=list(inputs), outputs=list(outputs))
        if domain:
            node.domain = domain
        self.graph.nodes.append(node)
        self.created.add(id(node))
        return node

    def const(self, value, dtype=np.float32, name: str | None = None) -> gs.Constant:
        """A constant of ``value`` as ``dtype`` (None: its own), named ``name`` or ``<prefix>/const_<n>``."""
        if name is None:
            self.count += 1
            name = f"{self.prefix}/const_{self.count}"
        return gs.Constant(name, np.asarray(value, dtype))

    def reduce(self, op: str, data: gs.Variable) -> gs.Variable:
        """``op`` over the last axis, keepdims (axes moved from attribute to input at opset 18)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.op(op, data, self.const([-1], np.int64), keepdims=1)
        return self.op(op, data, axes=[-1], keepdims=1)

    def spikec(
        self, op_type: str, *inputs, out: gs.Variable | None = None, name: str | None = None, **attrs
    ) -> gs.Variable:
        """A spikec op (runtime/ops.py), its attributes defaulted from the op library."""
        return self.op(op_type, *inputs, out=out, name=name, domain="spikec", **spikec_attributes(op_type, attrs))


def spikec_attributes(op_type: str, attrs: dict) -> dict:
    # Function attributes carry no defaults: every attribute a function body references is set.
    return {**(spec.OPS[op_type].attributes if op_type in spec.OPS else {}), **attrs}
