"""The conformance matrix: every architecture of examples/zoo.py, exported by every route, converted by
every method with default flags, run in onnxruntime and compared with its ANN (SpikeZIP-TF: with the
quantized ANN it converts).

A cell is (architecture, route, method). Each is compiled with calibration samples from the
architecture's input generator and evaluated on held-out samples of another seed; its outcome is one of
STATUSES, its fidelity measured as FIDELITY describes, with what stayed in floating point and its time.
Each cell (and each architecture's exports) runs in its own process with a timeout, so a crash or a hang
of one cannot stop the matrix.

    python benchmarks/conformance.py [--tier ci|full] [--only ARCH,...] [--routes R,...] [--methods M,...]
                                     [--jobs N] [--timeout S] [--json OUT] [--markdown OUT]

Exports are cached under SPIKEC_CACHE (examples/zoo.py); SPIKEC_OPTIMUM_PYTHON enables the optimum route.
The matrix goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import zoo  # noqa: E402

METHODS = ("ecmt", "spikezip", "sta", "ttfs")


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How a method's cell is judged: ``metric`` of the SNN against its reference must meet ``bound``."""

    timesteps: int | None  # T the SNN is compiled for (None: the method's default: ttfs has no time steps,
    # SpikeZIP-TF's and ECMT's are measured by the compile: the steps until no neuron fires plus a margin,
    # the fewest steps meeting ECMT's bound on the held-out calibration samples)
    metric: str
    bound: float
    higher_is_better: bool

    def meets(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def describe(self) -> str:
        at = f" at T={self.timesteps}" if self.timesteps else ""
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.bound:g}{at}"


# SpikeZIP-TF and ECMT run for the T their compile measured on the held-out calibration samples
# (spikec/equilibrium.py); a SpikeZIP-TF cell whose evaluation samples are not quiet by then is reported as such.
FIDELITY = {
    "ecmt": Fidelity(None, "cosine to the ANN (worst output)", 0.99, True),
    "sta": Fidelity(32, "cosine to the ANN (worst output)", 0.97, True),
    "ttfs": Fidelity(None, "max relative error to the ANN (worst output)", 1e-3, False),
    "spikezip": Fidelity(None, "max error to the integer QANN / its scale (worst output)", 0.0, False),
}

# Outcomes, in the order a cell goes through them. "exit 0" ones are compiles that returned an SNN that
# crashes, outputs NaN/Inf, or is wrong: the ones a user would not notice.
STATUSES = {
    "pass": "compiles, runs, meets the bound",
    "n/a": "the route does not apply to the architecture (not counted)",
    "export failed": "the route could not export the architecture (not counted against spikec)",
    "ANN fails": "the exported ANN does not run, outputs NaN/Inf or only zeros on the evaluation set (not counted)",
    "refused": "compile raised SpikecError (a one-line refusal)",
    "compiler crash": "compile raised another exception (a traceback)",
    "SNN crashes": "compile returned, the SNN does not run in onnxruntime (exit 0)",
    "non-finite": "compile returned, the SNN outputs NaN/Inf where the ANN does not (exit 0)",
    "below bound": "compile returned, the SNN runs but misses the bound (exit 0, silently wrong)",
    "timeout": "the cell ran past --timeout",
    "worker died": "the cell's process died (a signal, e.g. a segfault in onnxruntime)",
}
NOT_COUNTED = ("n/a", "export failed", "ANN fails")
EXIT0_BROKEN = ("SNN crashes", "non-finite")

# (architecture, route) pairs of the CI tier (a few minutes on 2 cores): an sdpa text encoder, a causal decoder
# with left padding, a ViT, an onnxruntime-optimized graph, a sequence-first torch encoder
CI_TIER = (("bert", "ts17"), ("gpt2", "ts17"), ("vit", "ts17"), ("bert", "ort-opt"), ("torch-encoder-seqfirst", "ts17"))
# products of two activations are converted (EC, TCSA, SESA) where the compile report lists them as nodes
_PRODUCTS = {"Mul", "MatMul", "Einsum", "Gemm"}


