"""Post-training quantization into a QANN: SpikeZIP-TF's pipeline step 1, without training.

The paper quantizes by LSQ-QAT; here scales come from calibration data. Quantizers go before every
activation operand of a MatMul/Gemm or of a gated MLP's act(gate) * up and after every product (after its
bias), as in the reference
code, which also leaves the attention scores Q K^T unquantized (the softmax output is quantized
instead). A product output that reaches the next product through data movement only (the q/k/v
projections' head reshapes) is quantized once. A product output that only an elementwise activation reads
(the MLP's first product before its GELU, a gate before its SiLU) is not quantized when the activation's
output is (as a product operand): one neuron layer between the MLP's two products, as the reference code's
one quantizer in front of its ReLU; the activation reads the product's running sum in the SNN, as the
softmax reads Q K^T's. Each quantizer is
clamp(floor(x/s + 1/2), low, high) * s (the reference code's LSQ forward), with L levels: [0, L - 1]
where calibration never saw a negative value, otherwise [-L/2, L/2 - 1] or, when that has the larger
error, L levels split between the signs in proportion to the range (GELU's outputs). A per-channel
quantizer chooses the split per channel too (low and high are [C]): the channels of one tensor sit
differently around zero (a product's output channel is offset by its bias, a LayerNorm output's by its
beta; many never go negative), and a split by the whole tensor's range leaves part of most channels'
levels on a side they never reach. The ST-BIF+ tracer bounds are per channel as its threshold is. A graph
output keeps one split for all its channels: its rows are often just the samples, few, and a classifier's
logit that calibration never saw positive would get no level above zero.

The scale s is per channel (one value per index of the last axis, each clipped by its own MMSE search)
wherever that axis has a static size, per tensor elsewhere (the attention probabilities, whose last axis
is the sequence). Transformers' activations carry a few outlier channels (MiniLM's LayerNorm outputs and
residual branches reach 100x their median): one scale for all channels leaves the others a level or two.
The SNN carries a per-channel scale at no cost: it is the ST-BIF+ threshold per channel, folded into the
next weight's rows. Moving the outliers into the weights first (SmoothQuant) would add nothing, since the
weights stay in float: x/f quantized per tensor with scale s is x quantized with per-channel scale s*f.

Zero points (opt-in): where every reader of a quantizer is x W + b with W and b constant (MatMul and Add,
or Gemm: Affine; the LayerNorm outputs before q/k/v and the MLP, the GELU outputs before the MLP's second
product), a channel may count its levels from its mid-range c, quantizing x - c (Outlier Suppression+'s
shift), which fits a channel's range closer than a split of the levels between the signs can. The products read the levels alone and their biases absorb c W, so in the SNN they still
read spikes only; the neuron gets -c as input at the first step. Each channel keeps the zero point
only where it lowers its calibration sample's error (c = 0 elsewhere). The levels get finer, so the neurons emit more
spikes, and a sparse tensor's many near-zero values (GELU's) now sit at a far level that each neuron
first runs down to from the -c of the first step: T_eq grows. Hence not the default. Elsewhere
(residual branches, attention operands) c would have to be added back where the next op reads it, with
no bias downstream to absorb the mean error it carries, and measured worse (docs/methods/spikezip.md).

Bias correction: a quantizer's rounding and clipping shift its tensor's mean per channel, and a weight
product carries that shift, E[q(x) - x] W, into every row of its output. Where a per-channel quantized
operand reads a constant weight and the product adds a constant bias, the bias absorbs the shift
measured on the calibration sample (Nagel et al., data-free quantization, with measured means). Only the bias changes,
so the QANN stays a QANN the SNN equals. Correcting the outputs' quantizers too, or shifting biases by
the QANN's measured drift (all upstream quantizers together), measured worse (docs/methods/spikezip.md).

The quantizer is written with standard ops (Div, Add, Floor, Clip or Max and Min, Mul), so the QANN runs in stock
onnxruntime; passes/patterns.py recognizes it (region kind "quantizer") as it recognizes QDQ pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.patterns import Region
from spikec.passes.regions import DATA_MOVEMENT, PRODUCT_KINDS, SELECTION, operand_sites, product_operands
from spikec.passes.timing import is_constant, varying_tensors

# Ops that only move or pick values: quantized values stay quantized through them.
_DATA_MOVEMENT = DATA_MOVEMENT | SELECTION
# Elementwise activations (GELU, ReLU, SiLU, ...): evaluated in float on running sums in the SNN.
_ACTIVATION_KINDS = ("gelu", "activation")
# Clipping thresholds tried, as fractions of the tensor's largest magnitude: outlier channels (MiniLM's
# LayerNorm inputs reach 100x their median) make the best clip far below the maximum.
SCALE_GRID = np.geomspace(1 / 256, 1.0, 97)


@dataclass(frozen=True)
class Site:
    tensor: str
    consumers: tuple[tuple[gs.Node, int], ...] | None  # None: every consumer reads the quantized tensor
    role: str  # "before" (a product's operand) or "after" (a product's output)


def _feeds_softmax(tensor: gs.Tensor, softmax_inputs: set[str]) -> bool:
    """Whether ``tensor`` reaches a softmax through single-input scaling/masking/movement ops."""
    frontier = [tensor]
    seen = set()
    while frontier:
        current = frontier.pop()
        if current.name in softmax_inputs:
            return True
        if current.name in seen:
            continue
        seen.add(current.name)
        for consumer in current.outputs:
            if consumer.op in _DATA_MOVEMENT | {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Max"}:
                frontier.extend(consumer.outputs)
    return False


def _source_through_movement(tensor: gs.Tensor) -> list[str]:
    """``tensor`` and the tensors it is a data-movement view of."""
    chain = [tensor.name]
    while tensor.inputs and tensor.inputs[0].op in _DATA_MOVEMENT:
        tensor = tensor.inputs[0].inputs[0]
        chain.append(tensor.name)
    return chain


def _readers_through_movement(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``tensor`` or a data-movement view of it (GPT-2's Reshape from its Gemm's 2-D
    output back to [batch, seq, C] before the GELU), the views' own nodes left out."""
    readers = []
    for node in tensor.outputs:
        if node.op in _DATA_MOVEMENT and node.inputs[0] is tensor:
            readers.extend(_readers_through_movement(node.outputs[0]))
        else:
            readers.append(node)
    return readers


