"""Running spikec models: one call for users, and the driver for stateful (one step per run) models."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from spikec.runtime import fusion, weights
from spikec.runtime import native as native_kernels
from spikec.runtime.layout import NEXT_STATE_PREFIX, SPIKES_OUTPUT, STATE_PREFIX, STEPS_SUFFIX, TIME_INPUT
from spikec.runtime.metadata import MAX_TIMESTEPS, CompileReport, SpikecMetadata, model_label

from spikec.errors import SpikecError

# onnxruntime logs an error before it raises it: at FATAL only, the exception (which spikec turns into its
# one-line error) is all that reaches the terminal.
QUIET_LOG_SEVERITY = 4


def quiet_options() -> ort.SessionOptions:
    """Session options for every session spikec creates: onnxruntime's own log lines stay off the terminal."""
    options = ort.SessionOptions()
    options.log_severity_level = QUIET_LOG_SEVERITY
    return options


# onnxruntime's default logger, which sessions made with default options log through (onnx-graphsurgeon's
# constant folding makes such sessions), has a setter but no getter: spikec keeps the severity last set through
# set_default_log_severity, onnxruntime's own default (Warning) until then.
_default_log_severity = 2


def set_default_log_severity(severity: int) -> None:
    """Set onnxruntime's default logger severity (0 Verbose ... 4 Fatal), and restore it after spikec's quiet
    spells (``quiet_default_logger``); a process that sets it with onnxruntime's own setter gets Warning back."""
    global _default_log_severity
    ort.set_default_logger_severity(severity)
    _default_log_severity = severity


@contextmanager
def quiet_default_logger() -> Iterator[None]:
    """onnxruntime's default logger at Fatal for the sessions a library makes with default options, such as
    onnx-graphsurgeon's constant folding, whose optimizers warn for every shape Unsqueeze they fold."""
    ort.set_default_logger_severity(QUIET_LOG_SEVERITY)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_default_log_severity)


def check_timesteps(timesteps, argument: str = "timesteps") -> int:
    if (
        isinstance(timesteps, bool)
        or not isinstance(timesteps, (int, np.integer))
        or not 1 <= timesteps <= MAX_TIMESTEPS
    ):
        raise SpikecError(f"argument {argument}={timesteps!r}: expected an integer in 1..{MAX_TIMESTEPS}")
    return int(timesteps)


class InferenceSession(ort.InferenceSession):
    """An onnxruntime session for a spikec model (a path or ModelProto).

    The spikec ops travel inside the model as ONNX functions, so stock onnxruntime runs them. Where the
    native kernels are built (runtime/native.py), they run instead, unless ``native=False``. Chains of
    spikec ops run as one op each (runtime/fusion.py, same results) and, natively, products of ternary
    spike codes with weights as SpikeMatMuls (the same up to float rounding), unless ``fuse=False``.

    The native kernels are CPU kernels: onnxruntime inlines a function only where no execution provider
    has a kernel for it, so registering them would pin every spikec op of a GPU session to the CPU,
    with copies to and from the device around each. With any provider other than the CPU's in
    ``providers`` the session therefore runs the functions, which that provider can take (docs/gpu.md)."""

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        sess_options: ort.SessionOptions | None = None,
        providers=None,
        native: bool = True,
        fuse: bool = True,
        **kwargs,
    ):
        options = sess_options or quiet_options()
        providers = providers or ["CPUExecutionProvider"]
        device = next((name for name in map(_provider_name, providers) if name != "CPUExecutionProvider"), None)
        if (not native or device) and native_kernels.registered(options):
            reason = f"provider {device}" if device else "native=False"
            raise ValueError(f"{reason}, but these session options already carry the native (CPU) kernels")
        self.native = native and not device and native_kernels.register(options)
        if isinstance(model, onnx.ModelProto) and any(weights.external_tensors(model)):
            # references to external data (a compile's models, whose weights stay mapped): resolved
            # against the compile's source directory
            weights.session_options(options)
        source = _fused(model, self.native, options) if fuse else model
        source = source.SerializeToString() if isinstance(source, onnx.ModelProto) else os.fspath(source)
        # Once the portable functions are inlined, MatMulScaleFusion moves the MT neuron's Div by
        # theta_pos into the next MatMul; the re-rounded products flip spikes near level boundaries,
        # so the unrolled and stateful forms (fused differently) would stop agreeing.
        kwargs.setdefault("disabled_optimizers", ["MatMulScaleFusion"])
        super().__init__(source, options, providers=providers, **kwargs)
        props = self.get_modelmeta().custom_metadata_map
        # what messages name the model by: the session runs a fused copy, not the file
        self.label = model_label(model)
        self.spikec = SpikecMetadata.from_props(props, self.label)  # None for an ANN
        if self.spikec is not None:
            _say_path_once(self.native, native, device)

    @property
    def mode(self) -> str:
        return self.spikec.mode if self.spikec else "ann"

    @property
    def semantics(self) -> str:
        return self.spikec.semantics if self.spikec else "mean"

    @property
    def timesteps(self) -> int:
        return self.spikec.timesteps if self.spikec else 1

    @property
    def report(self) -> CompileReport:
        return self.spikec.report if self.spikec else CompileReport()

    def run(self, output_names, input_feed, run_options=None):
        """onnxruntime's run; a stateful model's time step must be 1, 2, ...: at t = 0 the running means
        divide by zero, and the model would answer NaN rather than fail."""
        if TIME_INPUT in input_feed:
            t = np.asarray(input_feed[TIME_INPUT], dtype=np.float64)
            if t.size != 1 or not np.isfinite(t).all() or t.item() < 1 or t.item() != np.floor(t.item()):
                raise SpikecError(
                    f"input '{TIME_INPUT}' = {t.tolist()}: the time step is 1-based, a whole "
                    f"number 1, 2, ... (run_stateful feeds it)"
                )
        return super().run(output_names, input_feed, run_options)

    def model_outputs(self) -> list[str]:
        """The user-facing outputs: no per-step copies, no neuron state."""
        return [
            o.name
            for o in self.get_outputs()
            if not o.name.endswith(STEPS_SUFFIX) and not o.name.startswith(NEXT_STATE_PREFIX)
        ]


