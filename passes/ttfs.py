"""TTFSFormer (seed 003) as graph rewrites: every layer's output is one spike per neuron.

A *site* is a tensor carried by spikes: its potential V is emitted (``TTFSEmit<H>``) as relative spike
times, and every reader receives it through a kernel (``TTFSReceive<F>``, runtime/ttfs.py). Between
sites the graph keeps its affine ops (weight MatMuls, bias and residual Adds, scalings, reshapes): they
are the weighted sums of the receiving neurons. Sites sit where a value must travel as a spike: the
float graph inputs (encoding, appendix A.2), the operands and outputs of every nonlinear construction,
the inputs and outputs of ops no construction covers (run in float between a decode and an encode,
listed in the report) and the graph outputs (decoded).

Constructions (section 4.3, appendix C):

* GELU / SiLU / Sigmoid / Tanh / Relu: one neuron per element, kernel f' (Corollary 4.5); quick_gelu by
  SiLU's on a scaled layer; HardSigmoid by a neuron's window clip, HardSwish by that and a product.
* Softmax over the last axis: optional max neuron and subtraction layer (C.2 layer 0), the log-sum-exp
  neuron (Theorem 4.6), then exp(x_i - lse) by an exp output transform with range [0, 1] (Eq. 36). An
  additive attention mask enters the max and output neurons additively and the log-sum-exp neuron as its
  synaptic weights e^mask, so a masked position contributes nothing.
* LayerNorm over the last axis: mean, centering, variance (kernel 2u), rsqrt (kernel re-derived from
  Theorem 4.1), then the product with gamma and beta folded into layer II. RMSNorm and L2 normalization:
  the same without the mean and centering.
* Activation x activation products (matmuls, gated MLPs' act(gate) * up, the LayerNorm product): layer I
  log(x1 + c1) + log(x2 + c2) with c = 1 - a per operand (4.3.4), layer II e^y - c2 x1 - c1 x2 - c1 c2,
  summed over the contraction (C.1). Layer I's range follows from the operands' ranges, so it never clips: with float
  spike times layer II's potential is exactly x1 @ x2 and is computed as such; on a clock (time
  precision p) all M*K*N layer I neurons are simulated.

The same walk builds two graphs: an *exact* one, where emitting applies h and receiving applies f in
float (the ANN decomposed into the constructions' stages, Algorithm 1's calibration network: every site's
value is an ordinary tensor), and the *spiking* one, with each site's range [a, b] from that calibration
plus a margin, or from its construction's analytic bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.options import Options, option
from spikec.passes.patterns import Region
from spikec.passes.regions import detach
from spikec.passes.timing import SHAPE_ONLY, is_affine, is_constant, replace_uses, varying_tensors
from spikec.runtime.ttfs import EMIT, RECEIVE, TICK_OP, Window

from spikec.errors import SpikecError

# Suffix of the extra graph output holding an output's relative spike times.
SPIKE_TIMES = ".spike_times"


@dataclass(frozen=True)
class TTFSOptions(Options):
    margin: float | None = option(
        None,
        "each calibrated range [a, b] widens by this fraction of its span per "
        "side (default: 1 with float spike times, 0.25 with --precision)",
        bounds=(0, 10),
        metavar="M",
    )
    precision: int = option(
        0, "time precision p: spike times on a grid of delta/p (0: float spike times)", bounds=(0, 2**24), metavar="P"
    )
    max_layer: bool = option(True, "softmax subtracts the row maximum first (appendix C.2, layer 0)")

    # the time step: every layer's emitting window
    delta = 1.0

    @property
    def range_margin(self) -> float:
        """With float spike times a wider range costs no precision worth measuring, and values beyond it
        clip: ranges widen by their span per side. On a clock of delta/p every unit of span costs ticks,
        so ranges widen by a quarter."""
        if self.margin is not None:
            return float(self.margin)
        return 1.0 if self.precision == 0 else 0.25


@dataclass
class Site:
    name: str
    role: str  # what the neurons compute, for the report
    emit: str  # output transform
    potential: gs.Variable
    analytic: bool  # range from the construction (else calibrated)
    floor: float | None = None  # a calibrated range never reaches below this (variance >= 0)
    tap: gs.Variable | None = None  # exact graph: what calibration measures, where not the value itself
    value: gs.Variable | None = None  # exact graph: the represented value
    spikes: gs.Variable | None = None  # spiking graph: relative spike times
    window: Window | None = None
    bounds: tuple[gs.Constant, gs.Constant] | None = None  # spiking graph: window as the ops' inputs
    receives: set = field(default_factory=set)

    # What a site has once the graph of its phase is built: the exact graph (calibration) measures
    # ``measured``, the spiking graph gives it a window, bounds and spikes.
    @property
    def measured(self) -> gs.Variable:
        tensor = self.tap or self.value
        assert tensor is not None, f"site {self.name}: not in an exact graph"
        return tensor

    @property
    def span(self) -> Window:
        assert self.window is not None, f"site {self.name}: not in a spiking graph"
        return self.window

    @property
    def bound_inputs(self) -> tuple[gs.Constant, gs.Constant]:
        assert self.bounds is not None, f"site {self.name}: not in a spiking graph"
        return self.bounds

    @property
    def spike_times(self) -> gs.Variable:
        assert self.spikes is not None, f"site {self.name}: not in a spiking graph"
        return self.spikes


Bounds = Callable[[], Window] | None


class Lowering:
    """Builds sites and their readers, exactly (calibration, ``ranges`` None) or as spikes."""

    def __init__(self, graph: gs.Graph, options: TTFSOptions, ranges: dict[str, Window] | None, opset: int):
        self.graph, self.options, self.ranges = graph, options, ranges
        self.spiking = ranges is not None
        self.sites: dict[str, Site] = {}
        self.by_tensor: dict[int, Site] = {}
        self.readouts: set[str] = set()  # tensors holding a received (decoded) value
        self.received: dict[tuple, gs.Variable] = {}
        # the constructions and their sites, for the report's neuron and operation counts (Table 3)
        self.constructions: list[dict] = []
        self.float_nodes: list[dict] = []
        self.b = GraphBuilder(graph, "ttfs", opset)
        self.delta = self.b.const(options.delta, name="ttfs.delta")
        self.tick = self.b.const(options.delta / options.precision, name="ttfs.tick") if options.precision else None

    def window(self, lower: float, upper: float) -> Window:
        return Window(float(lower), float(upper), self.options.delta)

    def emit(
        self,
        potential: gs.Variable,
        name: str,
        role: str,
        transform: str = "Identity",
        bounds: Bounds = None,
        out: gs.Variable | None = None,
        floor: float | None = None,
        clips: tuple[float, float] | None = None,
    ) -> Site:
        """A layer of neurons emitting ``potential``; ``out`` (if given) becomes its identity reading.
        ``bounds`` gives an analytic range (evaluated for the spiking graph only). ``clips``: the window
        [lower, upper] is part of the function the layer computes (a neuron clips its potential to its
        window: HardSigmoid is an identity neuron whose window is [0, 1]); the exact graph clips too."""
        if clips is not None:
            bounds = functools.partial(self.window, *clips)
        site = Site(name, role, transform, potential, analytic=bounds is not None, floor=floor)
        self.sites[name] = site
        if not self.spiking:  # named after the site: a calibration error names the construction
            value = EMIT[transform].value(self.b, potential, [])
            if clips is not None:
                value = self.b.op("Clip", value, self.b.const(clips[0]), self.b.const(clips[1]))
            site.value = self.b.op("Identity", value, out=out if out is not None else gs.Variable(name))
            self.readouts.add(site.value.name)
        else:
            if bounds is not None:
                site.window = bounds()
            else:
                assert self.ranges is not None, "a spiking graph is built with the calibrated ranges"
                site.window = self.ranges[name]
            site.bounds = (
                self.b.const(site.window.lower, name=f"{name}.lower"),
                self.b.const(site.window.upper, name=f"{name}.upper"),
            )
            spikes = gs.Variable(f"{name}.spikes", dtype=np.float32)
            site.spikes = self.b.op(
                EMIT[transform].op_type,
                potential,
                *site.bounds,
                self.delta,
                domain="spikec",
                out=spikes if self.tick is None else None,
            )
            if self.tick is not None:
                site.spikes = self.b.op(TICK_OP, site.spikes, self.delta, self.tick, out=spikes, domain="spikec")
            if out is not None:
                self.receive(site, out=out)
        if out is not None:
            self.by_tensor[id(out)] = site
        return site

    def receive(
        self, site: Site, transform: str = "Identity", params: tuple[float, ...] = (), out: gs.Variable | None = None
    ) -> gs.Variable:
        site.receives.add(transform)
        key = (site.name, transform, tuple(params))
        if out is None and key in self.received:  # one reading per kernel serves every reader
            return self.received[key]
        param_constants = [self.b.const(p) for p in params]
        if not self.spiking:
            if transform == "Identity" and out is None:
                return site.value
            value = self.b.op("Identity", RECEIVE[transform].value(self.b, site.value, param_constants), out=out)
        else:
            value = self.b.op(
                RECEIVE[transform].op_type,
                site.spike_times,
                *site.bound_inputs,
                self.delta,
                *param_constants,
                out=out,
                domain="spikec",
            )
        self.readouts.add(value.name)
        self.received.setdefault(key, value)
        return value

    def site_of(self, tensor: gs.Variable, role: str = "layer") -> Site:
        """The site carrying ``tensor``. An existing tensor becomes one by an identity emit; everything
        that read it then reads the received value, which takes over the tensor's name (a graph
        input keeps its name: the received value gets a suffix)."""
        if id(tensor) in self.by_tensor:
            return self.by_tensor[id(tensor)]
        name = tensor.name
        if not self.spiking:
            site = Site(name, role, "Identity", tensor, analytic=False, value=tensor)
            self.sites[name] = site
            self.readouts.add(name)
        else:
            graph_outputs = [i for i, t in enumerate(self.graph.outputs) if t is tensor]
            if any(t is tensor for t in self.graph.inputs):
                received = gs.Variable(f"{name}.received", dtype=np.float32, shape=tensor.shape)
            else:
                tensor.name = f"{name}.potential"
                received = gs.Variable(name, dtype=tensor.dtype or np.float32, shape=tensor.shape)
            replace_uses(tensor, received)
            for i in graph_outputs:
                self.graph.outputs[i] = received
            site = self.emit(tensor, name, role, out=received)
        self.by_tensor[id(tensor)] = site
        return site

    def product(self, a: Site, b: Site, name: str, out: gs.Variable, contract: bool) -> str | None:
        """out = a @ b (``contract``) or a * b (broadcasting), by the two-layer log/exp construction. Layer
        II's potential is ``out``: whatever reads it (scaling, mask, gamma/beta) up to the next site is
        part of layer II's weighted sum. Returns layer I's site where it is materialized."""
        x1, x2 = self.receive(a), self.receive(b)
        if not (self.spiking and self.options.precision):
            # Float spike times: layer I's range holds every log((x1 + c1)(x2 + c2)) by construction, so its
            # emit/receive round trip is exact, and layer II's potential sum_k e^y - c2 sum_k x1 - c1 sum_k x2
            # - K c1 c2 is exactly x1 @ x2. Evaluated as written, float32 would cancel terms the size of
            # (b1 + c1)(b2 + c2) (for a LayerNorm, the whole rsqrt range); evaluated as what it equals, the
            # simulation is exact and the M*K*N layer I neurons need not be materialized.
            self.b.op("MatMul" if contract else "Mul", x1, x2, out=out)
            return None
        # On a clock every layer I spike time is rounded on its own: the construction runs as written, its
        # layer II sum accumulated in float64 against the cancellation above.
        offset_a, offset_b = 1.0 - a.span.lower, 1.0 - b.span.lower
        log_a = self.receive(a, "Log", (offset_a,))
        log_b = self.receive(b, "Log", (offset_b,))
        if contract:  # [..., M, K, 1] + [..., 1, K, N]: one layer I neuron per (m, k, n)
            log_a = self.b.op("Unsqueeze", log_a, self.b.const([-1], np.int64))
            log_b = self.b.op("Unsqueeze", log_b, self.b.const([-3], np.int64))
        top = float(np.log((a.span.upper + offset_a) * (b.span.upper + offset_b)))
        layer_one = self.emit(
            self.b.op("Add", log_a, log_b),
            f"{name}.log_product",
            "product layer I",
            bounds=lambda: self.window(0.0, top),
        )
        double = functools.partial(self.b.op, "Cast", to=onnx.TensorProto.DOUBLE)
        shifted = double(self.receive(layer_one, "Exp"))  # (x1 + c1)(x2 + c2), up to the spike time's tick
        x1, x2 = double(x1), double(x2)
        if contract:
            shifted = self.b.op("ReduceSum", shifted, self.b.const([-2], np.int64), keepdims=0)
            count = self.b.op(
                "Cast",
                self.b.op("Gather", self.b.op("Shape", x1), self.b.const(-1, np.int64)),
                to=onnx.TensorProto.DOUBLE,
            )
            x1 = self.b.op("ReduceSum", x1, self.b.const([-1], np.int64), keepdims=1)
            x2 = self.b.op("ReduceSum", x2, self.b.const([-2], np.int64), keepdims=1)
        else:
            count = self.b.const(1.0, np.float64)
        correction = self.b.op(
            "Add",
            self.b.op("Mul", x1, self.b.const(offset_b, np.float64)),
            self.b.op("Mul", x2, self.b.const(offset_a, np.float64)),
        )
        constant = self.b.op("Mul", count, self.b.const(offset_a * offset_b, np.float64))
        potential = self.b.op("Sub", self.b.op("Sub", shifted, correction), constant)
        self.b.op("Cast", potential, to=onnx.TensorProto.FLOAT, out=out)
        return layer_one.name


def layernorm(lw: Lowering, region: Region) -> None:
    x, out = region.inputs[0], region.outputs[0]
    if region.attrs.get("axis", -1) != -1:
        raise SpikecError(f"node {region.name}: ttfs converts LayerNorm over the last axis only")
    detach(region)
    b, name = lw.b, region.name
    source = lw.site_of(x)
    if region.attrs["center"]:
        mean = lw.emit(b.reduce("ReduceMean", lw.receive(source)), f"{name}.mean", "LayerNorm mean")
        centered = lw.emit(b.op("Sub", lw.receive(source), lw.receive(mean)), f"{name}.centered", "LayerNorm centering")
    else:  # RMSNorm, L2 normalization: "LayerNorm without the mean"
        centered = source
    reduce = {"mean": "ReduceMean", "sum": "ReduceSum"}[region.attrs["reduction"]]
    variance = lw.emit(
        b.reduce(reduce, lw.receive(centered, "Square")), f"{name}.variance", "LayerNorm variance", floor=0.0
    )
    rsqrt = lw.emit(lw.receive(variance, "Rsqrt", (region.attrs["epsilon"],)), f"{name}.rsqrt", "LayerNorm rsqrt")
    if not lw.spiking:
        # A row of equal values (an untrained class token) normalizes to beta whatever its rsqrt, which is
        # 1/sqrt(eps): left in the calibration it would stretch the range a million-fold and cost every
        # other row its precision. Rows with a variance under 1e-6 of the batch's largest are left out
        # (they take the batch's smallest rsqrt); the spiking graph clips theirs at b, harmlessly.
        variances, values = lw.receive(variance), rsqrt.value
        relevant = b.op(
            "GreaterOrEqual", variances, b.op("Mul", b.op("ReduceMax", variances, keepdims=0), b.const(1e-6))
        )
        rsqrt.tap = b.op("Where", relevant, values, b.op("ReduceMin", values, keepdims=0))
    normalized = b.fresh("normalized")
    lw.product(centered, rsqrt, f"{name}.normalize", normalized, contract=False)
    if region.attrs.get("scale") is not None:
        normalized = b.op("Mul", normalized, region.attrs["scale"])
    if region.attrs.get("bias") is not None:
        normalized = b.op("Add", normalized, region.attrs["bias"])
    lw.emit(normalized, out.name, "LayerNorm output", out=out)
    lw.constructions.append({"kind": "layernorm", "name": name, "output": out.name})


def gelu(lw: Lowering, region: Region) -> None:
    x, out = region.inputs[0], region.outputs[0]
    detach(region)
    transform = "GeluTanh" if region.attrs.get("approximate") == "tanh" else "Gelu"
    lw.emit(lw.receive(lw.site_of(x), transform), out.name, transform, out=out)
    lw.constructions.append({"kind": "activation", "name": region.name, "output": out.name})


# Activations whose function is an input transform: one neuron per element (Corollary 4.5).
ACTIVATION_TRANSFORMS = {"silu": "Silu", "sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
QUICK_GELU_SCALE = 1.702  # quick_gelu(x) = silu(1.702 x) / 1.702


def activation(lw: Lowering, region: Region) -> None:
    """SiLU, Sigmoid, Tanh, Relu: one neuron per element with the function as its input transform. quick_gelu:
    a layer emitting 1.702 x (the scaling is its weighted sum), read through SiLU, scaled back in the next
    weighted sum. HardSigmoid: an identity neuron whose window is [0, 1] emitting x / 6 + 1/2 (the window's clip
    is the function); HardSwish: x times that, by the product construction."""
    x, out = region.inputs[0], region.outputs[0]
    function = region.attrs["function"]
    detach(region)
    b, name = lw.b, region.name
    source = lw.site_of(x)
    if function in ACTIVATION_TRANSFORMS:
        transform = ACTIVATION_TRANSFORMS[function]
        lw.emit(lw.receive(source, transform), out.name, transform, out=out)
    elif function == "quick_gelu":
        scaled = lw.emit(
            b.op("Mul", lw.receive(source), b.const(QUICK_GELU_SCALE)),
            f"{name}.scaled",
            "quick_gelu input",
            bounds=lambda: lw.window(QUICK_GELU_SCALE * source.span.lower, QUICK_GELU_SCALE * source.span.upper),
        )
        lw.emit(
            b.op("Mul", lw.receive(scaled, "Silu"), b.const(1.0 / QUICK_GELU_SCALE)), out.name, "quick_gelu", out=out
        )
    else:
        hard = lw.emit(
            b.op("Add", b.op("Mul", lw.receive(source), b.const(1.0 / 6.0)), b.const(0.5)),
            out.name if function == "hardsigmoid" else f"{name}.hardsigmoid",
            "HardSigmoid",
            clips=(0.0, 1.0),
            out=out if function == "hardsigmoid" else None,
        )
        if function == "hardswish":
            lw.product(source, hard, name, out, contract=False)
    lw.constructions.append({"kind": "activation", "name": name, "function": function, "output": out.name})


def act_mul(lw: Lowering, region: Region) -> None:
    """A gated MLP's act(gate) * up: the product construction, elementwise."""
    node = region.nodes[0]
    a, c = lw.site_of(node.inputs[0]), lw.site_of(node.inputs[1])
    out = node.outputs[0]
    node.outputs.clear()
    layer_one = lw.product(a, c, node.name, out, contract=False)
    lw.constructions.append(
        {"kind": "product", "name": node.name, "operands": [a.name, c.name], "layer_one": layer_one}
    )


