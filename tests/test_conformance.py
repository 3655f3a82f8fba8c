"""The CI tier of the conformance matrix (benchmarks/conformance.py; the whole matrix and its failure classes
are in docs/conformance.md): each cell, exported as its users export it and compiled with default flags,
must compile, run and meet its method's bound (FIDELITY).

Cells that fail today carry ``xfail(strict=True)`` naming their issue-18 class: when the fix of a class is
merged, its cells pass, strict xfail turns them into failures, and the marker comes off.
"""

import numpy as np
import pytest

from benchmarks import conformance

pytestmark = [pytest.mark.conformance, pytest.mark.slow]

# (arch, route, method) -> the open issue-18 class it fails by; empty while every CI cell passes
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}
CELLS = [(arch, route, method) for arch, route in conformance.CI_TIER for method in conformance.METHODS]


@pytest.mark.parametrize(
    ("arch", "route", "method"),
    [
        pytest.param(
            *cell,
            id="-".join(cell),
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[cell])] if cell in KNOWN_FAILURES else [],
        )
        for cell in CELLS
    ],
)
def test_cell_meets_its_bound(arch, route, method):
    cell = conformance.run_cell(arch, route, method)
    bound = conformance.FIDELITY[method].describe()
    assert cell["status"] == "pass", f"{cell['status']}: {cell['detail']} (measured {cell['value']}; {bound})"


def test_known_failures_are_ci_cells():
    # a stale entry (a cell renamed or dropped from the tier) would silently stop guarding anything
    assert set(KNOWN_FAILURES) <= set(CELLS)


def test_batchnorm_statistics_are_measured_before_export():
    # random init leaves running mean 0 / variance 1: MobileViT's BatchNorm stages then shrink its outputs to
    # exact zeros, and every cell of it measured nothing (cosine 0 for ECMT/STA, a vacuous TTFS error 0)
    import torch

    from examples import zoo

    arch = zoo.ARCHS["mobilevit"]
    model = zoo.build_model(arch)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(
        not m.training and not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in norms
    )
    feeds = {k: torch.from_numpy(v) for k, v in zoo.sample_inputs(arch, 2, zoo.EVALUATION_SEED).items()}
    with torch.no_grad():
        outputs = model(*feeds.values())
    assert all(float(o.abs().max()) > 1e-3 for o in outputs)


def test_an_ann_of_only_zeros_is_not_counted(monkeypatch):
    # a degenerate fixture is no finding about spikec: the cell says so instead of failing or passing it
    import spikec.evaluate

    monkeypatch.setattr(
        spikec.evaluate, "run_dataset", lambda model, feeds, **_: {"last_hidden_state": np.zeros((2, 3), np.float32)}
    )
    cell = conformance.run_cell("bert", "ts17", "ttfs", calibration_samples=2, evaluation_samples=2)
    assert (cell["status"], cell["detail"]) == ("ANN fails", "the ANN outputs only zeros")
    assert "ANN fails" in conformance.NOT_COUNTED
