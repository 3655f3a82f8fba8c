"""Names that tie emitted models to the drivers that run them (documented in passes/emit.py)."""
TIME_INPUT = "spikec.t"
STATE_PREFIX = "spikec.state."
NEXT_STATE_PREFIX = "spikec.next_state."
STEPS_SUFFIX = ".steps"
SPIKES_OUTPUT = "spikec.spikes"  # sum-semantics models: spikes fired per sample at a step (T_eq from it)