_PATH_SAID = False


def _provider_name(provider: str | tuple[str, dict]) -> str:
    """onnxruntime takes a provider as its name or as (name, options)."""
    return provider if isinstance(provider, str) else provider[0]


def _say_path_once(native: bool, asked: bool, device: str | None = None) -> None:
    """Once per process, which path runs the spikec ops: the native kernels, or the several times slower
    ONNX functions and how to get the kernels. Logged (logger "spikec") and, for a person at a terminal,
    printed on stderr; a pipe or a log file stays as it is."""
    global _PATH_SAID
    if _PATH_SAID:
        return
    _PATH_SAID = True
    if native:
        message = (
            f"spikec ops run on the native kernels ({native_kernels.kernel_isa()}, {native_kernels.library_path()})"
        )
    elif device:
        message = f"spikec ops run as their ONNX functions, which {device} can take (the native kernels are CPU-only)"
    elif not asked:
        message = "spikec ops run as their ONNX functions (native=False)"
    else:
        message = (
            "spikec ops run as their ONNX functions, several times slower than the native kernels: none is "
            "built; reinstall spikec where a C++ compiler is available, or run `make native` in its source tree"
        )
    logging.getLogger("spikec").info(message)
    if sys.stderr.isatty():
        print(f"spikec: {message}", file=sys.stderr)


def _fused(
    model: str | os.PathLike | onnx.ModelProto, native: bool, options: ort.SessionOptions
) -> str | os.PathLike | onnx.ModelProto:
    """The model with its spikec chains fused and, natively, its products of spike codes as SpikeMatMuls
    where the kernel can beat MatMul (as a function SpikeMatMul is the MatMul: portably nothing to gain).
    A file with external data is fused as its graph with references: ``options`` then point onnxruntime
    to the file's directory, which maps the weights itself (no copy of them passes through protobuf)."""
    if not isinstance(model, onnx.ModelProto):
        try:
            proto = onnx.load(os.fspath(model), load_external_data=False)
        except Exception:
            return model  # onnxruntime reports what is wrong with the file
        fused = _fused(proto, native, options)
        if fused is proto:
            return model
        if any(weights.external_tensors(proto)):
            weights.session_options(options, Path(model).resolve().parent)
        return fused
    fused = fusion.fuse(model)
    return fusion.spike_matmuls(fused, native_kernels.spike_matmul_pays) if native else fused