# The exact graph clips nothing, so the share of a mask carried in the shift (see Masking) may be anything;
# this much keeps every shifted score that counts <= 0 and leaves finfo.min to the synaptic weight.
EXACT_REACH = 1e30


class Masking:
    """A softmax's attention masks as time-invariant synaptic terms (masks are built from inputs alone).

    The ANN computes softmax(z) with z from the scores x through the region's masks (x + m for an additive
    one, x - m for a subtractive one, where(masked, C, x) for a masked_fill, max(z, C) for OPT's clamp, and
    reshapes between them, as Swin's window mask), i.e. z = keep * x + m in float, each term taken through
    the reshapes as the ANN takes the sum. Per row, r = max(m) is
    subtracted: softmax is shift-invariant, and then m' = m - r <= 0 with 0 at the row's unmasked entries.
    The scores are taken as (keep * x + r) - r, the ANN's own float rounding: a fully masked row of
    finfo.min (or a fill) absorbs x and is uniform, as in the ANN, a row of -1e4 rounds x as the ANN does,
    and an unmasked row (r = 0) keeps x bit for bit. A row masked everywhere by -inf (r = -inf; the ANN
    gives NaN, sdpa's guard 0) gives 0: a constant input of 1 to its log-sum-exp neuron keeps that neuron
    in range, and every weight e^m' is 0."""

    def __init__(self, b: GraphBuilder, masks: list[dict], scores: gs.Tensor):
        self.b = b
        self.keep, mask = None, None
        self.reshapes, shape = [], b.op("Shape", scores)
        for step in masks:  # innermost first: z = keep * x + mask after each step
            if step["form"] in ("add", "sub"):
                mask = (
                    step["mask"]
                    if mask is None and step["form"] == "add"
                    else b.op(step["form"].title(), mask if mask is not None else b.const(0.0), step["mask"])
                )
                continue
            if step["form"] == "clamp":
                mask = None if mask is None else b.op("Max", mask, b.const(step["value"]))
                continue
            if step["form"] == "reshape":  # the terms are broadcast: each is the full scores' shape first

                def reshaped(term, shape=shape, target=step["shape"]):
                    return b.op("Reshape", b.op("Expand", term, shape), target)

                mask = reshaped(mask if mask is not None else b.const(0.0))
                self.keep = None if self.keep is None else reshaped(self.keep)
                self.reshapes.append(step["shape"])
                shape = b.op("Shape", mask)
                continue
            masked = step["mask"] if step["fill_when"] else b.op("Not", step["mask"])
            kept = b.op("Cast", b.op("Not", masked), to=onnx.TensorProto.FLOAT)
            self.keep = kept if self.keep is None else b.op("Mul", self.keep, kept)
            mask = b.op("Where", masked, b.const(step["fill_value"]), mask if mask is not None else b.const(0.0))
        row_max = b.reduce("ReduceMax", mask)
        # max > -inf, written against the lowest finite float32: a model's constants stay finite
        live = b.op("GreaterOrEqual", row_max, b.const(np.finfo(np.float32).min))
        self.shift = b.op("Where", live, row_max, b.const(0.0))
        self.offsets = b.op("Sub", mask, self.shift)  # m' (-inf throughout a dead row)
        self.bias = b.op("Where", live, self.offsets, b.const(0.0))  # m', finite on dead rows
        self.dead = b.op("Cast", b.op("Not", live), to=onnx.TensorProto.FLOAT)

    def scores(self, x: gs.Variable) -> gs.Variable:
        for shape in self.reshapes:
            x = self.b.op("Reshape", x, shape)
        kept = x if self.keep is None else self.b.op("Mul", x, self.keep)
        return self.b.op("Sub", self.b.op("Add", kept, self.shift), self.shift)

    def potential_share(self, reach: float) -> gs.Variable:
        """The part of m' the shifted potential carries: m' down to -reach (an additive bias such as
        ALiBi's, exactly), the rest is a synaptic weight (log_weight)."""
        return self.b.op("Max", self.bias, self.b.const(-reach))

    def log_weight(self, reach: float) -> gs.Variable:
        return self.b.op("Min", self.b.op("Add", self.offsets, self.b.const(reach)), self.b.const(0.0))


