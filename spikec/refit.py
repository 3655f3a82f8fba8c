"""Least-squares refit of the QANN's weight products: PTQ's last step (passes/quantize.py places the quantizers).

A product MatMul(x, W) + b reads its operand quantized, q(x'), where x' is what the layers before it compute
from their own quantized inputs. Its weights stay float, so they can absorb part of that error: in graph
order, each product's W and b become the ridge solution that maps the QANN's operand q(x') to the float
model's output x W + b over the calibration rows,

    [W'; b'] = argmin ||[q(x'), 1] [W'; b'] - (x W + b)||^2 + lam ||[W'; b'] - [W; b]||^2,

which generalizes bias correction (its mean shift is the constant column's part) and, being sequential,
also takes up the drift the products before it leave. Where the channels of a quantized operand are
correlated, the others carry part of each channel's signal but not its rounding error, and the solution
averages part of that error out. Only weights and biases change: the QANN stays a QANN, and its SNN equals it.

The penalty pulls toward the current weights; its strength lam = alpha * tr(G) / n (G the operand's Gram
matrix, n its size) is chosen per product from ALPHAS by the error on every fifth calibration sample held
back from the fit, and a product keeps its weights where no alpha beats them there, so a small or
unrepresentative calibration set cannot make a product worse on data the fit did not see. Padded
positions that reach no output (calibrate.token_axes) are left out of both. Accumulating Gram
matrices batch by batch keeps memory at O(n^2) per product, whatever the number of calibration rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from spikec.calibrate import position_mask, run_batches, token_axes
from spikec.passes.builder import export_like

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
# every VALIDATION_STRIDE-th sample validates the choice of alpha
VALIDATION_STRIDE = 5


@dataclass
class _Product:
    """A MatMul(x, W) of the QANN with W [n, m] a constant that only it reads, and b [m] where an Add reads
    the product alone and adds it (None where the product's quantizer comes first)."""

    weight: gs.Constant
    bias: gs.Constant | None
    target: str  # the float model's x W (+ b: the Add's output there, where the QANN refits b too)

    def solution(self) -> np.ndarray:
        """[W; b] as float64, with b = 0 where there is none (the ones column then stays out of the fit)."""
        bias = np.zeros(self.weight.values.shape[1]) if self.bias is None else self.bias.values
        return np.vstack([self.weight.values, bias[None]]).astype(np.float64)

    def fitted(self) -> slice:
        """The rows of [x, 1] that the fit uses."""
        return slice(None) if self.bias is not None else slice(None, -1)


@dataclass
class _Sums:
    """Sums over rows of [x, 1]^T [x, 1], and per reader of [x, 1]^T y and y^T y."""

    gram: np.ndarray
    cross: list[np.ndarray]
    square: list[float]

    @classmethod
    def zeros(cls, size: int, widths: list[int]) -> _Sums:
        return cls(np.zeros((size + 1, size + 1)), [np.zeros((size + 1, m)) for m in widths], [0.0] * len(widths))

    def add(self, x: np.ndarray, targets: list[np.ndarray]) -> None:
        rows = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        self.gram += rows.T @ rows
        for i, y in enumerate(targets):
            self.cross[i] += rows.T @ y.astype(np.float64)
            self.square[i] += float(np.square(y, dtype=np.float64).sum())

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(
            self.gram + other.gram,
            [a + b for a, b in zip(self.cross, other.cross, strict=True)],
            [a + b for a, b in zip(self.square, other.square, strict=True)],
        )

    def error(self, reader: int, solution: np.ndarray) -> float:
        """||[x, 1] solution - y||^2 over the rows summed, from the sums alone."""
        return float(
            self.square[reader] - 2 * np.sum(solution * self.cross[reader]) + np.sum(solution * (self.gram @ solution))
        )


def _ridge(gram: np.ndarray, cross: np.ndarray, current: np.ndarray, alpha: float, rows: slice) -> np.ndarray:
    """The ridge solution over ``rows`` of [x, 1] (the others stay as in ``current``)."""
    gram, penalty_target = gram[rows, rows], current[rows]
    penalty = alpha * np.trace(gram) / len(gram)
    solution = current.copy()
    solution[rows] = np.linalg.solve(gram + penalty * np.eye(len(gram)), cross[rows] + penalty * penalty_target)
    return solution


def _products(graph: gs.Graph, float_targets: Mapping[str, tuple[str, str | None]]) -> dict[str, list[_Product]]:
    """The QANN's refittable products grouped by their operand tensor (q, k and v read one), in graph order;
    only those whose weight the float model reads the same way (by the weight's name), whose Add output
    there is the target."""
    groups: dict[str, list[_Product]] = {}
    for node in graph.nodes:
        if node.op != "MatMul":
            continue
        operand, weight = node.inputs
        if weight.name not in float_targets:
            continue
        if not isinstance(weight, gs.Constant) or weight.values.ndim != 2 or len(weight.outputs) != 1:
            continue
        if isinstance(operand, gs.Constant):
            continue
        add = node.outputs[0].outputs[0] if len(node.outputs[0].outputs) == 1 else None
        bias = next((t for t in add.inputs if isinstance(t, gs.Constant)), None) if add and add.op == "Add" else None
        if bias is not None and (bias.values.shape != (weight.values.shape[1],) or len(bias.outputs) != 1):
            bias = None
        product, biased = float_targets[weight.name]
        target = product if bias is None else biased
        if target is not None:  # else the QANN adds a bias where the float model's product has none
            groups.setdefault(operand.name, []).append(_Product(weight, bias, target))
    return groups


def _float_targets(ann: onnx.ModelProto) -> dict[str, tuple[str, str | None]]:
    """A MatMul's constant weight (by name, read by that MatMul alone) -> the product's output and the
    output of the Add that alone reads it (None if none does), in the float model."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in ann.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {i.name for i in ann.graph.initializer}
    targets = {}
    for node in ann.graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants and len(consumers[node.input[1]]) == 1:
            readers = consumers.get(node.output[0], [])
            biased = readers[0].output[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
            targets[node.input[1]] = (node.output[0], biased)
    return targets


def refit_products(
    qann: onnx.ModelProto,
    ann: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    padding_mask: str | None,
    batch_size: int,
    progress: bool,
) -> tuple[onnx.ModelProto, list[dict]]:
    """``qann`` with its products refit (module docstring), and per product considered: the target tensor,
    the alpha chosen (None: kept) and the validation error before and after, relative to the target's."""
    samples = len(next(iter(feeds.values())))
    held_back = np.arange(samples) % VALIDATION_STRIDE == VALIDATION_STRIDE - 1
    graph = gs.import_onnx(qann)
    groups = _products(graph, _float_targets(ann))
    if not groups or not held_back.any():
        return qann, []
    targets = [p.target for group in groups.values() for p in group]
    axes: dict[str, tuple[int, ...]] = {}
    unpadded = np.ones((samples, 1), bool)  # without a mask input every position counts
    if padding_mask is not None:
        axes = token_axes(ann, feeds, targets, padding_mask)
        unpadded = feeds[padding_mask] != 0
    counter = next(iter(feeds))
    report = []
    for operand, group in tqdm(groups.items(), desc="refitting", unit="operand", disable=None if progress else True):
        current = export_like(graph, qann)
        size = group[0].weight.values.shape[0]
        widths = [p.weight.values.shape[1] for p in group]
        fit, validation = _Sums.zeros(size, widths), _Sums.zeros(size, widths)
        quantized = run_batches(_up_to(current, [operand]), feeds, [operand], batch_size=batch_size, progress=False)
        # a graph input fetched alongside counts the batch's samples whatever the operand's layout
        fetched = [p.target for p in group] + [counter]
        reference = run_batches(_up_to(ann, fetched), feeds, fetched, batch_size=batch_size, progress=False)
        start = 0
        target_axes = axes.get(group[0].target)
        for q_batch, f_batch in zip(quantized, reference, strict=True):
            x, stop = q_batch[operand], start + len(f_batch[counter])
            y = f_batch[group[0].target]
            keep = True if target_axes is None else position_mask(unpadded[start:stop], target_axes, y.ndim)
            rows = np.broadcast_to(keep, y.shape)[..., 0]
            if x.shape[0] == stop - start:
                held_out = held_back[start:stop].reshape((-1,) + (1,) * (rows.ndim - 1))
            else:  # the samples are not on axis 0 (a sequence-first model): every fifth row instead
                held_out = (np.arange(rows.size) % VALIDATION_STRIDE == VALIDATION_STRIDE - 1).reshape(rows.shape)
            for held in (False, True):
                chosen = rows & (held_out == held)
                (validation if held else fit).add(x[chosen], [f_batch[p.target][chosen] for p in group])
            start = stop
        total = fit + validation
        for i, product in enumerate(group):
            now, fitted = product.solution(), product.fitted()
            before = validation.error(i, now)
            errors = {a: validation.error(i, _ridge(fit.gram, fit.cross[i], now, a, fitted)) for a in ALPHAS}
            alpha = min(errors, key=errors.__getitem__)
            entry = {"target": product.target, "alpha": None, "error_before": before, "error_after": before}
            if errors[alpha] < before:
                solution = _ridge(total.gram, total.cross[i], now, alpha, fitted)
                product.weight.values = solution[:-1].astype(product.weight.values.dtype)
                if product.bias is not None:
                    product.bias.values = solution[-1].astype(product.bias.values.dtype)
                entry.update(alpha=alpha, error_after=errors[alpha])
            scale = max(validation.square[i], np.finfo(np.float64).tiny)
            entry.update(error_before=entry["error_before"] / scale, error_after=entry["error_after"] / scale)
            report.append(entry)
    return export_like(graph, qann), report


def _up_to(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``model`` computing only what ``outputs`` need (every input kept, so the same feeds fit): onnxruntime
    runs every node of a session whatever it fetches, and the refit fetches one operand at a time. A model
    with subgraphs (whose outer-scope reads no node input lists) is left whole."""
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute
    ):
        return model
    needed, kept = set(outputs), []
    for node in reversed(model.graph.node):  # ONNX lists nodes in topological order
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    graph = onnx.helper.make_graph(
        list(reversed(kept)),
        model.graph.name,
        list(model.graph.input),
        [onnx.ValueInfoProto(name=name) for name in outputs],  # onnxruntime accepts outputs with no type
        [t for t in model.graph.initializer if t.name in needed],
        value_info=[v for v in model.graph.value_info if v.name in needed],
    )
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
