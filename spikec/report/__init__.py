"""`spikec report`: how well, and at what estimated energy, a spikec model reproduces its ANN, for every
method on one page layout.

The common part (spikec/report/build.py, energy.py, plots.py, page.py) runs the reference models and the
SNN side by side over the data (`spikec.probe`) and measures output fidelity (for every T of a stepped
model), the per-layer error of every tensor the SNN keeps by name, firing per spiking site and the one
energy model (energy.py: the same terms and counting rules for every method). Each method adds its own
section (``Method.report_section()``; spikec/report/<method>.py): ECMT's threshold levels, SpikeZIP-TF's
equilibrium steps against its quantized ANN, STA's burst spikes and UGOs, TTFS's spike times and clipping.
"""

from spikec.report.build import build_report
from spikec.report.page import check_directory, report_files, write_report

__all__ = ["build_report", "check_directory", "report_files", "write_report"]