def softmax(lw: Lowering, region: Region) -> None:
    """C.2: the optional max neuron and subtraction layer, the log-sum-exp neuron, exp outputs in [0, 1].
    A mask (Masking) enters the max and subtraction layers' potentials additively and the log-sum-exp
    neuron as synaptic weights, so a masked position contributes nothing. The row maximum includes the
    mask, so an unmasked score never lies above it; a masked one may, by up to the scores' span: that much
    of the mask is carried in the subtraction layer's potential (its window is that much wider), the rest
    in the weights, where clipping cannot reach it."""
    attrs = region.attrs
    scores, out = attrs["scores"], region.outputs[0]
    detach(region)
    b, name = lw.b, region.name
    source = lw.site_of(scores)
    masking = Masking(b, attrs["masks"], scores) if attrs["masks"] else None
    count = scores.shape[-1] if scores.shape is not None and isinstance(scores.shape[-1], int) else None
    if lw.options.max_layer:
        reach = 0.0 if masking is None else (source.span.upper - source.span.lower if lw.spiking else EXACT_REACH)
        x = lw.receive(source) if masking is None else masking.scores(lw.receive(source))
        top = lw.emit(
            b.reduce("ReduceMax", x if masking is None else b.op("Add", x, masking.bias)),
            f"{name}.max",
            "softmax max",
            bounds=lambda: source.span,
        )
        shifted = x if masking is None else b.op("Add", x, masking.potential_share(reach))
        shifted = lw.emit(
            b.op("Sub", shifted, lw.receive(top)),
            f"{name}.shifted",
            "softmax subtraction",
            bounds=lambda: lw.window(source.span.lower - source.span.upper - reach, 0.0),
        )
        # sum_i e^(x_i - max) is in [1, n]
        lse_bounds = (lambda: lw.window(0.0, np.log(count))) if count and count > 1 else None
    else:  # max_i x_i <= log sum_i e^x_i <= max_i x_i + log n
        reach = 0.0
        shifted = (
            source
            if masking is None
            else lw.emit(
                masking.scores(lw.receive(source)),
                f"{name}.masked",
                "softmax masked scores",
                bounds=lambda: source.span,
            )
        )
        lse_bounds = (lambda: lw.window(source.span.lower, source.span.upper + np.log(count))) if count else None
    exps, potential = lw.receive(shifted, "Exp"), lw.receive(shifted)
    total = None
    if masking is not None:  # synaptic weights e^m': 1 where attention is allowed, 0 where masked
        log_weight = masking.log_weight(reach)
        exps = b.op("Mul", exps, b.op("Exp", log_weight))
        total = b.op("Add", b.reduce("ReduceSum", exps), masking.dead)
        potential = b.op("Add", potential, log_weight)
    lse = lw.emit(
        total if total is not None else b.reduce("ReduceSum", exps),
        f"{name}.logsumexp",
        "softmax log-sum-exp",
        "Log",
        bounds=lse_bounds,
    )
    lw.emit(
        b.op("Sub", potential, lw.receive(lse)),
        out.name,
        "softmax output",
        "Exp",
        bounds=lambda: lw.window(0.0, 1.0),
        out=out,
    )
    lw.constructions.append({"kind": "softmax", "name": name, "output": out.name})