def tier_pairs(tier: str, only: Sequence[str] | None = None, routes: Sequence[str] | None = None):
    pairs = CI_TIER if tier == "ci" else tuple((a, r) for a in zoo.ARCHS for r in zoo.ROUTES)
    return [(a, r) for a, r in pairs if (not only or a in only) and (not routes or r in routes)]


# --------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _input_names(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def _all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(v)) for v in outputs.values() if np.issubdtype(v.dtype, np.floating))


def stayed_float(report: dict) -> dict[str, int]:
    """Ops a method has no spiking form for and evaluates in floating point: the compile report's units
    converted generically (one node between expectation compensations, not a recognized region; products
    of two activations excepted, which EC/TCSA/SESA convert), STA's LayerNorms kept float and activations
    kept exact (their UGO does not fit the site's inputs), and ttfs's
    float nodes (decoded, run in float, encoded)."""
    ops = Counter(
        unit["ops"][0]
        for unit in report.get("compensated", [])
        if unit["kind"] == "node" and unit["ops"][0] not in _PRODUCTS
    )
    ops.update({"LayerNorm (kept)": len(report.get("layernorms_kept_float", []))})
    ops.update({"activation (kept exact)": len(report.get("activations_kept_exact", []))})
    ops.update(node["op"] for node in report.get("ttfs", {}).get("float_nodes", []))
    return dict(sorted((op, n) for op, n in ops.items() if n))


def _spikezip_reference(qann_path: Path, held: dict, timesteps: int, outputs: dict) -> tuple[float, str]:
    """SpikeZIP-TF's fidelity: max error to the integer QANN (what integer-exact mode, the default, equals
    bit for bit once quiet) in units of its output scale."""
    import onnx
    from spikec.runtime import InferenceSession, equilibrium_steps

    from spikec.evaluate import run_dataset
    from spikec.methods.spikezip import integer_qann

    reference = run_dataset(InferenceSession(integer_qann(onnx.load(qann_path))), held)
    error = max(
        float(np.max(np.abs(outputs[n] - want)) / (float(np.max(np.abs(want))) or 1.0))
        for n, want in reference.items()
        if n in outputs
    )
    if None in equilibrium_steps(outputs["spikec.spikes.steps"]):
        return error, f"not quiet at T={timesteps}"
    equal = error <= FIDELITY["spikezip"].bound
    return error, "equal to the integer QANN" if equal else "differs from the integer QANN"


