"""Least-squares refit of the QANN's weight products: PTQ's last step (passes/quantize.py places the quantizers).

A product x W + b (MatMul and Add, or Gemm: passes/quantize.Affine) reads its operand quantized, q(x'),
where x' is what the layers before it compute from their own quantized inputs. Its weights stay float, so
they can absorb part of that error: in graph order, each product's W and b become the ridge solution that
maps the QANN's operand q(x') to the float model's output x W + b over the calibration rows,

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

import functools
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from spikec.calibrate import position_mask, run_batches, token_axes
from spikec.passes.builder import export_like
from spikec.passes.quantize import Affine, affine_product
from spikec.runtime import weights

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
# every VALIDATION_STRIDE-th sample validates the choice of alpha
VALIDATION_STRIDE = 5


def held_back_samples(samples: int) -> np.ndarray:
    """Every VALIDATION_STRIDE-th of ``samples`` samples, as a mask: the data that the refit chooses its
    penalties on and fine-tuning its parameters by, and neither fits on."""
    return np.arange(samples) % VALIDATION_STRIDE == VALIDATION_STRIDE - 1


# A held-back gain at or below this fraction of the target's energy is rounding, not a better fit: the
# float32 targets carry errors some orders smaller, a quantizer's rounding error orders larger. Weights
# that would change for less stay as they are, bit for bit.
NOISE_FLOOR = 1e-10


@dataclass
class _Product:
    """A product x W (+ b) of the QANN whose W only it reads, refit with its bias where ``with_bias`` (the bias
    is then read by it alone; else W alone, against the float model's x W)."""

    affine: Affine
    with_bias: bool
    target: str  # the float model's x W + b, or x W

    def solution(self) -> np.ndarray:
        """[W; b] as float64, with b = 0 where it stays out of the fit (the ones column then does too)."""
        rows, columns = self.affine.shape
        solution = np.empty((rows + 1, columns))
        self.affine.matrix(out=solution[:-1])
        solution[-1] = self.affine.bias() if self.with_bias else 0.0
        return solution

    def fitted(self) -> slice:
        """The rows of [x, 1] that the fit uses."""
        return slice(None) if self.with_bias else slice(None, -1)

    def set(self, solution: np.ndarray) -> None:
        self.affine.set_matrix(solution[:-1])
        if self.with_bias:
            self.affine.set_bias(solution[-1])


# A product's columns are summed and refit in blocks of at most this many bytes per [operand + 1, columns]
# float64 array: a vocabulary-wide head has tens of thousands of columns, and a solve and its errors hold
# about six such arrays at once
_COLUMN_BLOCK_BYTES = 16 * 2**20


def _column_blocks(height: int, columns: int) -> list[slice]:
    """``columns`` in blocks of at most _COLUMN_BLOCK_BYTES per float64 array of ``height`` rows."""
    step = max(1, _COLUMN_BLOCK_BYTES // (8 * height))
    return [slice(start, start + step) for start in range(0, columns, step)]


@dataclass
class _Sums:
    """Sums over rows of [x, 1]^T [x, 1], and per reader of [x, 1]^T y and of y^2 per column."""

    gram: np.ndarray
    cross: list[np.ndarray]
    square: list[np.ndarray]

    @classmethod
    def zeros(cls, size: int, widths: list[int]) -> _Sums:
        return cls(
            np.zeros((size + 1, size + 1)), [np.zeros((size + 1, m)) for m in widths], [np.zeros(m) for m in widths]
        )

    def add(self, x: np.ndarray, targets: list[np.ndarray]) -> None:
        rows = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        self.gram += rows.T @ rows
        for i, y in enumerate(targets):
            for b in _column_blocks(max(rows.shape), y.shape[1]):
                block = y[:, b].astype(np.float64)
                self.cross[i][:, b] += rows.T @ block
                self.square[i][b] += np.square(block).sum(axis=0)

    def error(self, reader: int, solution: np.ndarray, columns: slice = slice(None)) -> float:
        """||[x, 1] solution - y||^2 over the rows summed, from the sums alone, for ``columns`` of y (those
        ``solution`` holds)."""
        return float(
            self.square[reader][columns].sum()
            - 2 * np.sum(solution * self.cross[reader][:, columns])
            + np.sum(solution * (self.gram @ solution))
        )


def _refit(product: _Product, fit: _Sums, validation: _Sums, reader: int) -> dict:
    """Refit ``product`` (reader ``reader`` of the sums) where a penalty lowers its held-back error; the entry
    of the report (errors relative to the target's energy)."""
    now, fitted = product.solution(), product.fitted()
    blocks = _column_blocks(*now.shape)

    def solved(sums: list[_Sums], alpha: float) -> Iterator[tuple[slice, np.ndarray]]:
        """The ridge solution of the rows ``sums`` hold together, block by block."""
        system, penalty = _penalized(functools.reduce(np.add, [part.gram for part in sums]), alpha, fitted)
        # one solve where the columns fit one block; else the system is inverted once for all blocks
        inverse = np.linalg.inv(system) if len(blocks) > 1 else None
        for b in blocks:
            cross = functools.reduce(np.add, [part.cross[reader][:, b] for part in sums])
            yield b, _ridge(system, penalty, cross, now[:, b], fitted, inverse)

    before = sum(validation.error(reader, now[:, b], b) for b in blocks)
    errors = {alpha: sum(validation.error(reader, x, b) for b, x in solved([fit], alpha)) for alpha in ALPHAS}
    alpha = min(errors, key=errors.__getitem__)
    energy = float(validation.square[reader].sum())
    entry: dict[str, Any] = {"target": product.target, "alpha": None, "error_before": before, "error_after": before}
    if before - errors[alpha] > NOISE_FLOOR * energy:
        # the chosen penalty, fit on all rows
        for b, solution in solved([fit, validation], alpha):
            now[:, b] = solution
        product.set(now)
        entry.update(alpha=alpha, error_after=errors[alpha])
    scale = max(energy, np.finfo(np.float64).tiny)
    entry.update(error_before=entry["error_before"] / scale, error_after=entry["error_after"] / scale)
    return entry


def _penalized(gram: np.ndarray, alpha: float, rows: slice) -> tuple[np.ndarray, float]:
    """The ridge system over ``rows`` of [x, 1] and its penalty, alpha x the operand's mean energy."""
    system = np.array(gram[rows, rows])
    penalty = alpha * np.trace(system) / len(system)
    system.flat[:: len(system) + 1] += penalty  # no identity matrix: an operand of 3072 channels makes it 75 MB
    return system, penalty


def _ridge(
    system: np.ndarray,
    penalty: float,
    cross: np.ndarray,
    current: np.ndarray,
    rows: slice,
    inverse: np.ndarray | None = None,
) -> np.ndarray:
    """The ridge solution over ``rows`` of [x, 1] (the others stay as in ``current``), pulled toward ``current``."""
    solution = current.copy()
    target = cross[rows] + penalty * current[rows]
    solution[rows] = np.linalg.solve(system, target) if inverse is None else inverse @ target
    return solution


def _products(graph: gs.Graph, float_products: Mapping[str, Affine]) -> dict[str, list[_Product]]:
    """The QANN's refittable products grouped by their operand tensor (q, k and v read one), in graph order;
    only those whose weight the float model reads the same way (by the weight's name), whose output there
    is the target."""
    groups: dict[str, list[_Product]] = {}
    for node in graph.nodes:
        affine = affine_product(node, 0)
        if affine is None or affine.weight.name not in float_products or len(affine.weight.outputs) != 1:
            continue
        if isinstance(node.inputs[0], gs.Constant):
            continue
        reference = float_products[affine.weight.name]
        bias = affine.bias_constant
        with_bias = bias is not None and len(bias.outputs) == 1 and reference.bias_at is not None
        target = reference.output if with_bias else reference.unbiased
        if target is not None and (with_bias or affine.unbiased is not None):
            groups.setdefault(node.inputs[0].name, []).append(_Product(affine, with_bias, target.name))
    return groups


def _float_products(graph: gs.Graph) -> dict[str, Affine]:
    """The float model's products x W (+ b) (Affine) by the name of W, where only that product reads W."""
    products = (affine_product(node, 0) for node in graph.nodes)
    return {p.weight.name: p for p in products if p is not None and len(p.weight.outputs) == 1}


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
    held_back = held_back_samples(samples)
    graph, float_graph = gs.import_onnx(qann), gs.import_onnx(ann)
    groups = _products(graph, _float_products(float_graph))
    if not groups or not held_back.any():
        return qann, []
    targets = [p.target for group in groups.values() for p in group]
    axes: dict[str, tuple[int, ...]] = {}
    unpadded = np.ones((samples, 1), bool)  # without a mask input every position counts
    if padding_mask is not None:
        axes = token_axes(ann, feeds, targets, padding_mask)
        unpadded = feeds[padding_mask] != 0
    counter = next(iter(feeds))  # a graph input fetched alongside counts a batch's samples, whatever the layout
    report = []
    for operand, group in tqdm(groups.items(), desc="refitting", unit="operand", disable=None if progress else True):
        size, _ = group[0].affine.shape
        widths = [p.affine.shape[1] for p in group]
        fit, validation = _Sums.zeros(size, widths), _Sums.zeros(size, widths)
        quantized = _operand_batches(_up_to(graph, qann, [operand]), feeds, operand, counter, batch_size)
        fetched = [p.target for p in group] + [counter]
        reference = run_batches(
            _up_to(float_graph, ann, fetched), feeds, fetched, batch_size=batch_size, progress=False
        )
        start = 0
        target_axes = axes.get(group[0].target)
        for x, f_batch in zip(quantized, reference, strict=True):
            stop = start + len(f_batch[counter])
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
        del quantized, reference  # their sessions hold what the cuts read: not needed to solve
        report += [_refit(product, fit, validation, i) for i, product in enumerate(group)]
    return export_like(graph, qann), report


def _operand_batches(
    cut: onnx.ModelProto, feeds: Mapping[str, np.ndarray], operand: str, counter: str, batch_size: int
) -> Iterator:
    """The QANN's ``operand`` batch by batch, from ``cut`` (``counter``, a graph input, fetched beside it to count
    the samples). Where the operand over all calibration rows takes fewer bytes than the cut's weights, all
    of it is fetched first and the session released, so that it and the float model's session (which holds
    about as many weights) are never open together; else the batches stream beside the float model's."""
    weight_bytes = sum(weights.nbytes_of(t) for t in cut.graph.initializer)
    batches = run_batches(cut, feeds, [operand, counter], batch_size=batch_size, progress=False)
    del cut
    first = next(batches)
    operand_bytes = first[operand].nbytes * len(feeds[counter]) / len(first[counter])
    values = (batch[operand] for batch in itertools.chain([first], batches))
    return iter(list(values)) if _store_operand(operand_bytes, weight_bytes) else values


def _store_operand(operand_bytes: float, weight_bytes: int) -> bool:
    return operand_bytes <= weight_bytes


def _up_to(graph: gs.Graph, source: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``graph`` (made from ``source``, whose opsets it keeps) computing only what ``outputs`` need, every input
    kept so the same feeds fit: onnxruntime runs every node of a session whatever it fetches, and the refit
    fetches one operand at a time. Cut before export, so only the weights the cut reads are copied (the
    copy of the graph shares its weights). A graph with subgraphs, whose outer-scope reads no node input
    lists, is exported whole."""
    if any(isinstance(v, gs.Graph) for node in graph.nodes for v in node.attrs.values()):
        cut = graph
    else:
        cut = graph.copy()
        tensors = cut.tensors()
        cut.outputs = [tensors[name] for name in outputs]
        cut.cleanup(remove_unused_graph_inputs=False)
    return export_like(cut, source)
