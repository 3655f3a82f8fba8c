"""Names that tie emitted models to the drivers that run them (documented in passes/emit.py)."""

TIME_INPUT = "spikec.t"
STATE_PREFIX = "spikec.state."
NEXT_STATE_PREFIX = "spikec.next_state."
STEPS_SUFFIX = ".steps"
SPIKES_OUTPUT = "spikec.spikes"  # sum-semantics models: spikes fired per sample at a step (T_eq from it)

# Node roles the readers of an emitted model recognize (graphinfo's node categories, the energy count),
# recorded in the node's name by the functions below where the node is made, and read by the predicates.
_SPIKE_VALUE = "/SpikeValue"  # a neuron's spikes x its threshold: still one event per spike
# an integer-exact neuron's tracer (its spikes summed) as what a product reads: the tracer x its threshold,
# or the tracer shifted to uint8 for an integer product. A linear product of the tracer every step is the
# running sum of the products of the spikes: one event per spike as well.
_TRACER_VALUE = "/TracerValue"
_TRACER_VALUE_STEPS = ("", "Shift", "Uint8")
_INTEGER_PRODUCT = "/Integer"  # MatMulInteger standing for a MatMul of levels, named after it
_TIME = "time/"  # the plumbing that runs the graph over time steps (emit.py), no part of the network


def spike_value_node(tensor: str) -> str:
    return tensor + _SPIKE_VALUE


def is_spike_value(node_name: str) -> bool:
    return node_name.endswith(_SPIKE_VALUE)


def tracer_value_node(prefix: str, step: str = "") -> str:
    """The node of ``step`` ("" for tracer x theta, "Shift" and "Uint8" for an integer product's operand)."""
    if step not in _TRACER_VALUE_STEPS:
        raise ValueError(f"tracer value step {step!r}: one of {_TRACER_VALUE_STEPS}")
    return prefix + _TRACER_VALUE + step


def is_tracer_value(node_name: str) -> bool:
    return any(node_name.endswith(_TRACER_VALUE + step) for step in _TRACER_VALUE_STEPS)


def integer_product_node(product: str) -> str:
    return product + _INTEGER_PRODUCT


# STA's UGO nodes: the region a UGO stands in, and which of the region's UGOs it is (a softmax has two).
UGO_ACTIVATION, UGO_RSQRT, UGO_EXP, UGO_INVERSE = "UGO", "LayerNormUGO/UGO", "SoftmaxUGO/Exp", "SoftmaxUGO/Inverse"
_UGO_PARTS = (UGO_RSQRT, UGO_EXP, UGO_INVERSE, UGO_ACTIVATION)  # the longer first: UGO_RSQRT ends as UGO_ACTIVATION


def ugo_node(region: str, part: str) -> str:
    return f"{region}/{part}"


def ugo_role(node_name: str) -> tuple[str, str] | None:
    """(region, part) of a UGO node made by ugo_node; None for any other name."""
    part = next((p for p in _UGO_PARTS if node_name.endswith("/" + p)), None)
    return None if part is None else (node_name[: -len(part) - 1], part)


def time_node(name: str) -> str:
    return _TIME + name


def is_time_node(node_name: str) -> bool:
    return node_name.startswith(_TIME)