def run_cell(
    arch_name: str,
    route_name: str,
    method: str,
    *,
    calibration_samples: int = zoo.CALIBRATION_SAMPLES,
    evaluation_samples: int = zoo.EVALUATION_SAMPLES,
) -> dict:
    """Export (cached), compile with default flags, run and judge one cell; never raises for what the
    cell finds (its status says it)."""
    import spikec
    from spikec.errors import SpikecError
    from spikec.evaluate import cosine, run_dataset
    from spikec.graphinfo import metadata

    arch, route, check = zoo.ARCHS[arch_name], zoo.ROUTES[route_name], FIDELITY[method]
    cell = {
        "arch": arch_name,
        "route": route_name,
        "method": method,
        "status": None,
        "detail": "",
        "value": None,
        "stayed_float": {},
        "seconds": {},
    }
    started = time.perf_counter()

    def done(status: str, detail: str = "") -> dict:
        cell["status"], cell["detail"] = status, detail
        cell["seconds"]["total"] = round(time.perf_counter() - started, 2)
        return cell

    try:
        path = zoo.export(arch, route)
        names = _input_names(path)
        calibration = zoo.feeds_for(arch, names, calibration_samples, zoo.CALIBRATION_SEED)
        held = zoo.feeds_for(arch, names, evaluation_samples, zoo.EVALUATION_SEED)
    except zoo.ExportFailed as exc:
        reason = str(exc)
        return done("n/a" if reason.startswith("not applicable") else "export failed", reason)
    cell["seconds"]["export"] = round(time.perf_counter() - started, 2)
    try:
        ann = run_dataset(str(path), held)
    except Exception as exc:  # noqa: BLE001 - whatever onnxruntime raises is the finding
        return done("ANN fails", _one_line(exc))
    if not _all_finite(ann):
        return done("ANN fails", "the ANN outputs NaN/Inf")
    if not any(np.any(v) for v in ann.values()):
        # every SNN would score cosine 0 (or a vacuous relative error 0) against it: nothing is measured
        return done("ANN fails", "the ANN outputs only zeros")
    with tempfile.TemporaryDirectory() as work:
        options = {"method": method, "progress": False}
        if check.timesteps:
            options["timesteps"] = check.timesteps
        qann_path = Path(work) / "qann.onnx"
        if method == "spikezip":
            options["save_qann"] = str(qann_path)
        tick = time.perf_counter()
        try:
            snn = spikec.compile(str(path), calibration, **options)
        except SpikecError as exc:
            return done("refused", _one_line(exc))
        except Exception as exc:  # noqa: BLE001
            return done("compiler crash", f"{type(exc).__name__}: {_one_line(exc)}")
        cell["seconds"]["compile"] = round(time.perf_counter() - tick, 2)
        cell["stayed_float"] = stayed_float(json.loads(metadata(snn).get("spikec.report", "{}")))
        cell["timesteps"] = int(metadata(snn)["spikec.timesteps"])  # SpikeZIP-TF's is measured by the compile
        tick = time.perf_counter()
        try:
            outputs = run_dataset(snn, held)
        except Exception as exc:  # noqa: BLE001
            return done("SNN crashes", _one_line(exc))
        cell["seconds"]["run"] = round(time.perf_counter() - tick, 2)
        if not _all_finite({n: outputs[n] for n in ann if n in outputs}):
            return done("non-finite", ", ".join(n for n in ann if n in outputs and not _all_finite({n: outputs[n]})))
        if method == "spikezip":
            try:
                value, note = _spikezip_reference(qann_path, held, cell["timesteps"], outputs)
            except Exception as exc:  # noqa: BLE001
                return done("SNN crashes", f"the integer QANN: {_one_line(exc)}")
        elif method == "ttfs":
            value = max(
                float(np.max(np.abs(outputs[n] - want)) / (float(np.max(np.abs(want))) or 1.0))
                for n, want in ann.items()
                if n in outputs
            )
            note = ""
        else:
            value, note = min(cosine(want, outputs[n]) for n, want in ann.items() if n in outputs), ""
    cell["value"] = value
    meets = note.startswith("equal") if method == "spikezip" else check.meets(value)
    return done("pass" if meets else "below bound", note)


# --------------------------------------------------------------------------
# Isolation: every task in its own process, with a timeout
# --------------------------------------------------------------------------


def _child(conn, function: Callable, args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", function(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which records it
        conn.send(("error", traceback.format_exc(limit=3)))
    finally:
        conn.close()


def _context():
    # A forkserver with the compiler and onnxruntime imported: each task forks from it (no re-import, no
    # torch in the server, so exporters' thread pools never leak into a fork).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["numpy", "onnx", "onnxruntime", "spikec.compiler", "spikec.evaluate", "examples.zoo"]
    )
    return context


@dataclasses.dataclass
class _Task:
    key: tuple
    function: Callable
    args: tuple
    kwargs: dict
    on_result: Callable[[tuple, str, object], None]


def run_isolated(tasks: Sequence[_Task], jobs: int, timeout: float) -> None:
    """Run ``tasks`` in up to ``jobs`` processes at once; each reports ("ok", value), ("error", traceback),
    ("timeout", None) or ("worker died", exit code) to its ``on_result``."""
    context = _context()
    pending, running = list(tasks), []
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(send, task.function, task.args, task.kwargs), daemon=True)
            process.start()
            send.close()
            running.append((task, process, receive, time.monotonic()))
        for entry in list(running):
            task, process, receive, begun = entry
            if receive.poll(0.05):
                try:
                    kind, value = receive.recv()
                    process.join()
                except EOFError:  # it died before sending
                    process.join()
                    kind, value = "worker died", process.exitcode
            elif not process.is_alive():
                process.join()
                kind, value = "worker died", process.exitcode
            elif time.monotonic() - begun > timeout:
                process.kill()
                process.join()
                kind, value = "timeout", None
            else:
                continue
            receive.close()
            running.remove(entry)
            task.on_result(task.key, kind, value)


