"""What the method passes share about recognized regions: which activation operands feed a product, the
tensors that need a neuron, encoder or quantizer in front of those operands, and detaching a region whose
computation a pass builds anew."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import onnx_graphsurgeon as gs
from spikec.passes.patterns import Region

# Region kinds whose operands are activations feeding a product.
WEIGHT_PRODUCT = "weight_matmul"
ACTIVATION_PRODUCTS = ("act_matmul", "act_mul")
PRODUCT_KINDS = (WEIGHT_PRODUCT, *ACTIVATION_PRODUCTS)

# Ops that move values without changing them: a tensor's values (quantized, spiking, per-step) stay what
# they are through them. A Transpose reorders rows, which the unrolled form cares about (timing.py).
DATA_MOVEMENT = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"})
# Ops that pick a subset of the values: quantized values stay quantized through them too.
SELECTION = frozenset({"Split", "Slice", "Gather"})

Operands = list[tuple[gs.Node, int]]


def product_operands(region: Region) -> Operands:
    """(node, input index) of the activation operands a neuron must feed."""
    node = next(n for n in region.nodes if n.op in ("MatMul", "Gemm", "Mul"))
    if region.kind in ACTIVATION_PRODUCTS:
        return [(node, 0), (node, 1)]
    weight_index = region.attrs.get("weight_input_index", 1)
    return [(node, 1 - weight_index)]


def operand_sites(
    regions: Iterable[Region], kinds: Collection[str] = PRODUCT_KINDS, keep: Callable[[gs.Tensor], bool] | None = None
) -> dict[str, Operands]:
    """Tensor name -> the product operands it feeds, over the products of ``kinds`` in ``regions``: every
    operand that is no constant (and that ``keep`` keeps), in region order."""
    sites: dict[str, Operands] = {}
    for region in regions:
        if region.kind not in kinds:
            continue
        for node, index in product_operands(region):
            tensor = node.inputs[index]
            if not isinstance(tensor, gs.Constant) and (keep is None or keep(tensor)):
                sites.setdefault(tensor.name, []).append((node, index))
    return sites


def detach(region: Region) -> None:
    """The region's own nodes produce nothing any more (cleanup drops them); its tensors get new producers."""
    for node in region.nodes:
        node.outputs.clear()