class Stepper:
    """Drives a stateful model one time step per ``step()``, ``feeds`` presented at every step.

    The states stay onnxruntime values between steps, never numpy arrays. With the native kernels they
    are updated in place: each state tensor is bound as its step op's state input and as its next-state
    output, which the kernels allow (they read an element's states before writing them), so a step
    writes into tensors still in cache instead of fresh output buffers. The ONNX functions may write a next state before the last read of the old
    one (ECCompensate does), so portable sessions get fresh buffers."""

    def __init__(self, session: InferenceSession, feeds: Mapping[str, np.ndarray]):
        self.session = session
        self.binding = session.io_binding()
        inputs = [i.name for i in session.get_inputs() if i.name != TIME_INPUT and not i.name.startswith(STATE_PREFIX)]
        unknown = sorted(set(feeds) - set(inputs))
        if unknown:
            raise ValueError(f"input {unknown[0]!r}: not an input of the model (its inputs: {', '.join(inputs)})")
        self._feeds = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
        for name, value in self._feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.outputs = session.model_outputs()
        self.states = {
            i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros([1] * len(i.shape), np.float32))
            for i in session.get_inputs()
            if i.name.startswith(STATE_PREFIX)
        }
        self._time = np.zeros((), np.float32)  # bound by address once, updated in place
        self.binding.bind_cpu_input(TIME_INPUT, self._time)
        # From step 2 on, natively, every state is its own successor and every output is written into
        # the buffer of the step before: all bound once, so a step rebinds nothing and fetches no
        # OrtValues (0.6 ms of Python per digits ViT step with its 90 states, measured side by side).
        self._output_values: list[ort.OrtValue] | None = None
        self.t = 0

    def step(self) -> dict[str, np.ndarray]:
        """Runs step t + 1; returns the model outputs after it."""
        self.t += 1
        self._time[...] = self.t
        in_place = self.session.native and self.t > 1
        if not in_place or self._output_values is None:
            for name in self.outputs:
                self.binding.bind_output(name, "cpu")
            # at t = 1 the states are single zeros: their successors need buffers of the full shape
            for name, value in self.states.items():
                self.binding.bind_ortvalue_input(name, value)
                if in_place:
                    self.binding.bind_ortvalue_output(next_state_name(name), value)
                else:
                    self.binding.bind_output(next_state_name(name), "cpu")
        self.session.run_with_iobinding(self.binding)
        if in_place and self._output_values is not None:
            return {name: value.numpy().copy() for name, value in zip(self.outputs, self._output_values)}
        values = self.binding.get_outputs()  # in the order first bound: outputs, then next states
        self.states = dict(zip(self.states, values[len(self.outputs) :]))
        if in_place:
            self._output_values = values[: len(self.outputs)]
            for name, value in zip(self.outputs, self._output_values):
                self.binding.bind_ortvalue_output(name, value)
        # a copy: an output buffer bound again is overwritten by the next step
        return {name: value.numpy().copy() for name, value in zip(self.outputs, values)}

    def next_states(self) -> dict[str, np.ndarray]:
        """The states after the last step, under their ``spikec.next_state.*`` names."""
        return {next_state_name(name): value.numpy().copy() for name, value in self.states.items()}


def next_state_name(state: str) -> str:
    return NEXT_STATE_PREFIX + state[len(STATE_PREFIX) :]


def run_stateful(
    session: InferenceSession,
    feeds: Mapping[str, np.ndarray],
    timesteps: int,
    until_quiet: bool = False,
    keep_states: bool = False,
) -> dict[str, np.ndarray]:
    """Drive a stateful model for ``timesteps`` steps (a Stepper), presenting ``feeds`` at every step.

    Returns, per model output ``y``, ``y`` (after the last step) and ``y.steps`` ([T, B, ...], the output
    after every step): the same layout a time-unrolled model returns. With ``until_quiet`` (sum-semantics
    models, which output spike counts), stops early after the first step past the first at which no
    sample fired: the network is quiet from then on and its outputs final (dynamic T, capped by
    ``timesteps``). With ``keep_states``, the neuron/compensation states after the last step are returned
    too, under their ``spikec.next_state.*`` names."""
    check_timesteps(timesteps)
    if until_quiet and SPIKES_OUTPUT not in {o.name for o in session.get_outputs()}:
        raise ValueError(f"until_quiet: the model has no '{SPIKES_OUTPUT}' output (only sum-semantics models do)")
    stepper = Stepper(session, feeds)
    history: dict[str, list[np.ndarray]] = {name: [] for name in stepper.outputs}
    for t in range(1, timesteps + 1):
        for name, value in stepper.step().items():
            history[name].append(value)
        if until_quiet and t > 1 and not history[SPIKES_OUTPUT][-1].any():
            break
    result = {}
    for name, steps in history.items():
        if name != SPIKES_OUTPUT:  # a count per step: it has no value "after the last step"
            result[name] = steps[-1]
        result[name + STEPS_SUFFIX] = np.stack(steps)
    if keep_states:
        result.update(stepper.next_states())
    return result


def run(
    session: InferenceSession, feeds: Mapping[str, np.ndarray], timesteps: int | None = None, until_quiet: bool = False
) -> dict[str, np.ndarray]:
    """Run a spikec model of either mode (or a plain ANN) and return every user-facing output by name,
    with ``y.steps`` for spiking models."""
    if session.mode == "stateful":
        return run_stateful(session, feeds, timesteps or session.timesteps, until_quiet)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def equilibrium_steps(spikes_steps: np.ndarray) -> list[int | None]:
    """T_eq per sample from a sum-semantics model's ``spikec.spikes.steps`` [T, B]: the last step at which
    the sample fired (after it the sample is quiet for good), or None where it still fired at the last
    step run (T_eq not reached)."""
    counts = np.asarray(spikes_steps)
    result: list[int | None] = []
    for column in counts.reshape(counts.shape[0], -1).T:
        active = np.flatnonzero(column)
        if active.size and active[-1] == len(column) - 1:
            result.append(None)
        else:
            result.append(int(active[-1]) + 1 if active.size else 1)
    return result