def _export_all(arch_name: str, route_names: Sequence[str]) -> dict[str, str]:
    """Every route's export of one architecture (imports torch: run in its own process)."""
    result = {}
    for route in route_names:
        try:
            result[route] = str(zoo.export(zoo.ARCHS[arch_name], zoo.ROUTES[route]))
        except zoo.ExportFailed as exc:
            result[route] = f"export failed ({exc})"
    return result


def run_matrix(
    pairs: Sequence[tuple[str, str]],
    methods: Sequence[str],
    *,
    jobs: int = 1,
    timeout: float = 900,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    on_cells: Callable[[list[dict]], None] = lambda cells: None,
) -> list[dict]:
    """Every cell of ``pairs`` x ``methods``; ``on_cells`` gets the cells finished so far after each one."""
    by_arch: dict[str, list[str]] = {}
    for arch, route in pairs:
        by_arch.setdefault(arch, []).append(route)

    def exported(key, kind, value):
        log(
            f"exports {key[0]}: "
            + (
                ", ".join(f"{r} {'ok' if not v.startswith('export failed') else v}" for r, v in value.items())
                if kind == "ok"
                else f"{kind} {value}"
            )
        )

    run_isolated(
        [_Task((arch,), _export_all, (arch, routes), {}, exported) for arch, routes in by_arch.items()], jobs, timeout
    )
    cells: dict[tuple, dict] = {}

    def finished(key, kind, value):
        if kind == "ok":
            cell = value
        else:
            detail = (
                value.strip().splitlines()[-1]
                if kind == "error"
                else (f"exit code {value}" if kind == "worker died" else f"after {timeout:g} s")
            )
            cell = {
                "arch": key[0],
                "route": key[1],
                "method": key[2],
                "status": kind if kind != "error" else "compiler crash",
                "detail": detail,
                "value": None,
                "stayed_float": {},
                "seconds": {},
            }
        cells[key] = cell
        log(
            f"[{len(cells)}/{len(tasks)}] {key[0]} {key[1]} {key[2]}: {short(cell)}"
            + (f"  ({cell['detail'][:160]})" if cell["status"] != "pass" and cell["detail"] else "")
        )
        on_cells(list(cells.values()))

    tasks = [_Task((a, r, m), run_cell, (a, r, m), {}, finished) for a, r in pairs for m in methods]
    run_isolated(tasks, jobs, timeout)
    return [cells[t.key] for t in tasks]


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _value_text(cell: dict) -> str:
    value = cell["value"]
    if value is None:
        return ""
    if cell["method"] in ("ecmt", "sta"):
        return f"{value:.4f}"
    if cell["method"] == "spikezip" and cell["detail"].startswith("equal"):
        return "=QANN"
    return f"{value:.1e}"


def short(cell: dict) -> str:
    """The cell as one short table entry."""
    status = cell["status"]
    if status == "pass":
        return "ok " + _value_text(cell)
    if status == "below bound":
        return ("not quiet" if cell["detail"].startswith("not quiet") else "LOW ") + _value_text(cell)
    if status in ("refused", "compiler crash", "SNN crashes"):
        return f"{status.upper() if status != 'refused' else status}: {tag(cell['detail'])}"
    return {"n/a": "-", "export failed": "export failed", "non-finite": "NaN/Inf"}.get(status, status)


# A refusal's or crash's distinguishing words, for the table (the full message is in --json and the groups)
_TAGS = [
    (r"\bIsNaN\b", "IsNaN"),
    (r"com\.microsoft|SkipLayerNorm|BiasGelu|FastGelu|EmbedLayerNorm|Attention\b", "com.microsoft op"),
    (r"log\(0\)|-inf|Log\b", "log(0)"),
    (r"static batch|batch grows", "time folding"),
    (r"memory", "memory"),
    (r"shape|Shape|broadcast", "shapes"),
    (r"[Ll]ayer[Nn]orm", "LayerNorm"),
    (r"nothing to quantize|no MatMul", "nothing to convert"),
    (r"\bWhere\b", "Where"),
    (r"\(([A-Z][A-Za-z]+)\)", None),
]


