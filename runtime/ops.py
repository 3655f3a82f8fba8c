"""The spikec op set: the one place that defines what every spiking op computes.

Each op is written once, as its *step*: the ONNX nodes that advance it by one time step
(inputs at step t, the state after step t-1, the 1-based step index t) -> (outputs at step t,
state after step t). Everything else is derived from that definition:

* ``<Op>Step`` functions (stateful models): the step itself; state is an explicit input/output.
* ``<Op>`` functions (time-unrolled models): a Scan of the same step over the time axis of a
  time-major batch, or the one ONNX op that computes the recurrence (``SpikingOp.over_time``).
  Unrolled tensors hold all steps folded into the batch axis: ``[T*B, ..., C]`` where rows
  ``t*B .. (t+1)*B-1`` belong to step ``t+1``.
* native kernels (runtime/kernels/) repeat these functions' float32 operations in order, bit for
  bit; onnxruntime's own function inlining is the portable reference implementation.

States start at zero (an unrolled ECAccumulate's sum at -0: _accumulate_over_time). A stateful
model accepts a scalar zero for every state at t=1: the step bodies only combine states with inputs
through broadcasting arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "spikec"
COUNT_OUTPUT = "count"
DOMAIN_VERSION = 1
# Function bodies use only ops whose signatures are stable since opset 13, and declare the opset of
# the model they are attached to (onnxruntime requires them to agree).
MIN_ONNX_OPSET = 13


class NodeBuilder:
    """Collects ONNX nodes with unique tensor names inside one function or graph body."""

    def __init__(self, scope: str = "", static: dict[str, int] | None = None) -> None:
        # Nested graphs (Scan bodies, If branches) share SSA naming with their parent: each needs its own
        # scope.
        self.nodes: list[onnx.NodeProto] = []
        self.scope = scope
        self._count = 0
        # the values of the op's ``specialized`` attributes this body is built for (see ``choose``)
        self.static = dict(static or {})

    def nested(self, scope: str, **static: int) -> NodeBuilder:
        """A builder for a graph nested in this one (a Scan body, an If branch): its own names, this one's
        attribute values and ``static``'s."""
        return NodeBuilder(f"{self.scope}{scope}", {**self.static, **static})

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.scope}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.op_outputs(op_type, *inputs, count=1, **attrs)[0]

    def op_outputs(self, op_type: str, *inputs: str, count: int, **attrs) -> list[str]:
        names = [self.fresh(op_type.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def const(self, value, dtype=np.float32) -> str:
        name = self.fresh("const")
        tensor = onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def attr_int(self, attr: str) -> str:
        """A scalar int64 tensor holding the function attribute ``attr``."""
        name = self.fresh(attr)
        node = helper.make_node("Constant", [], [name])
        ref = onnx.AttributeProto()
        ref.name = "value_int"
        ref.ref_attr_name = attr
        ref.type = onnx.AttributeProto.INT
        node.attribute.append(ref)
        self.nodes.append(node)
        return name

    def choose(self, attr: str, when_set: Callable[[], str], when_clear: Callable[[], str]) -> str:
        """``when_set()`` where the int attribute ``attr`` is nonzero, else ``when_clear()``, only the one
        built: a function body branches on the op's ``specialized`` attribute with an If on its value, each
        branch built for one value, and onnxruntime folds an If whose condition is a constant (as an
        attribute is, once the function is inlined), so the branch not taken costs neither a pass nor a
        node, where a Where would compute both sides."""
        return when_set() if self.static[attr] else when_clear()


# A step gets tensor names: inputs and states by their spec names, params, t, and whatever the
# prologue derived from the attributes; it returns output and next-state names.
StepFn = Callable[[NodeBuilder, dict[str, str]], tuple[dict[str, str], dict[str, str]]]
PrologueFn = Callable[[NodeBuilder, dict[str, str]], dict[str, str]]
OverTimeFn = Callable[[NodeBuilder, dict[str, str]], dict[str, str]]


@dataclass(frozen=True)
class SpikingOp:
    name: str
    summary: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    states: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, int]
    step: StepFn
    prologue: PrologueFn = field(default=lambda b, env: {})
    # a composite (compose): the names of the ops it chains and the parameter scaling the first's output
    chain: tuple[str, ...] = ()
    chain_scale: str | None = None
    # parameters along a hidden axis that the states carry before the input's axes (UGO: N hidden
    # neurons per element); the other parameters are one value or one per channel, as for every op
    hidden: tuple[str, ...] = ()
    # an optional last output COUNT_OUTPUT (a node that does not want it names it ""): the spikes fired
    # per row of the leading axis, so that counting them per sample costs no pass of its own over the
    # spikes in a kernel. The step returns each element's spikes under COUNT_OUTPUT in its outputs;
    # integers, so their sums are exact in any order.
    spike_count: bool = False
    # output 0 holds only -1, 0 and +1 (spike codes): a product of it with a weight matrix may run as a
    # SpikeMatMul (below)
    ternary: bool = False
    # an int attribute (0 or 1) the step reads through NodeBuilder.choose: its functions hold a body for
    # each value. One at most: onnxruntime 1.32 crashes folding an If nested in another around a Scan.
    specialized: str | None = None
    # the unrolled form's body on whole sequences ([T, rows, C] inputs, "t" the steps 1..T as a [T] vector)
    # where one ONNX op computes the recurrence (a running sum: CumSum) in place of a Scan of the step:
    # one pass over all T steps where the Scan's body copies its result out at every step. The step's
    # operations in the step's order, from a state of -0 (below); tests/test_ops.py holds it to the
    # Step form. Not carried into composites, whose other op needs the Scan.
    over_time: OverTimeFn | None = None

    @property
    def step_name(self) -> str:
        return self.name + "Step"

    def state_names(self) -> list[tuple[str, str]]:
        """(input name, output name) of every state in the Step form."""
        return [(s, s + "_next") for s in self.states]

    @property
    def state_rank_offset(self) -> int:
        """How many axes a state has beyond the input's (the hidden axis, if any)."""
        return 1 if self.hidden else 0


# ---------------------------------------------------------------- MT neuron (ECMT, Eq. 19-25)

# Largest power of two <= r for r in [1/2, 2^127.5) from float arithmetic alone (ONNX has no frexp
# and no bit cast): q = r * (2^23 + 1) rounds away every bit of r below its leading one, q * (1 - 2^-24)
# rounds back to just under q, and their difference is that leading one, exact (Rump, Ogita and Oishi's
# ufp). The step runs it on r * 2^-30, which keeps q finite for r up to float32's limit: scaling by a
# power of two is exact, so the thresholds carry the 2^30 back.
_UFP_SCALE = 2.0**-30
_UFP_SPLIT = 2.0**23 + 1
_JUST_BELOW_ONE = 1.0 - 2.0**-24  # x * this: x's predecessor for a power of two x, no power of two lower else


def _mt_prologue(b: NodeBuilder, env: dict[str, str]) -> dict[str, str]:
    levels = b.op("Cast", b.attr_int("levels"), to=TensorProto.FLOAT)
    top_level = b.op("Pow", b.const(2.0), b.op("Sub", levels, b.const(1.0)))
    # ratios above the top level fire it: held below twice the top level (where its power of two would
    # be the next level), still above it (a power of two strictly below the ratio is then still the top);
    # in the step's units of 2^-30
    return {"ratio_cap": b.op("Mul", top_level, b.const(1.5 * _UFP_SCALE))}


def _mt_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Eq. 25 fires level k (lambda_k = theta*2^k) when lambda_k - theta/2 <= m < lambda_(k+1) - theta/2 on
    the positive side, and symmetrically (bounds strict the other way) on the negative side: the fired
    level is the largest power of two p <= |m|/theta + 1/2 (p < on the negative side), capped at 2^(n-1),
    and nothing fires when p < 1 (nor for a NaN membrane). Computed in O(1) per value rather than by
    testing all 2n levels, and with selections written as arithmetic on 0/1 masks (exact: the thresholds
    are positive and finite, theta_pos + theta_neg < 2^97): onnxruntime's Where, Pow and Log cost many
    times an Add per element. Every ratio below is the true one times 2^-30 (see _UFP_SCALE)."""
    membrane = b.op("Add", env["v"], env["x"])
    theta_scale = b.const(1.0 / _UFP_SCALE)
    # the side's threshold, signed, times 2^30: theta_pos where m >= 0, else (NaN too) -theta_neg;
    # 2^127 - theta_neg * 2^30 rounds to 2^127, above any threshold
    positive = b.op("Cast", b.op("GreaterOrEqual", membrane, b.const(0.0)), to=TensorProto.FLOAT)
    signed_theta = b.op(
        "Min",
        b.op("Mul", env["theta_pos"], theta_scale),
        b.op("Sub", b.op("Mul", positive, b.const(2.0**127)), b.op("Mul", env["theta_neg"], theta_scale)),
    )
    # |m|/theta + 1/2; on the negative side times the factor that steps an exact power of two down one
    # (the strict bound), no power of two lower else
    side_factor = b.op("Add", b.op("Mul", positive, b.const(2.0**-24)), b.const(_JUST_BELOW_ONE))
    ratio = b.op("Mul", b.op("Add", b.op("Div", membrane, signed_theta), b.const(0.5 * _UFP_SCALE)), side_factor)
    ratio = b.op("Min", ratio, env["ratio_cap"])
    split = b.op("Mul", ratio, b.const(_UFP_SPLIT))
    power = b.op("Sub", split, b.op("Mul", split, b.const(_JUST_BELOW_ONE)))
    level = b.op("ThresholdedRelu", power, alpha=0.75 * _UFP_SCALE)  # powers below 1 (and NaN) fire nothing
    emitted = b.op("Mul", level, signed_theta)  # 2^(k-30) * theta * 2^30: exact
    # The emitted spike code is in units of theta_pos (parallel parameter normalization, Eq. 27-29):
    # positive levels are 2^k, negative levels -eta*2^k with eta = theta_neg/theta_pos.
    code = b.op("Div", emitted, env["theta_pos"])
    return {"spikes": code}, {"v": b.op("Sub", membrane, emitted)}


MT_NEURON = SpikingOp(
    name="MTNeuron",
    summary=(
        "Multi-threshold neuron (ECMT Eq. 19-25): soft reset, v0=0, at most one spike per step at one "
        "of 2n levels +theta_pos*2^k / -theta_neg*2^k (k<n) chosen by round-to-nearest. Emits the spike "
        "code in units of theta_pos."
    ),
    inputs=("x",),
    params=("theta_pos", "theta_neg"),
    states=("v",),
    outputs=("spikes",),
    attributes={"levels": 8},
    step=_mt_step,
    prologue=_mt_prologue,
)


# ------------------------------------------------------------ ST-BIF+ neuron (SpikeZIP-TF, Eq. 1)


def _stbif_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Eq. 1 with the reference code's initial membrane V_0 = theta/2. States start at zero, so the state
    ``v`` holds V - theta/2: V + x >= theta becomes v + x >= theta/2 and V + x < 0 becomes v + x < -theta/2.
    At equilibrium the tracer is clamp(floor(sum(x)/theta + 1/2), s_min, s_max): the quantizer's level."""
    membrane = b.op("Add", env["v"], env["x"])
    half = b.op("Mul", env["theta"], b.const(0.5))
    up = b.op("And", b.op("GreaterOrEqual", membrane, half), b.op("Less", env["tracer"], env["s_max"]))
    down = b.op("And", b.op("Less", membrane, b.op("Neg", half)), b.op("Greater", env["tracer"], env["s_min"]))
    up, down = b.op("Cast", up, to=TensorProto.FLOAT), b.op("Cast", down, to=TensorProto.FLOAT)
    spike = b.op("Sub", up, down)
    # |spike|: up and down exclude each other (theta > 0); onnxruntime's Abs is slower than an Add
    return (
        {"spikes": spike, COUNT_OUTPUT: b.op("Add", up, down)},
        {"v": b.op("Sub", membrane, b.op("Mul", spike, env["theta"])), "tracer": b.op("Add", env["tracer"], spike)},
    )


ST_BIF_NEURON = SpikingOp(
    name="STBIFNeuron",
    summary=(
        "ST-BIF+ neuron (SpikeZIP-TF Eq. 1): bipolar spikes of +-theta, soft reset, V_0 = theta/2, spike "
        "tracer held in [s_min, s_max] (the quantizer's clamp range, in levels). Emits the spike code "
        "(+1, 0, -1); the spikes accumulate to the quantizer's output clamp(round(x/theta))*theta."
    ),
    inputs=("x",),
    params=("theta", "s_min", "s_max"),
    states=("v", "tracer"),
    outputs=("spikes",),
    attributes={},
    step=_stbif_step,
    spike_count=True,
    ternary=True,
)


# ------------------------------- integer ST-BIF+ neuron (SpikeZIP-TF, integer-exact mode, bursts)


def _stbif_integer_prologue(b: NodeBuilder, env: dict[str, str]) -> dict[str, str]:
    return {"burst": b.op("Cast", b.attr_int("burst"), to=TensorProto.FLOAT)}


def _stbif_integer_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """ST-BIF+ in integer units of theta. Its input is the running total y(t) of what the quantizer reads;
    its input current is the change of that total's level, r(t) - r(t-1) with r = clamp(round(y/theta))
    rounded as the quantizer rounds (half to even: QuantizeLinear; half up: spikec's own). The membrane
    integrates those changes less the spikes, so it is r(t) - tracer(t) at every step: the tracer (the
    spikes' sum) is the one state, the membrane r(t) - tracer(t - 1) before firing. All integers (exact in
    float32 below 2^24, and levels are at most 2^16). It fires up to ``burst`` spikes of either sign per
    step, so once quiet the tracer is the quantizer's level exactly. Emits the spikes (integers in
    [-burst, burst])."""
    scaled = b.op("Div", env["y"], env["theta"])
    rounded = b.choose(
        "half_even", lambda: b.op("Round", scaled), lambda: b.op("Floor", b.op("Add", scaled, b.const(0.5)))
    )
    level = b.op("Min", b.op("Max", rounded, env["s_min"]), env["s_max"])
    membrane = b.op("Sub", level, env["tracer"])
    # one pass where Min(Max()) makes two (burst is one value)
    spike = b.op("Clip", membrane, b.op("Neg", env["burst"]), env["burst"])
    return {"spikes": spike, COUNT_OUTPUT: b.op("Abs", spike)}, {"tracer": b.op("Add", env["tracer"], spike)}


ST_BIF_INTEGER_NEURON = SpikingOp(
    name="STBIFIntegerNeuron",
    summary=(
        "ST-BIF+ neuron in integer units of theta (SpikeZIP-TF, integer-exact mode): reads the running total "
        "y of the quantizer's input; its membrane is the level clamp(round(y/theta), s_min, s_max) (half "
        "to even where half_even=1, else half up) less the spikes fired so far, the tracer; fires up to "
        "burst spikes of +-1 per step (soft reset). Emits the spikes; the tracer ends at the quantizer's "
        "level exactly."
    ),
    inputs=("y",),
    params=("theta", "s_min", "s_max"),
    states=("tracer",),
    outputs=("spikes",),
    attributes={"burst": 1, "half_even": 1},
    step=_stbif_integer_step,
    prologue=_stbif_integer_prologue,
    spike_count=True,
    specialized="half_even",
)


# ------------------------------------------------- IF neuron (STA: signed with memory, burst spikes)


def _if_prologue(b: NodeBuilder, env: dict[str, str]) -> dict[str, str]:
    burst = b.op("Cast", b.attr_int("burst"), to=TensorProto.FLOAT)
    # -signed: Mul(emitted, -signed) is -(signed * emitted) bit for bit, one pass instead of two
    minus_signed = b.op("Neg", b.op("Cast", b.attr_int("signed"), to=TensorProto.FLOAT))
    return {"burst": burst, "minus_burst": b.op("Neg", burst), "minus_signed": minus_signed}


def _spike_value(b: NodeBuilder, env: dict[str, str], theta: str) -> str:
    """rho*theta = theta/burst: what one spike carries."""
    return b.op("Div", env[theta], env["burst"])


def _per_spike_value(b: NodeBuilder, env: dict[str, str], theta: str) -> str:
    """burst/theta: what turns an input into units of a spike's value."""
    return b.op("Div", env["burst"], env[theta])


def _if_count(b: NodeBuilder, env: dict[str, str], drive: str, negated: bool = False) -> tuple[str, dict[str, str]]:
    """STA's IF neuron as its reference code runs it (appendix F.2-F.3), in units of a spike's value
    rho*theta (rho = 1/burst): v0 = 0, soft reset; up to ``burst`` spikes per step (so at most theta per
    step); with ``signed``, negative spikes too, but only while the total emitted so far stays >= 0
    (memory). ``drive`` is the step's input in those units (subtracted where ``negated``: the neuron on
    -x, as -(x * c) is x * c negated bit for bit); the states, v (membrane) and emitted (the spikes fired
    so far, net), are in them too. Returns the spikes fired, an integer count in [-burst, burst].
    In units the count is trunc(clamp(reach, -burst, burst)): a clamp and an int32 round trip (exact for
    integers this small) where floor(|reach| / unit) * sign(reach) * unit on the spike values took nine
    passes. The Max with clamp - 1, which never exceeds the truncation, keeps a NaN membrane's count NaN
    (the round trip turns NaN into an integer)."""
    membrane = b.op("Sub" if negated else "Add", env["v"], drive)
    lower = b.op("Mul", env["emitted"], env["minus_signed"])  # -emitted, or 0 when unsigned
    clamped = b.op("Clip", b.op("Max", membrane, lower), env["minus_burst"], env["burst"])
    truncated = b.op("Cast", b.op("Cast", clamped, to=TensorProto.INT32), to=TensorProto.FLOAT)
    count = b.op("Max", truncated, b.op("Sub", clamped, b.const(1.0)))
    return count, {"v": b.op("Sub", membrane, count), "emitted": b.op("Add", env["emitted"], count)}


def _if_step(b: NodeBuilder, env: dict[str, str], negated: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """_if_count on x * burst/theta (on -x where ``negated``); emits the count times theta/burst."""
    count, states = _if_count(b, env, b.op("Mul", env["x"], _per_spike_value(b, env, "theta")), negated)
    return {"spikes": b.op("Mul", count, _spike_value(b, env, "theta"))}, states


IF_NEURON = SpikingOp(
    name="IFNeuron",
    summary=(
        "Integrate-and-fire neuron of STA (v0=0, soft reset): per step emits k*theta/burst, k <= burst "
        "(burst spikes, rho = 1/burst); with signed=1 also negative spikes while the emitted total stays "
        ">= 0 (signed neuron with memory potential, Eq. 34). Emits the spike value; its states (membrane, net "
        "spikes emitted) count in units of theta/burst."
    ),
    inputs=("x",),
    params=("theta",),
    states=("v", "emitted"),
    outputs=("spikes",),
    attributes={"signed": 1, "burst": 2},
    step=_if_step,
    prologue=_if_prologue,
)


# ------------------------------------------------ X2X encoder (STA): IF neurons on x and on -x


def _x2x_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """relu(x) - relu(-x) in spikes, as the reference code encodes LayerNorm and attention outputs: one
    IFNeuron step on x (theta_pos), one on -x (theta_neg), their spike values subtracted."""
    positive, positive_states = _if_step(
        b, {**env, "theta": env["theta_pos"], "v": env["v_pos"], "emitted": env["emitted_pos"]}
    )
    negative, negative_states = _if_step(
        b, {**env, "theta": env["theta_neg"], "v": env["v_neg"], "emitted": env["emitted_neg"]}, negated=True
    )
    spikes = b.op("Sub", positive["spikes"], negative["spikes"])
    return (
        {"spikes": spikes},
        {
            "v_pos": positive_states["v"],
            "emitted_pos": positive_states["emitted"],
            "v_neg": negative_states["v"],
            "emitted_neg": negative_states["emitted"],
        },
    )


X2X_ENCODER = SpikingOp(
    name="X2XEncoder",
    summary=(
        "STA's X2X encoder: IFNeuron's step on x (threshold theta_pos) and on -x (theta_neg), the second's "
        "spike value subtracted from the first's, so signed inputs reach a weight product as spikes."
    ),
    inputs=("x",),
    params=("theta_pos", "theta_neg"),
    states=("v_pos", "emitted_pos", "v_neg", "emitted_neg"),
    outputs=("spikes",),
    attributes={"signed": 1, "burst": 2},
    step=_x2x_step,
    prologue=_if_prologue,
)


# ------------------------------- universal group operator (STA, Def. 4), its hidden layer spiking


def _ugo_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """y = sum_j w2_j * IF_j(w1_j x + b1_j) + b2 per element, the N hidden units IF neurons as IFNeuron's
    step in units of their spike values: unit j's drive is x * (w1_j burst/theta_j) + b1_j burst/theta_j,
    its count weighs w2_j theta_j/burst. The hidden axis comes first, [N, *x.shape]: a stateful step then
    reads each hidden unit's states for a block of elements contiguously. The sum runs over j in order
    (CumSum's running sum, its last entry), which a kernel can repeat exactly; a MatMul's order is the
    library's."""
    ones = b.op(
        "ConstantOfShape",
        b.op("Shape", b.op("Shape", env["x"])),
        value=helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    )
    along_hidden = b.op("Concat", b.const([-1], np.int64), ones, axis=0)  # [N, 1, ..., 1]

    def per_unit(name: str, factor: str) -> str:
        return b.op("Reshape", b.op("Mul", env[name], factor), along_hidden)

    to_units = _per_spike_value(b, env, "theta")
    slope, offset = per_unit("w1", to_units), per_unit("b1", to_units)
    weight = per_unit("w2", _spike_value(b, env, "theta"))
    drive = b.op("Add", b.op("Mul", b.op("Unsqueeze", env["x"], b.const([0], np.int64)), slope), offset)
    count, states = _if_count(b, env, drive)
    running = b.op("CumSum", b.op("Mul", count, weight), b.const(0, np.int64))
    total = b.op("Gather", running, b.const(-1, np.int64), axis=0)
    return {"y": b.op("Add", total, env["b2"])}, states


UGO = SpikingOp(
    name="UGO",
    summary=(
        "STA's universal group operator with spiking hidden layer: per element, N IF neurons (IFNeuron's "
        "step, thresholds theta_j) on w1_j x + b1_j; emits sum_j w2_j * spikes_j + b2, in order of j. "
        "w1, b1, theta, w2 have N values; b2 one or one per channel; the states are [N, *x.shape]."
    ),
    inputs=("x",),
    params=("w1", "b1", "theta", "w2", "b2"),
    states=("v", "emitted"),
    outputs=("y",),
    attributes={"signed": 1, "burst": 2},
    step=_ugo_step,
    prologue=_if_prologue,
    hidden=("w1", "b1", "theta", "w2"),
)


# ---------------------------------- compensation: ECMT's expectation (Eq. 15), SpikeZIP's difference (Eq. 5)
# Attribute ``average`` picks the time semantics: 1 = mean semantics (ECMT: F sees running means, its
# outputs are turned into increments t*Y(t) - (t-1)*Y(t-1)); 0 = sum semantics (SpikeZIP-TF: F sees
# running sums, its outputs are differenced Y(t) - Y(t-1)). Both divide or multiply by w(t) = t or 1,
# and by 1 is no operation at all (x/1 and 1*x are x, bit for bit).


def _accumulated(b: NodeBuilder, total: str, t: Callable[[], str]) -> dict[str, str]:
    """The output of a running sum ``total`` at step(s) ``t()``: S(t)/t (average=1) or S(t). ``t`` builds
    the step(s) where the average reads them, so the sum's branch holds no node for them."""
    return {"mean": b.choose("average", lambda: b.op("Div", total, t()), lambda: total)}


def _accumulate_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    total = b.op("Add", env["sum"], env["x"])
    return _accumulated(b, total, lambda: env["t"]), {"sum": total}


def _accumulate_over_time(b: NodeBuilder, env: dict[str, str]) -> dict[str, str]:
    """CumSum's running sums start from the first input, which is the step's from -0 (-0 + x is x for
    every x; +0 + -0 is +0): unrolled, the sum of only -0 inputs stays -0 (the native kernel starts
    there too), where the Step form from its zero state gives +0, an equal value."""
    sums = b.op("CumSum", env["x"], b.const(0, np.int64))
    return _accumulated(b, sums, lambda: b.op("Reshape", env["t"], b.const([-1, 1, 1], np.int64)))


def _compensate_step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    weighted = b.choose("average", lambda: b.op("Mul", env["t"], env["y"]), lambda: env["y"])
    return {"out": b.op("Sub", weighted, env["previous"])}, {"previous": weighted}


EC_ACCUMULATE = SpikingOp(
    name="ECAccumulate",
    summary=(
        "Running mean S(t)/t (average=1, ECMT EC Eq. 15) or running sum S(t) (average=0, SpikeZIP-TF "
        "Eq. 5) of its input: what the compensated function F is evaluated on."
    ),
    inputs=("x",),
    params=(),
    states=("sum",),
    outputs=("mean",),
    attributes={"average": 1},
    step=_accumulate_step,
    specialized="average",
    over_time=_accumulate_over_time,
)

EC_COMPENSATE = SpikingOp(
    name="ECCompensate",
    summary=(
        "Turns F's output Y(t) on the accumulated input into this step's increment: t*Y(t) - (t-1)*Y(t-1) "
        "(average=1, ECMT Eq. 15: running mean of the increments = F of the running mean input) or "
        "Y(t) - Y(t-1) (average=0, SpikeZIP-TF Eq. 5: the increments sum to F of the summed input)."
    ),
    inputs=("y",),
    params=(),
    states=("previous",),
    outputs=("out",),
    attributes={"average": 1},
    step=_compensate_step,
    specialized="average",
)


# ------------------------------------------------------------------------ chains of ops as one op


def compose(first: SpikingOp, second: SpikingOp, scale: str | None = None) -> SpikingOp:
    """``second`` reading ``first``'s output (times ``first``'s parameter ``scale``, as a neuron's spike value
    is its code times theta_pos) as one op: one pass over the data instead of two or three, the same float
    operations in the same order, so the same bits. runtime/fusion.py puts them in place of the chains in
    a session's copy of a model; saved models keep the separate ops (reports read the tensors between)."""
    if first.hidden or second.hidden:
        raise ValueError(f"cannot compose {first.name} and {second.name}: states with a hidden axis")
    shared = (
        (set(first.states) & set(second.states))
        | (set(first.params) & set(second.params))
        | {a for a in set(first.attributes) & set(second.attributes) if first.attributes[a] != second.attributes[a]}
    )
    if first.spike_count and second.spike_count:
        shared.add(COUNT_OUTPUT)
    if shared:
        raise ValueError(f"cannot compose {first.name} and {second.name}: both use {sorted(shared)}")
    if first.specialized and second.specialized and first.specialized != second.specialized:
        raise ValueError(
            f"cannot compose {first.name} and {second.name}: specialized on {first.specialized} and {second.specialized}"
        )
    # An attribute both read (the compensations' ``average``) is one attribute of the composite: fusion
    # only joins nodes that agree on it.

    def prologue(b: NodeBuilder, env: dict[str, str]) -> dict[str, str]:
        return {**first.prologue(b, env), **second.prologue(b, env)}

    def step(b: NodeBuilder, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        first_outputs, states = first.step(b, env)
        value = first_outputs[first.outputs[0]]
        if scale is not None:
            value = b.op("Mul", value, env[scale])
        outputs, second_states = second.step(b, {**env, second.inputs[0]: value})
        counted = {COUNT_OUTPUT: first_outputs[COUNT_OUTPUT]} if first.spike_count else {}
        return {**outputs, **counted}, {**states, **second_states}

    return SpikingOp(
        name=f"{first.name}_{second.name}",
        summary=f"{first.name} then {second.name}"
        + (f" on its output times {scale}" if scale else "")
        + ", in one pass.",
        inputs=first.inputs,
        params=first.params + second.params,
        states=first.states + second.states,
        outputs=second.outputs,
        attributes={**first.attributes, **second.attributes},
        step=step,
        prologue=prologue,
        chain=(first.name, second.name),
        chain_scale=scale,
        spike_count=first.spike_count or second.spike_count,
        ternary=second.ternary,
        specialized=first.specialized or second.specialized,
    )


# The chains spiking graphs are made of: a compensated function's increments feeding a neuron (every
# method), and an ECMT or SpikeZIP-TF neuron's spike value accumulated for the compensated function or
# product it feeds (the neuron fed by a compensated function or not). Not an integer neuron's tracer
# (STBIFIntegerNeuron -> ECAccumulate): fused, the native loop no longer vectorizes and runs slower than
# the two ops apart. runtime/kernels/spikec_kernels.cc composes the same pairs.
_EC_MT = compose(EC_COMPENSATE, MT_NEURON)
_EC_STBIF = compose(EC_COMPENSATE, ST_BIF_NEURON)
COMPOSITES = (
    _EC_MT,
    _EC_STBIF,
    compose(EC_COMPENSATE, X2X_ENCODER),
    compose(MT_NEURON, EC_ACCUMULATE, scale="theta_pos"),
    compose(_EC_MT, EC_ACCUMULATE, scale="theta_pos"),
    compose(ST_BIF_NEURON, EC_ACCUMULATE, scale="theta"),
    compose(_EC_STBIF, EC_ACCUMULATE, scale="theta"),
)

OPS: dict[str, SpikingOp] = {
    op.name: op
    for op in (
        MT_NEURON,
        ST_BIF_NEURON,
        ST_BIF_INTEGER_NEURON,
        IF_NEURON,
        X2X_ENCODER,
        UGO,
        EC_ACCUMULATE,
        EC_COMPENSATE,
        *COMPOSITES,
    )
}


# ----------------------------------------------------------------- products of spikes and weights

SPIKE_MATMUL = "SpikeMatMul"
SPIKE_MATMUL_SUMMARY = (
    "MatMul(spikes, weight) where spikes holds spike codes, mostly 0 and the rest +-1, and weight is a "
    "[K, N] initializer. The same product; the native kernel adds or subtracts the weight rows of the "
    "nonzero codes only, so its cost follows the firing rate (sums in another order than MatMul's, "
    "and a zero code adds nothing even against an infinite weight). Where more than a threshold of "
    "the codes fire (float attribute dense_above, default: the kernel's cost model for [K, N]), the "
    "kernel runs MatMul itself."
)


def spike_matmul_function(opset: int) -> onnx.FunctionProto:
    """SpikeMatMul's portable body: the MatMul it stands for."""
    return helper.make_function(
        DOMAIN,
        SPIKE_MATMUL,
        ["spikes", "weight"],
        ["y"],
        [helper.make_node("MatMul", ["spikes", "weight"], ["y"])],
        [helper.make_opsetid("", opset)],
        attributes=["dense_above"],
        doc_string=SPIKE_MATMUL_SUMMARY,
    )


# ------------------------------------------------------------------------ function derivation


def _value_info(name: str, rank: int | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if rank is None else [None] * rank)


def _count_per_row(b: NodeBuilder, counts: str) -> str:
    """COUNT_OUTPUT: the step's per-element spike counts summed over every axis but the first."""
    rows = b.op(
        "Concat",
        b.op("Slice", b.op("Shape", counts), b.const([0], np.int64), b.const([1], np.int64)),
        b.const([-1], np.int64),
        axis=0,
    )
    return b.op("ReduceSum", b.op("Reshape", counts, rows), b.const([1], np.int64), keepdims=0)


def result_names(op: SpikingOp, step: bool) -> list[str]:
    """The outputs of either form, in order: the op's outputs, the next states (Step form), the count."""
    states = [out for _, out in op.state_names()] if step else []
    return [*op.outputs, *states, *([COUNT_OUTPUT] if op.spike_count else [])]


def _specialized(b: NodeBuilder, op: SpikingOp, build: Callable[[NodeBuilder], list[str]]) -> list[str]:
    """``build``'s results, built once for each value of the op's ``specialized`` attribute, in the
    branches of an If on it (see NodeBuilder.choose); built in ``b`` itself where the op has none."""
    attr = op.specialized
    if attr is None:
        return build(b)
    graphs = []
    for value in (1, 0):
        branch = b.nested(f"{attr}{value}_", **{attr: value})
        results = build(branch)
        names = [branch.fresh("result") for _ in results]
        _name_results(branch, results, names)
        graphs.append(helper.make_graph(branch.nodes, f"{op.name}_{branch.scope}", [], [_value_info(n) for n in names]))
    condition = b.op("Cast", b.attr_int(attr), to=TensorProto.BOOL)
    return b.op_outputs("If", condition, count=len(names), then_branch=graphs[0], else_branch=graphs[1])


def step_function(op: SpikingOp, opset: int) -> onnx.FunctionProto:
    b = NodeBuilder()
    env = {name: name for name in (*op.inputs, *op.states, *op.params, "t")}
    env.update(op.prologue(b, env))

    def build(b: NodeBuilder) -> list[str]:
        outputs, next_states = op.step(b, env)
        produced = [outputs[o] for o in op.outputs] + [next_states[s] for s in op.states]
        return produced + ([_count_per_row(b, outputs[COUNT_OUTPUT])] if op.spike_count else [])

    produced = _specialized(b, op, build)
    for src, dst in zip(produced, result_names(op, step=True)):
        b.nodes.append(helper.make_node("Identity", [src], [dst]))
    return helper.make_function(
        DOMAIN,
        op.step_name,
        [*op.inputs, *op.states, *op.params, "t"],
        result_names(op, step=True),
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(op.attributes),
    )


# Neuron updates (elements times hidden units) of one step of one block of elements of an op with a hidden
# axis (UGO), in the unrolled form. Its step body is a chain of elementwise nodes over [N, 1, elements],
# each a pass over its operands: in blocks small enough for these temporaries to stay in cache it runs
# several times faster, in blocks too small the Scan's per-iteration cost takes over. Blocks of elements,
# not of rows: a row of MiniLM's MLP (1536 channels x 32 units) is most of a block, and whole rows padded
# the last block by up to a block. Ops without a hidden axis gain nothing from blocks that pays for
# padding their input and cropping their output.
BLOCK_ELEMENTS = 2**16


def _ints(b: NodeBuilder, *values: int) -> str:
    return b.const(list(values), np.int64)


def unrolled_function(op: SpikingOp, opset: int) -> onnx.FunctionProto:
    """Scan the step over time (or run the op's over_time body). Inputs [T*B, ..., C] are viewed as
    [T, M, C] (C the last axis, so per-channel parameters broadcast); states are [M, C], or [N, M, C]
    for an op with a hidden axis.
    Elements are independent: for an op with a hidden axis an outer Scan takes them a block at a time
    ([T, M*C] zero-padded to [T, blocks, 1, elements per block], its other parameters broadcast to the
    input's elements and blocked alike), each block through all T steps."""
    b = NodeBuilder()
    env = {name: name for name in op.params}
    env.update(op.prologue(b, env))
    timesteps = b.attr_int("timesteps")
    steps = b.op("Unsqueeze", timesteps, _ints(b, 0))
    channels = b.op("Slice", b.op("Shape", op.inputs[0]), _ints(b, -1), _ints(b, 2**62))
    time_major = b.op("Concat", steps, _ints(b, -1), channels, axis=0)
    sequences = [b.op("Reshape", x, time_major) for x in op.inputs]
    one = b.const(1.0)
    times = b.op("Range", one, b.op("Add", b.op("Cast", timesteps, to=TensorProto.FLOAT), one), one)
    # per step: the outputs, and each element's spike count (summed per row once the Scans are done)
    per_step = [*op.outputs, *([COUNT_OUTPUT] if op.spike_count else [])]
    if op.over_time is not None:
        over_time = op.over_time
        sequence_env = {**env, **dict(zip(op.inputs, sequences)), "t": times}  # [T]: 1, 2, ..., T
        scanned = _specialized(b, op, lambda b: [over_time(b, sequence_env)[o] for o in per_step])
    else:
        scanned = _specialized(b, op, lambda b: _scanned(b, op, env, sequences, steps, times, per_step))
    original_shape = b.op("Shape", op.inputs[0])
    for name, seq in zip(op.outputs, scanned):
        b.nodes.append(helper.make_node("Reshape", [seq, original_shape], [name]))
    if op.spike_count:
        counts = b.op("Reshape", scanned[-1], original_shape)
        b.nodes.append(helper.make_node("Identity", [_count_per_row(b, counts)], [COUNT_OUTPUT]))
    return helper.make_function(
        DOMAIN,
        op.name,
        [*op.inputs, *op.params],
        result_names(op, step=False),
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=[*op.attributes, "timesteps"],
    )


def _scanned(
    b: NodeBuilder,
    op: SpikingOp,
    env: dict[str, str],
    sequences: list[str],
    steps: str,
    times: str,
    per_step: list[str],
) -> list[str]:
    """The unrolled function's per-step results stacked in time, [T, rows, C] ([T, elements] for an op
    with a hidden axis)."""
    if not op.hidden:
        return _time_scan(b, op, env, sequences, times, per_step)
    row = b.op("Slice", b.op("Shape", sequences[0]), _ints(b, 1), _ints(b, 3))
    elements = b.op("ReduceProd", row, keepdims=1)
    per_block = b.op("Max", b.op("Div", _ints(b, BLOCK_ELEMENTS), b.op("Shape", env[op.hidden[0]])), _ints(b, 1))
    blocks = b.op(
        "Max", b.op("Div", b.op("Add", elements, b.op("Sub", per_block, _ints(b, 1))), per_block), _ints(b, 1)
    )
    per_block = b.op("Div", b.op("Add", elements, b.op("Sub", blocks, _ints(b, 1))), blocks)
    padding = b.op("Sub", b.op("Mul", blocks, per_block), elements)
    block_shape = b.op("Concat", blocks, _ints(b, 1), per_block, axis=0)

    def blocked(x: str, leading: list[str]) -> str:
        """x flattened past its leading axes, zero-padded, viewed as [*leading, blocks, 1, per_block]."""
        flat = b.op("Reshape", x, b.op("Concat", *leading, _ints(b, -1), axis=0))
        pads = b.op("Concat", _ints(b, *[0] * (len(leading) + 1)), *[_ints(b, 0)] * len(leading), padding, axis=0)
        return b.op("Reshape", b.op("Pad", flat, pads), b.op("Concat", *leading, block_shape, axis=0))

    others = [p for p in op.params if p not in op.hidden]
    block_inputs = [blocked(x, [steps]) for x in sequences]
    block_inputs += [blocked(b.op("Expand", env[p], row), []) for p in others]
    block = b.nested("block_")
    block_env = {**env, **{p: f"{block.scope}{p}" for p in others}}
    scanned = _time_scan(block, op, block_env, [f"{block.scope}{x}" for x in op.inputs], times, per_step)
    for src, name in zip(scanned, per_step):
        block.nodes.append(helper.make_node("Identity", [src], [f"{block.scope}{name}_out"]))
    block_graph = helper.make_graph(
        block.nodes,
        f"{op.name}_block",
        [_value_info(f"{block.scope}{x}", 3) for x in op.inputs]
        + [_value_info(f"{block.scope}{p}", 2) for p in others],
        [_value_info(f"{block.scope}{name}_out", 3) for name in per_step],
    )
    results = b.op_outputs(
        "Scan",
        *block_inputs,
        count=len(per_step),
        body=block_graph,
        num_scan_inputs=len(block_inputs),
        scan_input_axes=[1] * len(op.inputs) + [0] * len(others),
        scan_output_axes=[1] * len(per_step),
    )
    return [
        b.op(
            "Slice",
            b.op("Reshape", r, b.op("Concat", steps, _ints(b, -1), axis=0)),
            _ints(b, 0),
            elements,
            _ints(b, 1),
        )
        for r in results
    ]


# Per-channel parameters of ops without a hidden axis are expanded to a step's [rows, C] before the
# Scan where C is below this: onnxruntime broadcasts [rows, C] against [C] one row of C values at a time,
# which for the digits ViT's 16-17 channel attention tensors costs over twice the same-shape op, while
# from a few hundred channels on the extra operand read costs more than the rows' overhead.
EXPAND_BELOW_CHANNELS = 128


def _time_scan(
    b: NodeBuilder, op: SpikingOp, env: dict[str, str], sequences: list[str], times: str, per_step: list[str]
) -> list[str]:
    """The Scan of the step over the time axis of ``sequences`` ([T, rows, C]), states from zero; returns
    the per-step outputs stacked ([T, rows, C]). What the step computes from parameters alone runs once,
    before the Scan."""
    row_shape = b.op("Slice", b.op("Shape", sequences[0]), _ints(b, 1), _ints(b, 2**62))
    body = _time_loop_body(b.nested("step_"), op, env, per_step)
    invariant, expanded = _hoist(body, {env[p] for p in op.params}, set(env.values()))
    b.nodes.extend(invariant)
    if not op.hidden:
        channels = b.op("Slice", row_shape, _ints(b, -1), _ints(b, 2**62))
        small = b.op("Less", channels, _ints(b, EXPAND_BELOW_CHANNELS))
        for name in expanded:
            # one value stays one value; [C] becomes [rows, C] for few channels, [1, C] else
            vector = b.op("And", small, b.op("Greater", b.op("Reshape", b.op("Size", name), _ints(b, 1)), _ints(b, 1)))
            target = b.op("Where", vector, row_shape, _ints(b, 1, 1))
            full = b.op("Expand", name, target)
            for node in body.node:
                node.input[:] = [full if i == name else i for i in node.input]
    else:
        row_shape = b.op("Concat", b.op("Shape", env[op.hidden[0]]), row_shape, axis=0)
    zeros = b.op("ConstantOfShape", row_shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    scanned = b.op_outputs(
        "Scan",
        *([zeros] * len(op.states)),
        *sequences,
        times,
        count=len(op.states) + len(per_step),
        body=body,
        num_scan_inputs=len(op.inputs) + 1,
    )
    return scanned[len(op.states) :]


def _hoist(body: onnx.GraphProto, params: set[str], outer: set[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """Moves the nodes of a Scan body that read only ``outer`` names (parameters and what the prologue
    derived) or constants out of it (onnxruntime folds them only where the parameters are initializers).
    Returns the moved nodes, and the outer tensors that depend on ``params`` and that the body reads."""
    invariant, per_channel = set(outer), set(params)
    moved, kept = [], []
    for node in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if all(i in invariant for i in node.input if i):
            moved.append(copy)
            invariant.update(node.output)
            if any(i in per_channel for i in node.input):
                per_channel.update(node.output)
        else:
            kept.append(copy)
    del body.node[:]
    body.node.extend(kept)
    return moved, list(dict.fromkeys(i for n in kept for i in n.input if i in per_channel))


def _name_results(b: NodeBuilder, sources: list[str], results: list[str]) -> None:
    """Gives each source tensor a result name: renames the node output where a node of ``b`` produces it
    (an Identity in a Scan body copies its tensor at every iteration), an Identity otherwise (a source that
    is an input, or the source of an earlier result)."""
    produced = {o for n in b.nodes for o in n.output}
    renamed: dict[str, str] = {}
    for src, dst in zip(sources, results):
        if src in produced and src not in renamed:
            renamed[src] = dst
        else:
            b.nodes.append(helper.make_node("Identity", [renamed.get(src, src)], [dst]))
    for node in b.nodes:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]


def _time_loop_body(body: NodeBuilder, op: SpikingOp, env: dict[str, str], per_step: list[str]) -> onnx.GraphProto:
    """The body of the Scan over time, built in ``body``: one step of a block, its states in and out."""
    states_in = [f"{body.scope}{s}_in" for s in op.states]
    inputs_in = [f"{body.scope}{x}_in" for x in op.inputs]
    time_in = f"{body.scope}t_in"
    body_env = {**env, **dict(zip(op.states, states_in)), **dict(zip(op.inputs, inputs_in)), "t": time_in}
    outputs, next_states = op.step(body, body_env)
    states_out = [f"{body.scope}{s}_out" for s in op.states]
    per_step_out = [f"{body.scope}{o}_out" for o in per_step]
    _name_results(body, [next_states[s] for s in op.states] + [outputs[o] for o in per_step], states_out + per_step_out)
    state_rank = 2 + op.state_rank_offset
    return helper.make_graph(
        body.nodes,
        f"{op.name}_step",
        [_value_info(n, state_rank) for n in states_in]
        + [_value_info(n, 2) for n in inputs_in]
        + [_value_info(time_in, 0)],
        [_value_info(n, state_rank) for n in states_out] + [_value_info(n, 2) for n in per_step_out],
    )


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset: the one its function bodies must declare."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def functions_for(op_types: set[str], opset: int) -> list[onnx.FunctionProto]:
    """The function bodies a model of this default-domain opset using these spikec op types must
    carry, in a stable order."""
    result = []
    for op in OPS.values():
        if op.name in op_types:
            result.append(unrolled_function(op, opset))
        if op.step_name in op_types:
            result.append(step_function(op, opset))
    if SPIKE_MATMUL in op_types:
        result.append(spike_matmul_function(opset))
    return result


def base_name(op_type: str) -> str:
    """The op behind a spikec op type: ``<Op>Step`` is the Step form of ``<Op>``."""
    return op_type[: -len("Step")] if op_type.endswith("Step") else op_type


def op_for(op_type: str) -> SpikingOp:
    """The spec behind a spikec op type, unrolled or step form."""
    return OPS[base_name(op_type)]
