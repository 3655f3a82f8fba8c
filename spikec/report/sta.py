"""STA's report section: firing of the X2X encoders' IF neurons and of every UGO's hidden IF neurons,
burst usage (how often a neuron emits more than one spike in a step), which LayerNorms stayed float.

Neither op outputs its neurons' spikes: an X2X encoder emits their difference, a UGO the weighted sum
of its hidden spikes. The report runs a copy of the SNN with probes: IFNeuron ops (runtime/ops.py) fed
what the encoder's and the UGO's IF steps are fed (x and -x; w1_j x + b1_j), with the same thresholds
and attributes, so they fire exactly the same spikes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from spikec import graphinfo
from spikec.errors import SpikecError
from spikec.report import plots
from spikec.report.page import table
from spikec.report.section import Context, Section, site_row
from spikec.runtime import ops
from spikec.runtime.layout import UGO_EXP, UGO_INVERSE, ugo_role


@dataclass
class _Probe:
    """One X2X encoder (two IF neurons per element) or UGO (N hidden IF neurons per element), the probe
    nodes that fire its neurons' spikes, and what they fired."""

    node: onnx.NodeProto
    nodes: list[onnx.NodeProto]  # added to the report's copy of the SNN
    constants: list[onnx.TensorProto]
    outputs: list[str]  # IF spike values: on x and on -x, or the hidden layer [..., N]
    units: list[np.ndarray]  # theta / burst per output: the value of one spike
    burst: int
    spikes: list[int] = field(init=False)  # per output
    bursts: np.ndarray = field(init=False)  # neuron-steps by spikes emitted, 0..burst
    per_unit: np.ndarray = field(init=False)  # UGO: spikes per hidden unit (empty for an encoder)
    elements: int = 0  # input elements seen, all steps

    def __post_init__(self):
        self.spikes = [0] * len(self.outputs)
        self.bursts = np.zeros(self.burst + 1, np.int64)
        self.per_unit = np.zeros(self.units[0].size if self.ugo else 0, np.int64)

    @property
    def ugo(self) -> bool:
        return graphinfo.base_op(self.node) == "UGO"


def _probe(node: onnx.NodeProto, context: Context) -> _Probe:
    """IFNeuron ops fed what ``node``'s IF steps are fed, with its thresholds and attributes."""
    attrs = {a.name: a.i for a in node.attribute}
    prefix, nodes, constants = f"{node.name}/probe", [], []

    def neuron(x: str, threshold: str, suffix: str) -> str:
        out = f"{prefix}.{suffix}"
        nodes.append(
            helper.make_node("IFNeuron", [x, threshold], [out], f"{prefix}/{suffix}", domain=ops.DOMAIN, **attrs)
        )
        return out

    burst = np.float32(attrs["burst"])
    if graphinfo.base_op(node) == "UGO":  # the hidden axis last: the thresholds broadcast as per-channel ones
        x, w1, b1, theta = node.input[:4]
        axis, hidden, scaled, shifted = (f"{prefix}.{s}" for s in ("axis", "x", "w1x", "w1x_b1"))
        constants.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), axis))
        nodes += [
            helper.make_node("Unsqueeze", [x, axis], [hidden]),
            helper.make_node("Mul", [hidden, w1], [scaled]),
            helper.make_node("Add", [scaled, b1], [shifted]),
        ]
        outputs, thresholds = [neuron(shifted, theta, "hidden")], [theta]
    else:
        x, theta_pos, theta_neg = node.input[:3]
        nodes.append(helper.make_node("Neg", [x], [f"{prefix}.negated"]))
        outputs = [neuron(x, theta_pos, "positive"), neuron(f"{prefix}.negated", theta_neg, "negative")]
        thresholds = [theta_pos, theta_neg]
    units = [context.initializer(t).astype(np.float32) / burst for t in thresholds]
    for out, unit in zip(outputs, units, strict=True):
        _count(out, unit, attrs["burst"], hidden=graphinfo.base_op(node) == "UGO", nodes=nodes, constants=constants)
    return _Probe(node, nodes, constants, outputs, units, attrs["burst"])


