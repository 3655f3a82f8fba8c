"""The CI tier of the conformance matrix (benchmarks/conformance.py; the whole matrix and its failure classes
are in docs/conformance.md): each cell, exported as its users export it and compiled with default flags,
must compile, run and meet its method's bound (FIDELITY).

Cells that fail today carry ``xfail(strict=True)`` naming their issue-18 class: when the fix of a class is
merged, its cells pass, strict xfail turns them into failures, and the marker comes off.
"""
import pytest

from benchmarks import conformance

pytestmark = [pytest.mark.conformance, pytest.mark.slow]

# (arch, route, method) -> the open issue-18 class it fails by; empty while every CI cell passes
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}
CELLS = [(arch, route, method) for arch, route in conformance.CI_TIER for method in conformance.METHODS]


@pytest.mark.parametrize(
    ("arch", "route", "method"),
    [pytest.param(*cell, id="-".join(cell),
                  marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[cell])] if cell in KNOWN_FAILURES
                  else []) for cell in CELLS])
def test_cell_meets_its_bound(arch, route, method):
    cell = conformance.run_cell(arch, route, method)
    bound = conformance.FIDELITY[method].describe()
    assert cell["status"] == "pass", f"{cell['status']}: {cell['detail']} (measured {cell['value']}; {bound})"


def test_known_failures_are_ci_cells():
    # a stale entry (a cell renamed or dropped from the tier) would silently stop guarding anything
    assert set(KNOWN_FAILURES) <= set(CELLS)
