"""Writing the report: the PNG plots, ``report.json`` with every number plotted, and ``index.html`` with
the plots embedded as data URIs (it opens offline and can be moved on its own). The page is the same
for every method: summary, fidelity, per-layer error, firing, the method's section, energy, conversion."""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from spikec import methods, modelio
from spikec.errors import SpikecError
from spikec.probe import Estimate
from spikec.report import plots
from spikec.report.build import SCATTER_VALUES
from spikec.report.energy import ECMT_TABLE1, NOT_COUNTED, TTFSFORMER_RATIOS


def report_files(method: str) -> list[str]:
    """The files a report of a ``method`` model consists of."""
    return [*(f"{name}.png" for name, _, _ in _plots(method)), "report.json", "index.html"]


def check_directory(
    directory: str | os.PathLike, files: Sequence[str], reads: Sequence[modelio.Read] = (), force: bool = False
) -> Path:
    """The report directory, checked before any work: an existing directory or a new one in an existing
    directory. A report already there (any of ``files``) is replaced only with ``force``; each file is
    checked as every spikec output is (spikec.modelio: never an input, never a special file)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise SpikecError(f"output {out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise SpikecError(f"output {out}: directory {out.parent} does not exist")
    if out.is_dir():
        existing = [name for name in files if os.path.lexists(out / name)]
        if existing and not force:
            raise SpikecError(
                f"output {out}: already holds a report ({', '.join(existing)}); pass --force to "
                f"replace it, or choose another directory"
            )
        modelio.check_outputs([("report file", out / name) for name in files], reads)
    return out


def write_directory(directory: Path, files: Mapping[str, bytes | str], reads: Sequence[modelio.Read] = ()) -> None:
    """All of a report's files or none: a directory created here goes again when writing fails."""
    created = not directory.exists()
    try:
        if created:
            directory.mkdir()
        modelio.write([("report file", directory / name, content) for name, content in files.items()], reads)
    except OSError as exc:
        raise SpikecError(f"output {directory}: cannot create it ({exc.strerror or exc})") from None
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # empty: spikec.modelio leaves nothing behind
        raise


def _plots(method: str) -> list[tuple]:
    """Every plot of a report, (name, alt, function): the common ones, then the method's section's."""
    return [*plots.COMMON, *methods.get(method).report_section().plots]


def write_report(
    data: dict, directory: str | os.PathLike, reads: Sequence[modelio.Read] = (), force: bool = False
) -> Path:
    """Write the PNG plots, report.json and index.html into ``directory`` (created if missing)."""
    out = check_directory(directory, report_files(data["method"]), reads, force)
    drawn = {name: plot(data) for name, _, plot in _plots(data["method"])}
    write_directory(
        out,
        {
            **{f"{name}.png": png for name, png in drawn.items()},
            "report.json": json.dumps(data, indent=1),
            "index.html": render_html(data, drawn),
        },
        reads,
    )
    return out / "index.html"