def _count(out: str, unit: np.ndarray, burst: int, *, hidden: bool, nodes: list, constants: list) -> None:
    """Nodes that count ``out``'s spikes inside the run: k = round(|value| / unit) spikes per neuron and step
    (ops.IF_NEURON), summed (``.spikes``), by k = 0..burst (``.bursts``), per hidden unit (``.per_unit``) and
    the elements seen (``.size``). Fetching the spike values themselves would hold a UGO's T x N values per
    input element at once: hundreds of MB per sentence and UGO for MiniLM at T=64.

    A UGO's hidden layer is the largest tensor of an STA run (N values per element and step), so the count
    makes few passes over it. Sums run in float32 over the channel axis first, where onnxruntime reduces
    fastest and every partial sum (at most channels x burst) is an integer float32 holds exactly, then in
    float64 over the rest, exact for any count a run can reach (int64 reductions run many times slower).
    The histogram counts only the neuron-steps that fired, which Compress gathers in one pass (most fire
    nothing; bin 0 is what is left).
    """

    def const(suffix: str, value: np.ndarray) -> str:
        constants.append(onnx.numpy_helper.from_array(value, f"{out}.const.{suffix}"))
        return f"{out}.const.{suffix}"

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], f"{output}/{op}", **attrs))
        return output

    def total(x: str, name: str) -> str:
        return node("Reshape", [node("ReduceSum", [x], f"{name}.sum", keepdims=0), one], name)

    one = const("one", np.array([1], np.int64))
    k = node(
        "Round", [node("Abs", [node("Div", [out, const("unit", unit)], f"{out}.units")], f"{out}.abs")], f"{out}.k"
    )
    # float32 partial sums over channels, float64 over the rest: per hidden unit [N] for a UGO
    channels = node(
        "ReduceSum", [k, const("channels", np.array([-2 if hidden else -1], np.int64))], f"{out}.per_row", keepdims=0
    )
    partial = node("Cast", [channels], f"{out}.per_row64", to=onnx.TensorProto.DOUBLE)
    size = node("Cast", [node("Size", [out], f"{out}.size")], f"{out}.size64", to=onnx.TensorProto.DOUBLE)
    if hidden:
        rows = node("Reshape", [partial, const("rows", np.array([-1, unit.size], np.int64))], f"{out}.rows")
        per_unit = node("ReduceSum", [rows, const("axis0", np.array([0], np.int64))], f"{out}.per_unit", keepdims=0)
        node("ReduceSum", [per_unit], f"{out}.spikes", keepdims=0)
    else:
        node("ReduceSum", [partial], f"{out}.spikes", keepdims=0)
    fired = node(
        "Compress",
        [
            k,
            node(
                "Reshape",
                [
                    node("Greater", [k, const("zero", np.array(0, np.float32))], f"{out}.fires"),
                    const("flat", np.array([-1], np.int64)),
                ],
                f"{out}.fires_flat",
            ),
        ],
        f"{out}.fired",
    )
    counts = [
        total(
            node(
                "Cast",
                [node("Equal", [fired, const(f"k{j}", np.array(j, np.float32))], f"{out}.is{j}")],
                f"{out}.n{j}",
                to=onnx.TensorProto.DOUBLE,
            ),
            f"{out}.count{j}",
        )
        for j in range(1, burst + 1)
    ]
    silent = node(
        "Sub",
        [
            size,
            node(
                "Cast", [node("Size", [fired], f"{out}.fired_size")], f"{out}.fired_size64", to=onnx.TensorProto.DOUBLE
            ),
        ],
        f"{out}.silent",
    )
    node("Concat", [node("Reshape", [silent, one], f"{out}.count0"), *counts], f"{out}.bursts", axis=0)


def _plot_burst(data: dict) -> bytes:
    sites = data["sites"]
    burst = data["section"]["burst"]
    fig, axes = plots.figure(1, 1, (12, 4.8))
    ax = axes[0, 0]
    bottom = np.zeros(len(sites))
    for k in range(1, burst + 1):
        fired = np.array([sum(s["bursts"][1:]) or 1 for s in sites], np.float64)
        share = np.array([s["bursts"][k] for s in sites], np.float64) / fired
        ax.bar(np.arange(len(sites)), share, bottom=bottom, label=f"{k} spike{'s' if k > 1 else ''} in the step")
        bottom += share
    if sites:
        plots.site_ticks(ax, [f"{plots.short(s['site'], 30)} · {s['kind']}" for s in sites])
        ax.legend(fontsize=8)
    else:
        plots.empty(ax, "no X2X encoder or UGO")
    ax.set(
        title="burst usage: neuron-steps with a spike, by the number of spikes emitted",
        ylabel="fraction of firing neuron-steps",
    )
    return plots.png(fig)