def activation_tensors(graph: gs.Graph) -> set[str]:
    """Tensors computed from the data a sample carries: float inputs and table lookups (embeddings) and what
    follows from them. What is computed from integer inputs by arithmetic only (positions cast to float:
    rotary angles; masks) is not an activation: a quantizer there would round positions to a few levels."""
    integer_lookups = [
        t.name
        for n in graph.nodes
        if n.op in ("Gather", "GatherElements", "GatherND") and not all(is_constant(t) for t in n.inputs)
        for t in n.outputs
    ]
    float_inputs = [t.name for t in graph.inputs if np.issubdtype(np.dtype(t.dtype or np.float32), np.floating)]
    return varying_tensors(graph, float_inputs + integer_lookups)


def quantizer_sites(regions: list[Region], activations: set[str]) -> list[Site]:
    """Where quantizers go: see the module docstring; product operands that are no ``activations`` stay
    float (the product is then affine in its one activation operand)."""
    products = [
        r
        for r in regions
        if r.kind in PRODUCT_KINDS
        and any(node.inputs[index].name in activations for node, index in product_operands(r))
    ]
    softmax_inputs = {t.name for r in regions if r.kind == "softmax" for t in r.inputs}
    # product operands and what they are data-movement views of (GPT-2 reshapes its GELU's output to 2-D)
    operands = {
        name
        for r in products
        for node, index in product_operands(r)
        for name in _source_through_movement(node.inputs[index])
    }
    quantized_activation_nodes = {
        id(node)
        for r in regions
        if r.kind in _ACTIVATION_KINDS and r.outputs and all(t.name in operands for t in r.outputs)
        for node in r.nodes
    }
    after: dict[str, Site] = {}
    for region in products:
        output = region.outputs[0] if region.outputs else product_operands(region)[0][0].outputs[0]
        if region.kind == "act_matmul" and _feeds_softmax(output, softmax_inputs):
            continue
        readers = _readers_through_movement(output)
        if readers and all(id(reader) in quantized_activation_nodes for reader in readers):
            continue
        after.setdefault(output.name, Site(output.name, None, "after"))
    before = operand_sites(
        products,
        keep=lambda tensor: (
            tensor.name in activations and not any(name in after for name in _source_through_movement(tensor))
        ),
    )
    return [*after.values(), *(Site(name, tuple(consumers), "before") for name, consumers in before.items())]