def tag(detail: str) -> str:
    for pattern, name in _TAGS:
        found = re.search(pattern, detail)
        if found:
            return name or found.group(1)
    return detail.split(":")[0][:24]


def signature(cell: dict) -> str:
    """A failure with node names, numbers and paths taken out: cells with the same signature fail the same
    way, which groups them into failure classes."""
    detail = cell["detail"]
    detail = re.sub(r"(?<![\w/])/?[\w.\-]+(/[\w.\-]*){2,}", "<node>", detail)
    detail = re.sub(r"'[^']*'", "'…'", detail)
    detail = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", detail)
    detail = re.sub(r"(<node> \(\w+\)(, )?)+", "<nodes>", detail)
    return f"{cell['method']} {cell['status']}: {detail[:220]}"


def summary(cells: Sequence[dict]) -> dict:
    counted = [c for c in cells if c["status"] not in NOT_COUNTED]
    compiled = [c for c in counted if c["status"] not in ("refused", "compiler crash", "timeout", "worker died")]
    ran = [c for c in compiled if c["status"] != "SNN crashes"]
    passed = [c for c in counted if c["status"] == "pass"]

    def share(part):
        return round(100 * len(part) / len(counted), 1) if counted else 0.0

    per_method = {
        m: {
            "cells": sum(c["method"] == m for c in counted),
            "pass": sum(c["method"] == m and c["status"] == "pass" for c in counted),
        }
        for m in METHODS
    }
    per_route = {
        r: {
            "cells": sum(c["route"] == r for c in counted),
            "pass": sum(c["route"] == r and c["status"] == "pass" for c in counted),
        }
        for r in dict.fromkeys(c["route"] for c in cells)
    }
    return {
        "cells": len(cells),
        "counted": len(counted),
        "per_route": per_route,
        "not_counted": dict(Counter(c["status"] for c in cells if c["status"] in NOT_COUNTED)),
        "compile_percent": share(compiled),
        "run_percent": share(ran),
        "pass_percent": share(passed),
        "exit0_crash_or_nonfinite": sum(c["status"] in EXIT0_BROKEN for c in counted),
        "exit0_below_bound": sum(c["status"] == "below bound" for c in counted),
        "statuses": dict(Counter(c["status"] for c in cells)),
        "per_method": per_method,
        "seconds": round(sum(c["seconds"].get("total", 0) for c in cells), 1),
    }


def matrix_markdown(cells: Sequence[dict], methods: Sequence[str]) -> str:
    rows = {}
    for cell in cells:
        rows.setdefault((cell["arch"], cell["route"]), {})[cell["method"]] = cell
    lines = [
        "| architecture | route | " + " | ".join(methods) + " | stayed float |",
        "|---|---|" + "---|" * len(methods) + "---|",
    ]
    for (arch, route), by_method in rows.items():
        floated = sorted({op for c in by_method.values() for op in c["stayed_float"]})
        lines.append(
            f"| {arch} | {route} | "
            + " | ".join(short(by_method[m]) if m in by_method else "" for m in methods)
            + f" | {', '.join(floated)} |"
        )
    return "\n".join(lines)


def summary_markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"Cells: {s['cells']}, counted {s['counted']} (not counted: "
        + (", ".join(f"{k} {v}" for k, v in s["not_counted"].items()) or "none")
        + ").",
        f"Compile: {s['compile_percent']} %, run: {s['run_percent']} %, meet the bound: {s['pass_percent']} %.",
        f"Exit 0 with a crashing or non-finite SNN: {s['exit0_crash_or_nonfinite']}; exit 0 below the bound: "
        f"{s['exit0_below_bound']}.",
        "Per method (pass / counted): "
        + ", ".join(f"{m} {v['pass']}/{v['cells']}" for m, v in s["per_method"].items() if v["cells"])
        + ".",
        "Per route (pass / counted): "
        + ", ".join(f"{r} {v['pass']}/{v['cells']}" for r, v in s.get("per_route", {}).items())
        + ".",
        "Bounds: " + "; ".join(f"{m}: {FIDELITY[m].describe()}" for m in result["methods"]) + ".",
    ]
    return "\n".join(lines)


