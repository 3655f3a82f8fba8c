"""The spikec op library: op definitions (ops), and sessions that run spikec models (session)."""

from spikec.runtime.session import InferenceSession, Stepper, equilibrium_steps, run, run_stateful

__all__ = ["InferenceSession", "Stepper", "equilibrium_steps", "run", "run_stateful"]
