"""Running models over datasets in batches, and fidelity of an SNN against its ANN per time step."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from tqdm import tqdm

from spikec.errors import SpikecError
from spikec.passes.loader import _one_line, check_input_file
from spikec.runtime import weights
from spikec.runtime.layout import NEXT_STATE_PREFIX, STEPS_SUFFIX
from spikec.runtime.metadata import SpikecMetadata, model_label
from spikec.runtime.session import InferenceSession, check_timesteps, equilibrium_steps, run, run_stateful


def _label(model: str | os.PathLike | onnx.ModelProto | InferenceSession) -> str:
    if isinstance(model, InferenceSession):
        return model.label
    return model_label(model)


def open_session(model: str | os.PathLike | onnx.ModelProto | InferenceSession) -> InferenceSession:
    """A session for a path or ModelProto; a file onnxruntime cannot load is a SpikecError naming it."""
    if isinstance(model, InferenceSession):
        return model
    label = _label(model)
    if not isinstance(model, onnx.ModelProto):
        check_input_file(model, f"model {label}")
    try:
        return InferenceSession(model)
    except SpikecError:
        raise
    except Exception as exc:  # onnxruntime's exception types share no base class below Exception
        raise SpikecError(f"model {label}: onnxruntime cannot load it ({_one_line(exc)})") from None


def float32_reference(path: str | os.PathLike, model: onnx.ModelProto) -> str | os.PathLike | onnx.ModelProto:
    """What to run as the ANN an SNN is measured against, ``model`` being the file ``path`` holds: the file,
    or where it is float16 or dynamically quantized, the float32 model compile converted and verified against
    (passes/dequantize.to_float32)."""
    from spikec.passes.dequantize import to_float32

    converted = to_float32(model)
    return path if converted is model else converted


def load_reference(model: str | os.PathLike) -> onnx.ModelProto:
    """The ANN file ``model``, checked as spikec loads models."""
    from spikec.passes.loader import load_model

    return load_model(check_input_file(model, f"model {_label(model)}"))


def open_reference(model: str | os.PathLike, loaded: onnx.ModelProto | None = None) -> InferenceSession:
    """A session of ``float32_reference`` of the ANN file ``model`` (``loaded``: what it holds, read already)."""
    return open_session(float32_reference(model, loaded if loaded is not None else load_reference(model)))


def check_source(
    snn: str | os.PathLike,
    record: SpikecMetadata | None,
    given: Sequence[tuple[str, str | os.PathLike, onnx.ModelProto]],
) -> dict[str, bool]:
    """For each (what, path, model) given as a model ``snn`` was made from, whether its weights are those its
    record names (the model compiled, or one the compile made, such as SpikeZIP-TF's QANN). A model that is
    not is warned of, once: every figure would then measure the SNN against another model. Empty where the
    record names none (an SNN of a spikec before the digests)."""
    if record is None or not record.report.source:
        return {}
    known = set(record.report.source.values())
    matches = {what: weights.digest(model) in known for what, _, model in given}
    for what, path, _ in given:
        if not matches[what]:
            warnings.warn(
                f"{what} {os.fspath(path)}: not the model {os.fspath(snn)} was made from (its weights match no "
                f"digest of the SNN's record): the figures measure the SNN against another model",
                stacklevel=2,
            )
    return matches


def _check_run_arguments(session: InferenceSession, label: str, batch_size, timesteps) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise SpikecError(f"argument batch_size={batch_size!r}: expected a positive integer")
    if timesteps is None:
        return
    check_timesteps(timesteps)
    if session.mode != "stateful" and timesteps != session.timesteps:
        raise SpikecError(
            f"argument timesteps={timesteps}: model {label} is {session.mode} with T={session.timesteps} "
            f"fixed; only a stateful model takes the number of steps at run time"
        )


def run_dataset(
    model: str | os.PathLike | onnx.ModelProto | InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 32,
    timesteps: int | None = None,
    until_quiet: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run any model (ANN or spikec, either mode) over all samples; ``y.steps`` outputs are [T, N, ...].

    ``until_quiet`` (stateful sum-semantics models) stops each batch once it is quiet; its steps are then
    padded to the longest batch's with the final values (which a quiet network keeps) and zero spikes."""
    session = open_session(model)
    _check_run_arguments(session, _label(model), batch_size, timesteps)
    if until_quiet and not (session.mode == "stateful" and session.semantics == "sum"):
        raise SpikecError(
            f"argument until_quiet: model {_label(model)} is not a stateful sum-semantics (spikezip) model"
        )
    wanted = {i.name for i in session.get_inputs() if not i.name.startswith("spikec.")}
    missing = wanted - set(feeds)
    if missing:
        raise SpikecError(f"inputs: missing model input(s) {', '.join(sorted(missing))}")
    count = len(next(iter(feeds.values())))
    static = _static_batch(session)
    batch_size = static or batch_size
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, count, batch_size)
    # disable=None lets tqdm stay quiet when stderr is not a terminal (logs, CI).
    for start in tqdm(starts, desc="running", disable=None if progress else True, leave=False):
        stop = min(start + batch_size, count)
        batch = {name: _padded(feeds[name][start:stop], static) for name in wanted}
        try:
            outputs = run(session, batch, timesteps, until_quiet)
        except SpikecError:
            raise
        except Exception as exc:  # see open_session
            raise SpikecError(
                f"model {_label(model)}: onnxruntime failed on samples {start}:{stop} ({_one_line(exc)})"
            ) from None
        for name, value in outputs.items():
            chunks.setdefault(name, []).append(_unpadded(name, value, stop - start, static))
    return {
        name: np.concatenate(
            _pad_steps(name, parts) if name.endswith(STEPS_SUFFIX) else parts,
            axis=1 if name.endswith(STEPS_SUFFIX) else 0,
        )
        for name, parts in chunks.items()
    }