def groups_markdown(cells: Sequence[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        if cell["status"] not in ("pass", "n/a"):
            groups.setdefault(signature(cell), []).append(cell)
    lines = []
    for sig, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        where = ", ".join(
            sorted(
                {
                    f"{c['arch']}/{c['route']}" + (f" ({_value_text(c)})" if c["value"] is not None else "")
                    for c in members
                }
            )
        )
        lines.append(f"- **{len(members)}** {sig}\n  - {where}")
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


def render(result: dict) -> str:
    return "\n\n".join(
        [
            matrix_markdown(result["cells"], result["methods"]),
            summary_markdown(result),
            "Failures by signature:\n\n" + groups_markdown(result["cells"]),
        ]
    )


def merge_runs(runs: Sequence[dict]) -> dict:
    """One result of several runs (routes run one by one, failing cells run again after a fix): a cell of
    a later run replaces the same cell of an earlier one."""
    if len(runs) == 1:
        return runs[0]
    cells = {(c["arch"], c["route"], c["method"]): c for run in runs for c in run["cells"]}
    methods = [m for m in METHODS if any(m in run["methods"] for run in runs)]
    result = {
        **runs[-1],
        "date": " to ".join(sorted({runs[0]["date"], runs[-1]["date"]})),
        "command": "; ".join(dict.fromkeys(run["command"] for run in runs)),
        "wall_seconds": sum(run["wall_seconds"] for run in runs),
        "methods": methods,
        "cells": list(cells.values()),
    }
    result["summary"] = summary(result["cells"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tier", choices=("ci", "full"), default="full")
    parser.add_argument("--only", help=f"comma-separated architectures ({', '.join(zoo.ARCHS)})")
    parser.add_argument("--routes", help=f"comma-separated routes ({', '.join(zoo.ROUTES)})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (processes)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    parser.add_argument("--json", help="write every cell and the summary here")
    parser.add_argument("--markdown", help="write the matrix, the summary and the failure groups here")
    parser.add_argument(
        "--render",
        metavar="JSON",
        nargs="+",
        help="run nothing: print (and --markdown) the report of earlier --json runs (later runs' "
        "cells replace earlier ones')",
    )
    args = parser.parse_args(argv)
    if args.render:
        result = merge_runs([json.loads(Path(path).read_text()) for path in args.render])
    else:
        methods = [m for m in args.methods.split(",") if m]
        only = args.only.split(",") if args.only else None
        routes = args.routes.split(",") if args.routes else None
        unknown = (
            sorted(set(methods) - set(METHODS))
            + sorted(set(only or ()) - set(zoo.ARCHS))
            + sorted(set(routes or ()) - set(zoo.ROUTES))
        )
        if unknown or args.jobs < 1:
            parser.error(f"unknown: {', '.join(unknown)}" if unknown else "--jobs must be >= 1")
        started = time.perf_counter()
        import onnxruntime
        import torch
        import transformers

        def result_of(cells: list[dict]) -> dict:
            return {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "onnxruntime": onnxruntime.__version__,
                },
                "command": " ".join(
                    ["python benchmarks/conformance.py", *(argv if argv is not None else sys.argv[1:])]
                ),
                "wall_seconds": round(time.perf_counter() - started),
                "methods": methods,
                "cells": cells,
                "summary": summary(cells),
            }

        def checkpoint(cells: list[dict]) -> None:
            # a run stopped before its end (a deadline, a crash of the driver) keeps the cells it finished
            if args.json:
                write_atomic(args.json, json.dumps(result_of(cells), indent=1))

        cells = run_matrix(
            tier_pairs(args.tier, only, routes), methods, jobs=args.jobs, timeout=args.timeout, on_cells=checkpoint
        )
        result = result_of(cells)
    report = render(result)
    print(report)
    if args.json and not args.render:
        write_atomic(args.json, json.dumps(result, indent=1))
    if args.markdown:
        write_atomic(
            args.markdown,
            f"Measured {result['date']} on {result['machine']} ({result['command']}, "
            f"{result['wall_seconds']} s).\n\n" + report + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