@dataclass(frozen=True, eq=False)
class Quantizer:
    scale: np.ndarray  # float32, () per tensor or [C] per channel of the last axis
    low: int | np.ndarray  # an int, or int64 [C] per channel (a per-channel scale's split of the levels)
    high: int | np.ndarray
    offset: np.ndarray | None = None  # float32 [C]: a zero point per channel; the levels count x - offset

    @classmethod
    def for_levels(
        cls, low: int | np.ndarray, high: int | np.ndarray, clip: np.ndarray | float, offset: np.ndarray | None = None
    ) -> Quantizer:
        """Levels [low, high], the clip threshold mapped to the farther end (a channel calibration never saw
        away from zero gets scale 1: any positive scale quantizes its zeros exactly)."""
        clip = np.asarray(clip, np.float32)
        farther = np.maximum(-np.asarray(low), np.asarray(high)).astype(np.float32)
        scale = np.where(clip > 0, clip / farther, np.float32(1)).astype(np.float32)
        return cls(scale, low, high, offset)

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        centered = x if self.offset is None else x - self.offset
        quantized = np.clip(np.floor(centered / self.scale + np.float32(0.5)), self.low, self.high) * self.scale
        return quantized if self.offset is None else quantized + self.offset


def level_ranges(levels: int, low: float | np.ndarray, high: float | np.ndarray) -> list[tuple]:
    """Candidate splits of L consecutive integer levels between the signs, for a range [low, high] seen by
    calibration (scalars for a tensor, [C] arrays for its channels, giving [C] int arrays of bounds): [0, L-1]
    where it never went negative; otherwise the halves [-L/2, L/2-1] (the reference code's) and, where the
    range is lopsided, a split in its proportion (at least one level each side), which keeps most levels
    for the positive side of a range with a small negative tail, such as GELU's output."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    span = np.where(high > low, high - low, 1.0)
    negative = np.where(high > 0, np.clip(np.rint(levels * -low / span), 1, levels - 2), levels - 1)
    negative = np.where(low >= 0, 0, negative).astype(np.int64)
    proportional = (-negative, levels - 1 - negative)
    if low.ndim == 0:
        if low >= 0:
            return [(0, levels - 1)]
        halves = (-(levels // 2), levels // 2 - 1)
        return list(dict.fromkeys([halves, (int(proportional[0]), int(proportional[1]))]))
    per_channel_halves = (np.full(low.shape, -(levels // 2)), np.full(low.shape, levels // 2 - 1))
    return [proportional] if (low >= 0).all() else [per_channel_halves, proportional]


def choose_quantizer(
    stats, levels: int, per_channel: bool, zero_point: bool = False, channel_splits: bool = True
) -> Quantizer:
    """The quantizer of least squared error on the calibration sample. Per tensor: the best of the level
    ranges of ``level_ranges``, each with its clip threshold (a SCALE_GRID fraction of the largest magnitude)
    of least error. Per channel: for each channel the best of its own level ranges, each with the channel's
    own best clip, and with ``zero_point`` also of the halves around the channel's mid-range; with
    ``channel_splits`` off, the best of the tensor's level ranges for all channels (each still with its own
    clip)."""
    splits = per_channel and channel_splits
    seen_range = (stats.channel_min, stats.channel_max) if splits else (float(stats.min()), float(stats.max()))
    candidates = [(stats, None, low, high) for low, high in level_ranges(levels, *seen_range)]
    if zero_point and per_channel:
        middle = ((stats.channel_min + stats.channel_max) / 2).astype(np.float32)
        centered = stats.shifted(middle)
        candidates.append((centered, middle, -(levels // 2), levels // 2 - 1))
    quantizers, errors = [], []
    for seen, offset, low, high in candidates:
        clip = seen.mmse(
            lambda x, thr, low=low, high=high: Quantizer.for_levels(low, high, thr)(x),
            grid=SCALE_GRID,
            per_channel=per_channel,
        )
        quantizer = Quantizer.for_levels(low, high, clip, offset)
        quantizers.append(quantizer)
        errors.append(np.square(quantizer(stats.sample) - stats.sample).sum(axis=0, dtype=np.float64))
    # an overflowing error (inf, nan) loses to any finite one and leaves the first candidate where all overflow
    finite = np.nan_to_num(np.stack(errors), nan=np.inf, posinf=np.finfo(np.float64).max)
    if not splits:  # one candidate for the whole tensor
        return quantizers[int(np.argmin(finite.sum(axis=1)))]
    pick = np.argmin(finite, axis=0)
    channels = np.arange(len(pick))

    def chosen(values: list) -> np.ndarray:
        return np.stack([np.broadcast_to(v, pick.shape) for v in values])[pick, channels]

    low, high = (
        chosen([q.low for q in quantizers]).astype(np.int64),
        chosen([q.high for q in quantizers]).astype(np.int64),
    )
    offsets = [np.zeros(pick.shape, np.float32) if q.offset is None else q.offset for q in quantizers]
    offset = (
        chosen(offsets).astype(np.float32)
        if any(quantizers[i].offset is not None for i in set(pick.tolist()))
        else None
    )
    uniform = (low == low[0]).all() and (high == high[0]).all()
    return Quantizer(
        chosen([q.scale for q in quantizers]).astype(np.float32),
        int(low[0]) if uniform else low,
        int(high[0]) if uniform else high,
        offset,
    )


def channel_count(tensor: gs.Tensor) -> int | None:
    """The static size of ``tensor``'s last axis, which a per-channel scale would follow; None if dynamic, or
    where ``tensor`` is a Relu of a product's quantized output: its values already lie on that quantizer's grid,
    and a second grid per channel lands on exact level ties of the first (scales in ratio 1:2, 1:1) that float
    summation in the SNN rounds the other way (nn.TransformerEncoder's Relu MLP, tests/test_blocks.py)."""
    shape = tensor.shape
    static = shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
    regridded = bool(tensor.inputs) and tensor.inputs[0].op == "Relu"
    return None if regridded else static


def insert_quantizers(graph: gs.Graph, sites: list[Site], quantizers: dict[str, Quantizer]) -> list[dict]:
    """Write each site's quantizer into the graph as Div -> Add(0.5) -> Floor -> Clip -> Mul."""
    tensors = graph.tensors()
    b = GraphBuilder(graph, "quantize")
    report = []
    for site in sites:
        tensor, q = tensors[site.tensor], quantizers[site.tensor]
        name = f"{site.tensor}/Quantize"

        def variable(suffix: str, site=site, tensor=tensor) -> gs.Variable:
            return gs.Variable(f"{site.tensor}.{suffix}", dtype=np.float32, shape=tensor.shape)

        def const(suffix: str, value, site=site) -> gs.Constant:
            return b.const(value, None if suffix == "quant_scale" else np.float32, name=f"{site.tensor}.{suffix}")

        scale = const("quant_scale", q.scale)
        source = tensor
        if q.offset is not None:
            source = b.op(
                "Sub", tensor, const("quant_offset", q.offset), out=variable("quant_centered"), name=f"{name}/Sub"
            )
        divided = b.op("Div", source, scale, out=variable("quant_div"), name=f"{name}/Div")
        shifted = b.op("Add", divided, const("quant_half", 0.5), out=variable("quant_shift"), name=f"{name}/Add")
        floored = b.op("Floor", shifted, out=variable("quant_floor"), name=f"{name}/Floor")
        if np.ndim(q.low) == 0:
            clipped = b.op(
                "Clip",
                floored,
                const("quant_low", q.low),
                const("quant_high", q.high),
                out=variable("quant_clip"),
                name=f"{name}/Clip",
            )
        else:  # per-channel bounds: Clip takes scalars only
            raised = b.op("Max", floored, const("quant_low", q.low), out=variable("quant_max"), name=f"{name}/Max")
            clipped = b.op("Min", raised, const("quant_high", q.high), out=variable("quant_clip"), name=f"{name}/Min")
        if q.offset is not None:
            # every reader is x W + b (choose_quantizer was asked for a zero point only there): the
            # zero point goes into the biases, b + offset W, so the products read the levels alone (spikes
            # in the SNN, nothing added at the first step)
            readers = biased_products(site, len(q.offset))
            assert readers is not None, f"zero point of {site.tensor} has a reader that is no biased product"
            for product in readers:
                product.set_bias(product.bias() + q.offset.astype(np.float64) @ product.matrix(), ".zero_point")
        quantized = variable("quantized")
        consumers = (
            site.consumers
            if site.consumers is not None
            else [
                (c, i)
                for c in list(tensor.outputs)
                if c.name != f"{name}/Div"
                for i, t in enumerate(c.inputs)
                if t is tensor
            ]
        )
        for node, index in consumers:
            node.inputs[index] = quantized
        if site.consumers is None and tensor in graph.outputs:
            graph.outputs = [quantized if t is tensor else t for t in graph.outputs]
            quantized.name, tensor.name = tensor.name, f"{tensor.name}.unquantized"
        b.op("Mul", clipped, scale, out=quantized, name=f"{name}/Mul")
        report.append(
            {
                "tensor": site.tensor,
                "role": site.role,
                **scale_summary(q.scale),
                **range_summary(q.low, q.high),
                **({} if q.offset is None else {"zero_point": True}),
            }
        )
    graph.toposort()
    return report


@dataclass
class Affine:
    """A product x W + b of the graph with W a constant [C, N]: MatMul(x, W), with b the constant [N] of the
    Add that alone reads the product, or Gemm(x, B, C) with transA = 0, W = alpha op(B) and b = beta C.
    ``bias_at`` is the node that holds b (the Add, or the Gemm itself) and b's index among its inputs; None
    where the product adds no bias."""

    node: gs.Node
    bias_at: tuple[gs.Node, int] | None

    @property
    def bias_node(self) -> gs.Node | None:
        return None if self.bias_at is None else self.bias_at[0]

    @property
    def bias_constant(self) -> gs.Constant | None:
        return None if self.bias_at is None else self.bias_at[0].inputs[self.bias_at[1]]

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[1]

    @property
    def output(self) -> gs.Variable:
        """The tensor that holds x W + b."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def unbiased(self) -> gs.Variable | None:
        """The tensor that holds x W alone: None where a Gemm adds its bias in the same node."""
        return self.node.outputs[0] if self.bias_node is not self.node else None

    def _attr(self, name: str) -> float:
        return float(self.node.attrs.get(name, 1.0)) if self.node.op == "Gemm" else 1.0

    def _transposed(self) -> bool:
        return self.node.op == "Gemm" and bool(self.node.attrs.get("transB", 0))

    @property
    def shape(self) -> tuple[int, int]:
        """(C, N) of W, read off the stored weight without converting it."""
        rows, columns = self.weight.values.shape
        return (columns, rows) if self._transposed() else (rows, columns)

    def matrix(self, out: np.ndarray | None = None) -> np.ndarray:
        """W as float64 [C, N], written into ``out`` where given (no temporary as large as W: a vocabulary
        head's is hundreds of MB)."""
        values = self.weight.values
        stored = values.T if self._transposed() else values
        out = np.empty(stored.shape) if out is None else out
        out[...] = stored
        out *= self._attr("alpha")
        return out

    def bias(self) -> np.ndarray | None:
        """b as float64 [N], or None."""
        if self.bias_constant is None:
            return None
        return self._attr("beta") * self.bias_constant.values.astype(np.float64).reshape(-1)

    def set_matrix(self, values: np.ndarray) -> None:
        """W := ``values`` in place (the caller has checked that only this product reads it)."""
        values = values / self._attr("alpha")
        self.weight.values = (values.T if self._transposed() else values).astype(self.weight.values.dtype)

    def set_bias(self, values: np.ndarray, suffix: str | None = None) -> None:
        """b := ``values``: in place, or as a new constant named after the old one with ``suffix`` (the old one
        may have other readers)."""
        assert self.bias_at is not None, "set_bias on a product without bias"
        node, index = self.bias_at
        current = node.inputs[index]
        stored = (values / self._attr("beta")).reshape(current.values.shape).astype(current.values.dtype)
        if suffix is None:
            current.values = stored
        else:
            node.inputs[index] = gs.Constant(f"{current.name}{suffix}", stored)


def affine_product(node: gs.Node, index: int) -> Affine | None:
    """``node`` as x W (+ b) where it reads its input ``index`` as x and a constant 2-D W (Affine); None
    otherwise, and for a Gemm whose C is no constant vector of N values (a batched 3-D weight, or a C per
    row, adds no one vector to every row)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if index != 0 or node.op not in ("MatMul", "Gemm") or not isinstance(weight, gs.Constant):
        return None
    if weight.values.ndim != 2:
        return None
    affine = Affine(node, None)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        _, width = affine.shape
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is None:
            return affine
        usable = isinstance(bias, gs.Constant) and bias.values.size == width and bias.values.shape[-1] == width
        return Affine(node, (node, 2)) if usable and affine._attr("beta") != 0 else None
    readers = node.outputs[0].outputs
    if len(readers) == 1 and readers[0].op == "Add":
        constant = [i for i, t in enumerate(readers[0].inputs) if isinstance(t, gs.Constant)]
        if len(constant) == 1 and readers[0].inputs[constant[0]].values.shape == (weight.values.shape[1],):
            return Affine(node, (readers[0], constant[0]))
    return affine


def biased_products(site: Site, channels: int) -> list[Affine] | None:
    """Every reader of a "before" site's quantizer as a biased product x W + b with W [channels, N], or None
    unless all are."""
    if site.role != "before" or site.consumers is None:
        return None
    readers = []
    for node, index in site.consumers:
        product = affine_product(node, index)
        if product is None or product.bias_at is None or product.shape[0] != channels:
            return None
        readers.append(product)
    return readers


def correct_biases(graph: gs.Graph, sites: list[Site], quantizers: dict[str, Quantizer], stats: dict) -> None:
    """Bias correction (module docstring) of the products that read a "before" site's per-channel quantizer
    as x W + b (Affine). A per-tensor quantizer's clip cuts outlier channels so
    deep that their mean shift, one constant for every row, moves the ordinary rows more than it helps
    the outlier ones (docs/methods/spikezip.md: MiniLM per tensor 0.04 with it, 0.53 without)."""
    for site in sites:
        if site.role != "before" or site.consumers is None or not quantizers[site.tensor].per_channel:
            continue
        sample = stats[site.tensor].sample
        shift = (quantizers[site.tensor](sample) - sample).mean(axis=0, dtype=np.float64)
        for node, index in site.consumers:
            product = affine_product(node, index)
            if product is None or product.bias_at is None or product.shape[0] != len(shift):
                continue
            product.set_bias(product.bias() - shift @ product.matrix(), ".bias_corrected")


def range_summary(low: int | np.ndarray, high: int | np.ndarray) -> dict:
    """A quantizer's level range for a report: its bounds, or per channel the range of each bound."""
    if np.ndim(low) == 0:
        return {"low": int(low), "high": int(high)}
    low, high = np.asarray(low), np.asarray(high)
    return {
        "low_min": int(low.min()),
        "low_max": int(low.max()),
        "high_min": int(high.min()),
        "high_max": int(high.max()),
    }


def scale_summary(scale: np.ndarray) -> dict:
    """A quantizer's scale for a report: the value, or per channel its count and range."""
    scale = np.asarray(scale)
    if scale.ndim == 0 or scale.size == 1:
        return {"scale": float(scale.reshape(-1)[0])}
    return {"scale_channels": int(scale.size), "scale_min": float(scale.min()), "scale_max": float(scale.max())}