def act_matmul(lw: Lowering, region: Region) -> None:
    node = next(n for n in region.nodes if n.op in ("MatMul", "Gemm"))
    if node.op != "MatMul":
        raise SpikecError(f"node {node.name}: ttfs converts activation x activation MatMul, not {node.op}")
    if any(t.shape is not None and len(t.shape) < 2 for t in node.inputs):
        raise SpikecError(f"node {node.name}: ttfs needs matmul operands of rank >= 2")
    a, c = lw.site_of(node.inputs[0]), lw.site_of(node.inputs[1])
    out = node.outputs[0]
    node.outputs.clear()
    layer_one = lw.product(a, c, node.name, out, contract=True)
    lw.constructions.append({"kind": "matmul", "name": node.name, "operands": [a.name, c.name], "layer_one": layer_one})


CONSTRUCTIONS = {
    "layernorm": layernorm,
    "gelu": gelu,
    "activation": activation,
    "softmax": softmax,
    "act_matmul": act_matmul,
    "act_mul": act_mul,
}
# Regions that are weighted sums: they stay as they are, between sites.
PASSIVE = frozenset({"weight_matmul", "residual_add"})


def lower(
    graph: gs.Graph, regions: list[Region], options: TTFSOptions, opset: int, ranges: dict[str, Window] | None = None
) -> Lowering:
    """Rewrite ``graph`` in place: exactly (``ranges`` None: the calibration network) or as spikes."""
    lw = Lowering(graph, options, ranges, opset)
    for tensor in list(graph.inputs):
        if tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f" and tensor.outputs:
            lw.site_of(tensor, "input encoding")
    for region in regions:
        if region.kind in CONSTRUCTIONS:
            CONSTRUCTIONS[region.kind](lw, region)
        elif region.kind not in PASSIVE:
            raise SpikecError(
                f"node {region.name}: ttfs cannot convert a {region.kind} region"
                + (
                    " (the model is quantized; ttfs converts float models)"
                    if region.kind == "quantizer"
                    else " (re-export with the attention decomposed)"
                    if region.kind == "attention"
                    else ""
                )
            )
    if not lw.spiking:  # calibration-only tensors read by nothing else: outputs, so cleanup keeps them
        graph.outputs.extend(site.tap for site in lw.sites.values() if site.tap is not None)
    graph.cleanup().toposort()
    lw.float_nodes = _convert_remaining(lw)
    varying = varying_tensors(graph, lw.readouts)
    for tensor in list(graph.outputs):
        if tensor.name in varying:
            site = lw.site_of(tensor, "output")
            if lw.spiking:  # the output layer's spike times too: the earliest spike is the class (A.2)
                times = gs.Variable(f"{site.name}{SPIKE_TIMES}", dtype=np.float32, shape=tensor.shape)
                graph.outputs.append(lw.b.op("Identity", site.spikes, out=times))
    graph.cleanup().toposort()
    return lw