def _static_batch(session: InferenceSession) -> int | None:
    """The batch size a model was exported with, where its user inputs fix one (they must agree)."""
    sizes = {
        i.shape[0]
        for i in session.get_inputs()
        if not i.name.startswith("spikec.") and i.shape and isinstance(i.shape[0], int)
    }
    if len(sizes) > 1:
        raise SpikecError(f"model {_label(session)}: inputs have different static batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _padded(values: np.ndarray, static: int | None) -> np.ndarray:
    """A short last batch of a static-batch model, filled up with copies of its last sample."""
    if static is None or len(values) == static:
        return values
    return np.concatenate([values, np.repeat(values[-1:], static - len(values), axis=0)])


def _unpadded(name: str, value: np.ndarray, samples: int, static: int | None) -> np.ndarray:
    if static is None or samples == static or value.ndim == 0:
        return value
    return value[:, :samples] if name.endswith(STEPS_SUFFIX) else value[:samples]


def _pad_steps(name: str, parts: list[np.ndarray]) -> list[np.ndarray]:
    longest = max(len(p) for p in parts)
    spikes = name.startswith("spikec.spikes")
    return [
        np.concatenate(
            [p, np.zeros_like(p[-1:]).repeat(longest - len(p), 0) if spikes else p[-1:].repeat(longest - len(p), 0)]
        )
        for p in parts
    ]


def _agreeing_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 rows (axis 0) of ``a`` and ``b`` with every entry that is not finite in both set to 0, and per
    row whether one of those entries disagrees: non-finite in one only, or different infinities. Entries
    holding the same non-finite value in both (an attention mask's -inf, NaN in both) agree."""
    a2, b2 = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    finite = np.isfinite(a2) & np.isfinite(b2)
    same = (a2 == b2) | (np.isnan(a2) & np.isnan(b2))
    return np.where(finite, a2, 0.0), np.where(finite, b2, 0.0), (~finite & ~same).any(axis=1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows (axis 0: the samples of an output, the tokens of a [tokens, features] tensor) of the
    cosine similarity of the flattened rows. Entries non-finite in both alike agree and count as zeros; a row
    zero in both (a padded token) is equal, 1; a row with a non-finite entry the other lacks, 0."""
    a2, b2, disagree = _agreeing_rows(a, b)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    both_zero = ~a2.any(axis=1) & ~b2.any(axis=1)
    rows = np.where(both_zero, 1.0, np.sum(a2 * b2, axis=1) / np.maximum(norms, 1e-30))
    return float(np.mean(np.where(disagree, 0.0, rows)))


def max_abs_error(reference: np.ndarray, estimate: np.ndarray) -> float:
    """The largest |estimate - reference| over the entries finite in both; inf where a non-finite entry
    disagrees (as in ``cosine``)."""
    reference, estimate, disagree = _agreeing_rows(reference, estimate)
    return np.inf if disagree.any() else float(np.max(np.abs(estimate - reference), initial=0.0))


def finite_scale(reference: np.ndarray) -> float:
    """The largest finite |reference|, 0 where there is none."""
    finite = np.abs(reference[np.isfinite(reference)])
    return float(np.max(finite, initial=0.0))


def measures(reference: np.ndarray, estimate: np.ndarray) -> dict:
    """Max abs error, relative max error (to the largest finite |reference|) and cosine."""
    error = max_abs_error(reference, estimate)
    return {
        "max_abs_error": error,
        "relative_max_error": error / (finite_scale(reference) or 1.0),
        "cosine": cosine(reference, estimate),
    }


def fidelity(reference: np.ndarray, steps: np.ndarray, labels: np.ndarray | None = None) -> list[dict]:
    """Per step t: ``measures``, and for [N, classes] outputs top-1 agreement with the reference (and
    accuracy when labels are given)."""
    classes = reference.shape[1] if reference.ndim == 2 and reference.shape[1] > 1 else None
    if labels is not None and classes is not None and len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        wrong = labels[(labels < 0) | (labels >= classes)][0]
        raise SpikecError(
            f"labels: class index {wrong} is not one of the output's {classes} classes (0..{classes - 1})"
        )
    rows = []
    for t, out in enumerate(steps, start=1):
        row = {"t": t, **measures(reference, out)}
        if classes is not None:
            row["top1_agreement"] = float(np.mean(out.argmax(1) == reference.argmax(1)))
            if labels is not None:
                row["accuracy"] = float(np.mean(out.argmax(1) == labels))
        rows.append(row)
    return rows


def check_labels(labels, count: int, source: str = "labels") -> np.ndarray:
    """Labels must be one integer class index per sample."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise SpikecError(
            f"{source}: expected {count} integer class indices (shape [{count}]), "
            f"got {labels.dtype} shape {list(labels.shape)}"
        )
    return labels


def compare(
    ann: str | os.PathLike,
    snn: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Fidelity of every SNN output against the ANN output of the same name, for every T."""
    # Open both first: a missing or non-spikec SNN fails before the ANN has run over the whole set.
    ann_model = load_reference(ann)
    ann_session, snn_session = open_reference(ann, ann_model), open_session(snn)
    if snn_session.mode == "ann":
        raise SpikecError(f"model {_label(snn)}: not a spikec model (no spikec metadata); compile it with spikec first")
    check_source(snn, snn_session.spikec, [("ANN", ann, ann_model)])
    if labels is not None:
        labels = check_labels(labels, len(next(iter(feeds.values()))))
    ann_out = run_dataset(ann_session, feeds, batch_size=batch_size, progress=progress)
    snn_out = run_dataset(snn_session, feeds, batch_size=batch_size, progress=progress)
    result: dict[str, dict[str, object]] = {}
    for name, reference in ann_out.items():
        if name + STEPS_SUFFIX in snn_out:
            steps = snn_out[name + STEPS_SUFFIX]
        elif snn_session.mode == "ttfs" and name in snn_out:
            steps = snn_out[name][None]  # one pass: a single "step"
        else:
            continue
        result[name] = {"per_t": fidelity(reference, steps, labels)}
        if labels is not None and reference.ndim == 2 and reference.shape[1] > 1:
            result[name]["ann_accuracy"] = float(np.mean(reference.argmax(1) == labels))
    if not result:
        raise SpikecError(f"{snn}: no output of the SNN matches an ANN output by name")
    return result


def quantizer_agreement(
    qann: str | os.PathLike | onnx.ModelProto,
    snn: str | os.PathLike | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    timesteps: int | None = None,
    boundary_tolerance: float = 1e-3,
) -> dict:
    """SpikeZIP-TF equivalence, neuron by neuron: run a *stateful* SpikeZIP-TF model until quiet (at most
    ``timesteps`` steps) and compare each ST-BIF+ neuron's spike tracer with the level the QANN's
    quantizer picks on the same inputs (clamp(round(x/s)) in float32, halves rounded as the QANN does:
    up for spikec's quantizer, to even for QuantizeLinear; ST-BIF+ rounds them up).

    Float rounding differs between the two (the SNN sums per-step increments), so a quantizer input
    within rounding error of a level boundary may round the other way, and the flip propagates. For each
    sample this finds the first neuron (in graph order) that disagrees, and whether every disagreement
    there sits within ``boundary_tolerance`` (in levels) of a boundary: such a sample is *explained*.
    Returns {"t_eq": [...], "exact": [bool per sample], "explained": [...], "neurons": [per neuron]}."""
    session = open_session(snn)
    if session.mode != "stateful" or session.semantics != "sum":
        raise SpikecError(f"model {_label(snn)}: expected a stateful SpikeZIP-TF model")
    neurons = session.report.neurons or []
    result = run_stateful(session, feeds, timesteps or session.timesteps, until_quiet=True, keep_states=True)
    qann_session = open_session(_with_outputs(qann, [n["tensor"] for n in neurons]))
    inputs = {i.name for i in qann_session.get_inputs()}
    values = qann_session.run([n["tensor"] for n in neurons], {k: v for k, v in feeds.items() if k in inputs})
    samples = len(next(iter(feeds.values())))
    first_bad: list[tuple[int, float] | None] = [None] * samples
    rows = []
    for index, (neuron, x) in enumerate(zip(neurons, values)):
        levels = np.broadcast_to(result[f"{NEXT_STATE_PREFIX}{neuron['node']}.tracer"], x.shape)
        # The level the QANN really picks, in its float32 arithmetic and its rounding rule.
        threshold = np.asarray(neuron["threshold"], np.float32)  # one value, or one per channel (last axis)
        scaled = x.astype(np.float32) / threshold
        rounded = np.rint(scaled) if neuron["rounding"] == "half_even" else np.floor(scaled + np.float32(0.5))
        want = np.clip(rounded, np.asarray(neuron["s_min"], np.float32), np.asarray(neuron["s_max"], np.float32))
        ratio = x.astype(np.float64) / threshold.astype(np.float64)
        bad = (levels != want).reshape(samples, -1)
        distance = np.abs(ratio - np.floor(ratio) - 0.5).reshape(samples, -1)
        for b in np.flatnonzero(bad.any(axis=1)):
            if first_bad[b] is None:
                first_bad[b] = (index, float(distance[b][bad[b]].max()))
        rows.append({"tensor": neuron["tensor"], "mismatched_values": int(bad.sum()), "values": int(bad.size)})
    spikes = result.get("spikec.spikes.steps")
    return {
        "t_eq": equilibrium_steps(spikes) if spikes is not None else [],
        "exact": [b is None for b in first_bad],
        "explained": [b is None or b[1] <= boundary_tolerance for b in first_bad],
        "first_mismatch": [
            None if b is None else {"neuron": neurons[b[0]]["tensor"], "boundary_distance": b[1]} for b in first_bad
        ],
        "neurons": rows,
        "outputs": {name: result[name] for name in session.model_outputs() if name in result},
    }


def _with_outputs(model: str | os.PathLike | onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = (
        onnx.load(os.fspath(model))
        if not isinstance(model, onnx.ModelProto)
        else onnx.ModelProto.FromString(model.SerializeToString())
    )
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_value_info(n, onnx.TypeProto()) for n in names if n not in present)
    return copy