def img(drawn: Mapping[str, bytes], name: str, alt: str) -> str:
    encoded = base64.b64encode(drawn[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" data-file="{name}.png">'


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    return f"<p class=note>{text}</p>"


_STYLE = """
body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} img{max-width:100%} code{background:#f4f4f4}
.note{color:#555;font-size:14px}
"""
# Any image that fails to decode is reported on the console (headless browsers log it).
_CHECK_IMAGES = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (im) { return !im.naturalWidth; });
  broken.forEach(function (im) { console.error("spikec report: image failed to load: " + im.dataset.file); });
  document.body.setAttribute("data-images-ok", broken.length ? "no" : "yes");
});
"""


def _fidelity_columns(data: dict) -> tuple[list[str], list[str]]:
    """(keys, headings) of a fidelity row: top-1 agreement only for classifier outputs ([batch, classes]),
    accuracy only with labels."""
    keys = ["cosine", "relative_max_error", "max_abs_error"]
    rows = [r for ref in data["fidelity"].values() for o in ref["outputs"].values() for r in o["per_t"]]
    keys += [k for k in ("top1_agreement", "accuracy") if any(k in r for r in rows)]
    headings = {
        "cosine": "cosine",
        "relative_max_error": "relative max error",
        "max_abs_error": "max abs error",
        "top1_agreement": "top-1 agreement",
        "accuracy": "SNN accuracy",
    }
    return keys, [headings[k] for k in keys]


def render_html(data: dict, drawn: Mapping[str, bytes]) -> str:
    section = methods.get(data["method"]).report_section()
    e = data["energy"]
    stepped = data["stepped"]
    when = f"T={data['timesteps']}" if stepped else "one pass (time-to-first-spike)"
    embed = {name: alt for name, alt, _ in _plots(data["method"])}

    def picture(name: str, alt: str | None = None) -> str:
        return img(drawn, name, alt or embed[name])

    references = ", ".join(
        f"{label} <code>{html.escape(ref['model'])}</code>" for label, ref in data["fidelity"].items()
    )
    sections = [
        f"<h1>spikec report: {html.escape(Path(data['snn']).name)}</h1>",
        f"<p>SNN <code>{html.escape(data['snn'])}</code>: method <b>{html.escape(data['method'])}</b> "
        f"({html.escape(data['paper'])}), {when}, options "
        f"<code>{html.escape(json.dumps(data['options']))}</code>; "
        f"measured against {references} on {data['samples']} samples.</p>",
        *(
            f"<p><b>Warning:</b> {html.escape(label)} <code>{html.escape(data['fidelity'][label]['model'])}</code> "
            f"is not the model the SNN was made from (its weights match no digest of the SNN's record): "
            f"every figure below measures the SNN against another model.</p>"
            for label, matches in data["source_check"].items()
            if not matches
        ),
    ]

    keys, headings = _fidelity_columns(data)
    with_accuracy = any("accuracy" in o for ref in data["fidelity"].values() for o in ref["outputs"].values())
    summary = [
        [label, name, *(o["per_t"][-1].get(k, "—") for k in keys), *([o.get("accuracy", "—")] if with_accuracy else [])]
        for label, ref in data["fidelity"].items()
        for name, o in ref["outputs"].items()
    ]
    sections += [
        f"<h2>Summary ({when})</h2>",
        table(["against", "output", *headings, *(["reference accuracy"] if with_accuracy else [])], summary),
        f"<p>Estimated energy per sample: ANN {e['ann']['energy_pj'] / 1e6:.3f} µJ, SNN "
        f"{e['snn']['energy_pj'] / 1e6:.3f} µJ: <b>E_SNN/E_ANN = {e['ratio']:.3f}</b> counting all "
        f"work spikec's SNN does; <b>{e['ratio_paper_convention']:.3f}</b> in the papers' convention "
        f"(details below).</p>",
    ]

    if stepped:
        rows = [
            [label, name, r["t"], *(r.get(k, "—") for k in keys)]
            for label, ref in data["fidelity"].items()
            for name, o in ref["outputs"].items()
            for r in o["per_t"]
        ]
        sections += [
            "<h2>Output fidelity vs T</h2>",
            picture("fidelity"),
            table(["against", "output", "T", *headings], rows),
        ]
    else:
        sections += [
            "<h2>Output fidelity</h2>",
            note(
                f"One pass: the SNN's output values against the {data['references'][0]}'s (up to "
                f"{SCATTER_VALUES} values per output, evenly spaced over the samples)."
            ),
            picture("fidelity"),
        ]
    sections.append(note(plots.LOG_NOTE))

    estimates = {
        Estimate.MEAN: "the running mean over T of its per-step values",
        Estimate.SUM: "the sum over T of its per-step values",
        Estimate.LAST: (
            "its last step (F of running means/sums inside compensation, or a time-invariant tensor, itself "
            "where it is computed once)"
        ),
        Estimate.OUTPUT: "the graph output itself (the rate readout)",
        Estimate.SINGLE: "the received (decoded) value itself",
    }
    used = dict.fromkeys(r["estimate"] for r in data["layers"])
    sections += [
        f"<h2>Per-layer error against the {data['layers_reference']} ({when})</h2>",
        note(
            "Every tensor of the reference that the SNN keeps by name. The SNN's estimate is "
            + "; ".join(f"<i>{k}</i>: {estimates[k]}" for k in used)
            + ". Relative max error = max |SNN − reference| / max finite |reference| over all samples; "
            "cosine = mean over the rows of axis 0 (samples, or tokens where an exporter flattened them), a "
            "row zero in both counting 1; entries non-finite in both alike (a mask's −inf) agree."
        ),
        picture("layers"),
        "<details><summary>all layers</summary>"
        + table(
            ["#", "tensor", "op", "SNN producer (category)", "estimate", "relative max error", "cosine"],
            [
                [
                    i,
                    r["tensor"],
                    r["op"],
                    f"{r['snn_producer']} ({r['category']})",
                    r["estimate"],
                    r["relative_max_error"],
                    r["cosine"],
                ]
                for i, r in enumerate(data["layers"])
            ],
        )
        + "</details>",
    ]
    if data["layers_skipped"]:
        sections.append(
            table(["skipped tensor", "reason"], [[s["tensor"], s["reason"]] for s in data["layers_skipped"]])
        )

    per, pers = ("step", "steps") if stepped else ("pass", "passes")
    sections += [
        "<h2>Firing per spiking site</h2>",
        note(
            f"Spikes per neuron per {per}: the spikes of each site over all {pers} and samples, divided by "
            f"neurons × {'T' if stepped else '1'} × samples. A spike is one event, as the energy model "
            f"counts it (below)."
        ),
        picture("firing"),
        "<details><summary>all sites</summary>"
        + table(
            ["site", "kind", "neurons / sample", f"spikes / neuron / {per}", "spikes / sample"],
            [
                [s["site"], s["kind"], s["neurons"], s["spikes_per_neuron_per_step"], s["spikes_per_sample"]]
                for s in data["sites"]
            ],
        )
        + "</details>",
    ]

    sections += [f"<h2>{html.escape(section.title)}</h2>", *section.html(data, picture)]
    sections += ["<h2>Estimated energy</h2>", picture("energy"), energy_text(data)]

    model = data["model"]
    if model:
        sections += [
            "<h2>Conversion</h2>",
            f"<p>{model['neuron_counts']['neuron_nodes']} neuron nodes.</p>",
            "<details><summary>rewritten regions</summary>"
            + table(
                ["region", "kind", "original ops", "spikec ops"],
                [
                    [r["region"], r["kind"], " ".join(r["original_ops"]), "; ".join(r["spikec_ops"])]
                    for r in model["rewrites"]
                ],
            )
            + "</details>",
            "<p>Ops outside the spikec op set, and why:</p>"
            + table(
                ["category", "nodes", "ops", "why"],
                [
                    [r["category"], r["nodes"], ", ".join(f"{k}×{v}" for k, v in r["ops"].items()), r["reason"]]
                    for r in model["float_ops"]
                ],
            ),
        ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>spikec report</title>"
        f"<style>{_STYLE}</style><script>{_CHECK_IMAGES}</script></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def energy_text(data: dict) -> str:
    e = data["energy"]
    t = data["timesteps"]
    rows = [
        [model.upper(), x["term"], x["ops"], x["acs"], x["macs"], x["energy_pj"] / 1e6, x["rule"]]
        for model in ("ann", "snn")
        for x in e[model]["terms"]
    ]
    paper_t = {arch: ratios[t] for arch, ratios in ECMT_TABLE1.items() if t in ratios}
    if paper_t:
        table1 = f"at T={t}: " + ", ".join(f"{arch} {r:.2f}" for arch, r in paper_t.items())
    else:
        table1 = "(no column for this T; T=4: " + ", ".join(f"{a} {r[4]:.2f}" for a, r in ECMT_TABLE1.items()) + ")"
    ttfs = ", ".join(f"{a} {r:.1%}" for a, r in TTFSFORMER_RATIOS.items())
    uncounted = (
        f"<p>Not counted (shape unknown): {html.escape(', '.join(e['uncounted']))}.</p>" if e["uncounted"] else ""
    )
    steps = f"over all T={t} steps" if data["stepped"] else "for its one pass"
    return (
        f"<p>One energy model for every method: E = MACs·E_MAC + ACs·E_AC with E_MAC = {e['e_mac_pj']} pJ and "
        f"E_AC = {e['e_ac_pj']} pJ (Horowitz 2014, as ECMT Eq. 30 and TTFSFormer Eq. 28), per sample {steps}. "
        "Operation counts come from shape inference with batch 1 and, for spike-driven work, from the spikes "
        "actually fired on these inputs. Every term is listed for every method, zero where it has none.</p>"
        + table(["model", "term", "ops", "ACs", "MACs", "µJ", "counted as"], rows)
        + note(NOT_COUNTED + " The ANN's own LayerNorm/GELU/Softmax count once per sample, as in ECMT's Table 3.")
        + f"<p><b>E_SNN/E_ANN = {e['ratio']:.3f}</b> with everything above. In the papers' convention (ECMT: "
        '"MACs_SNN estimated to be zero"; TTFSFormer Eq. 28: its operations as ACs against the ANN\'s MACs): '
        "the spike-driven ACs, the TTFS constructions' operations and activation × activation products of two "
        "spike trains evaluated event-driven as in ECMT Eq. 16 "
        f"({e['snn']['act_act_event_driven_acs']:.4g} ACs instead of float MACs on running means/sums), "
        f"every MAC term left out, ANN = products only: <b>{e['ratio_paper_convention']:.3f}</b>. For "
        f"comparison, ECMT's Table 1 (ImageNet-1k, n = 8) reports {table1}; the ratio grows about linearly "
        f"with T. TTFSFormer (TTFS coding, at most one spike per neuron) reports about 21% ({ttfs}).</p>" + uncounted
    )