def _convert_remaining(lw: Lowering) -> list[dict]:
    """Ops no region covers but that read received values: affine ones stay (weighted sums); anything else
    runs in float, its varying inputs decoded (made sites) and its outputs encoded."""
    varying = set(lw.readouts)
    floated = []
    for node in list(lw.graph.nodes):
        moving = [t for t in node.inputs if not is_constant(t) and t.name in varying]
        if not moving or not node.outputs or node.op in SHAPE_ONLY:
            continue
        if id(node) in lw.b.created or is_affine(node, varying):
            varying.update(t.name for t in node.outputs)
            continue
        for tensor in moving:
            if tensor.name not in lw.readouts:
                lw.site_of(tensor, "float op input")
        for tensor in list(node.outputs):
            lw.site_of(tensor, "float op output")
            varying.add(tensor.name)
        floated.append({"node": node.name, "op": node.op})
    lw.graph.cleanup().toposort()
    return floated


def calibration_ranges(stats: dict, lw: Lowering, margin: float) -> dict[str, Window]:
    """[min, max] of each calibrated site, widened by ``margin`` x span per side (appendix A.1: "nearly all
    outputs lie within the range"); a constant tensor gets a span of 1e-3 of its magnitude (1e-3 if it is
    zero). The floor is relative: an absolute one would spread a site of tiny values (BatchNorm-shrunk
    activations) over a range far wider than they are, and float spike times would resolve them coarsely."""
    ranges = {}
    for name, site in lw.sites.items():
        if site.analytic:
            continue
        s = stats[site.measured.name]
        low, high = float(s.min()), float(s.max())
        span = max(high - low, 1e-3 * max(abs(low), abs(high))) or 1e-3
        low, high = low - margin * span, high + margin * span
        if site.floor is not None:
            low = max(low, site.floor)
        ranges[name] = Window(low, high, lw.options.delta)
    return ranges


def calibration_taps(lw: Lowering) -> list[str]:
    return [site.measured.name for site in lw.sites.values() if not site.analytic]


def describe(lw: Lowering) -> list[dict]:
    return [
        {
            "site": s.name,
            "role": s.role,
            "emit": s.emit,
            "receives": sorted(s.receives),
            "lower": s.span.lower,
            "upper": s.span.upper,
            "analytic": s.analytic,
            "potential": s.potential.name,
            "spikes": s.spike_times.name,
        }
        for s in lw.sites.values()
    ]