def _plot_ugo(data: dict) -> bytes:
    ugos = data["section"]["ugos"]
    fig, axes = plots.figure(1, 1, (12, 4.5))
    ax = axes[0, 0]
    values = []
    for u in ugos:
        rates = u["spikes_per_unit_per_step"]
        ax.plot(np.arange(len(rates)), rates, "o-", ms=3, label=f"{plots.short(u['region'], 36)} ({u['operator']})")
        values += rates
    if ugos:
        plots.log_axis(ax, values)
        ax.legend(fontsize=7, ncol=2)
    else:
        plots.empty(ax, "no UGO (compiled with --no-ugo)")
    ax.set(title="firing of each UGO's hidden IF neurons", xlabel="hidden unit j", ylabel="spikes / neuron / step")
    return plots.png(fig)


class STASection(Section):
    title = "X2X encoders, UGOs and burst spikes (STA)"
    plots = (("burst", "burst usage per site", _plot_burst), ("ugo", "firing per UGO hidden unit", _plot_ugo))
    counts_per_step = False  # the probes count over all steps

    def __init__(self, context: Context):
        super().__init__(context)
        self.probes = [
            _probe(n, context)
            for n in context.snn.graph.node
            if n.domain == graphinfo.SPIKEC_DOMAIN and graphinfo.base_op(n) in ("X2XEncoder", "UGO")
        ]

    def model(self, snn: onnx.ModelProto) -> onnx.ModelProto:
        probed = onnx.ModelProto()
        probed.CopyFrom(snn)
        for probe in self.probes:
            probed.graph.node.extend(probe.nodes)
            probed.graph.initializer.extend(probe.constants)
        if self.probes and not any(f.name == "IFNeuron" for f in probed.functions):
            probed.functions.extend(ops.functions_for({"IFNeuron"}, ops.default_opset(snn)))
        return probed

    def tensors(self) -> list[str]:
        return [
            f"{o}.{count}"
            for p in self.probes
            for o in p.outputs
            for count in ("spikes", "bursts", "size", *(("per_unit",) if p.ugo else ()))
        ]

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        for probe in self.probes:
            for i, name in enumerate(probe.outputs):
                probe.spikes[i] += int(values[f"{name}.spikes"])
                probe.bursts += values[f"{name}.bursts"].astype(np.int64)
                if probe.ugo:
                    probe.per_unit += values[f"{name}.per_unit"].astype(np.int64)
            probe.elements += int(values[f"{probe.outputs[0]}.size"]) // (probe.per_unit.size if probe.ugo else 1)

    def _regions(self) -> dict[str, tuple[str, str]]:
        """UGO node -> (the region it stands in, the operator it approximates), from the compile report."""
        operators = {u["region"]: u["operator"] for u in self.context.record.report.ugos or []}
        result = {}
        for probe in (p for p in self.probes if p.ugo):
            role = ugo_role(probe.node.name)
            if role is None or role[0] not in operators:
                raise SpikecError(
                    f"UGO node {probe.node.name}: no UGO region of the compile report made it; the "
                    f"model was changed after spikec wrote it"
                )
            region, part = role
            # a softmax region has two UGOs, each its own operator
            result[probe.node.name] = (region, {UGO_EXP: "exp", UGO_INVERSE: "inverse"}.get(part, operators[region]))
        return result

    def sites(self) -> list[dict]:
        c = self.context
        regions = self._regions()
        rows = []
        for probe in self.probes:
            per_step_elements = probe.elements // (c.steps * c.samples)
            if probe.ugo:
                hidden = probe.per_unit.size
                rows.append(
                    site_row(
                        probe.node.input[0],
                        f"UGO {regions[probe.node.name][1]}",
                        probe.node.name,
                        probe.node.output[0],
                        hidden * per_step_elements,
                        probe.spikes[0],
                        c.samples,
                        c.steps,
                        hidden=hidden,
                        bursts=probe.bursts.tolist(),
                    )
                )
            else:
                rows.append(
                    site_row(
                        probe.node.input[0],
                        "X2XEncoder",
                        probe.node.name,
                        probe.node.output[0],
                        2 * per_step_elements,
                        sum(probe.spikes),
                        c.samples,
                        c.steps,
                        bursts=probe.bursts.tolist(),
                        split={"IF on x": probe.spikes[0] / c.samples, "IF on −x": probe.spikes[1] / c.samples},
                    )
                )
        return rows

    def finish(self) -> dict:
        c = self.context
        report = c.record.report
        regions = self._regions()
        ugos = [
            {
                "node": p.node.name,
                "region": regions[p.node.name][0],
                "operator": regions[p.node.name][1],
                "hidden": p.per_unit.size,
                "spikes_per_unit_per_step": (p.per_unit / (p.elements or 1)).tolist(),
            }
            for p in self.probes
            if p.ugo
        ]
        kept_float = set(report.layernorms_kept_float or [])
        decomposed = {u["region"] for u in report.ugos or [] if u["operator"] == "rsqrt"}
        layernorms = []
        for region in (r for r in report.regions or [] if r["kind"] == "layernorm"):
            if region["name"] in decomposed:
                status = "decomposed (appendix D.1): rsqrt UGO, TCSA products"
            elif region["name"] in kept_float:
                status = "float: its calibration variances span more than the rsqrt UGO's 100:1 domain"
            elif not c.record.options.get("ugo", True):
                status = "float: compiled with --no-ugo"
            else:
                status = "float: normalizes over more than the last axis"
            layernorms.append({"region": region["name"], "status": status, "float": region["name"] not in decomposed})
        return {"burst": int(c.record.options.get("burst", 1)), "ugos": ugos, "layernorms": layernorms}

    def energy_counts(self, sites: list[dict], products: list[dict], steps: int) -> dict[str, dict[str, float]]:
        counts = super().energy_counts(sites, products, steps)
        ugo_sites = [s for s in sites if s["kind"].startswith("UGO")]
        feeding = {p.get("source") for p in products if p["counted_as"] == "spike_products"}
        spikes = sum(s["spikes_per_sample"] for s in ugo_sites if s["source"] not in feeding)
        counts["ugo_inputs"] = {"MAC": steps * sum(s["neurons"] for s in ugo_sites)}
        counts["ugo_readout"] = {"AC": spikes}
        return counts

    @staticmethod
    def html(data: dict, img: Callable[..., str]) -> list[str]:
        s = data["section"]
        sites = data["sites"]
        fired = sum(sum(x["bursts"][1:]) for x in sites)
        multiple = sum(sum(x["bursts"][2:]) for x in sites)
        usage = f"{multiple / fired:.1%}" if fired else "none"
        floats = [n for n in s["layernorms"] if n["float"]]
        return [
            f"<p>Burst spikes (at most {s['burst']} per neuron and step, each of θ/{s['burst']}): of the "
            f"neuron-steps with a spike, {usage} emitted more than one. The spikes of the X2X encoders' IF "
            f"neurons (on x and on −x) and of the UGOs' hidden IF neurons are read from probes: IFNeuron ops fed "
            f"what those neurons are fed, with their thresholds.</p>",
            img("burst"),
            img("ugo"),
            "<details><summary>UGOs</summary>"
            + table(
                ["UGO node", "in place of", "operator", "hidden neurons N", "spikes / hidden neuron / step (mean)"],
                [
                    [u["node"], u["region"], u["operator"], u["hidden"], float(np.mean(u["spikes_per_unit_per_step"]))]
                    for u in s["ugos"]
                ],
            )
            + "</details>",
            f"<p>LayerNorms: {len(s['layernorms']) - len(floats)} of {len(s['layernorms'])} decomposed into "
            f"spiking operations; {len(floats)} stayed float (evaluated with expectation compensation).</p>",
            table(["LayerNorm", "conversion"], [[n["region"], n["status"]] for n in s["layernorms"]]),
        ]
