"""Names that tie emitted models to the drivers that run them (documented in passes/emit.py)."""
TIME_INPUT = "spikec.t"
STATE_PREFIX = "spikec.state."
NEXT_STATE_PREFIX = "spikec.next_state."
STEPS_SUFFIX = ".steps"
SPIKES_OUTPUT = "spikec.spikes"  # sum-semantics models: spikes fired per sample at a step (T_eq from it)

# Node roles the readers of an emitted model recognize (graphinfo's node categories, the energy count),
# recorded in the node's name by the functions below where the node is made, and read by the predicates.
_SPIKE_VALUE = "/SpikeValue"  # a neuron's spikes x its threshold: still one event per spike
_TIME = "time/"  # the plumbing that runs the graph over time steps (emit.py), no part of the network


def spike_value_node(tensor: str) -> str:
    return tensor + _SPIKE_VALUE


def is_spike_value(node_name: str) -> bool:
    return node_name.endswith(_SPIKE_VALUE)


def time_node(name: str) -> str:
    return _TIME + name


def is_time_node(node_name: str) -> bool:
    return node_name.startswith(_TIME)
