"""spikec command line: compile, quantize, finetune, run, inspect, eval, report, ugo."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import warnings
from collections import Counter

import numpy as np

from spikec.errors import SpikecError
from spikec.modelio import TERMINATING_SIGNALS


def _input_shapes(specs: list[str] | None) -> dict[str, list[int | str]] | None:
    if not specs:
        return None
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        if not sep or not name or not dims:
            raise SpikecError(f"argument --input-shape {spec!r}: expected name=d0,d1,... (e.g. input_ids=batch,32)")
        shape: list[int | str] = []
        for dim in (d.strip() for d in dims.split(",")):
            if dim.lstrip("-").isdigit():
                shape.append(int(dim))
            elif re.fullmatch(r"[A-Za-z_][\w.]*", dim):
                shape.append(dim)  # a symbolic dim, such as batch
            else:
                raise SpikecError(
                    f"argument --input-shape {spec!r}: dim {dim!r} is neither an integer nor a name; dims are "
                    f"separated by commas (e.g. input_ids=batch,32)"
                )
        shapes[name] = shape
    return shapes


def _numbers(flag: str, spec: str, sep: str, kind: type) -> tuple:
    """``spec`` split at ``sep`` into numbers of ``kind`` (``--resize 224x224``, ``--mean 0.5,0.4,0.4``)."""
    try:
        return tuple(kind(part) for part in spec.split(sep))
    except ValueError:
        raise SpikecError(f"argument {flag} {spec!r}: expected {kind.__name__}s separated by {sep!r}") from None


def cmd_compile(args) -> int:
    from spikec.compiler import compile as compile_model
    from spikec.compiler import split_options
    from spikec.equilibrium import bound_line, equilibrium_line
    from spikec.passes.options import outputs_of
    from spikec.runtime.metadata import SpikecMetadata

    options = _compile_options(args)
    snn = compile_model(args.model, args.calib, args.output, input_shapes=_input_shapes(args.input_shape), **options)
    report = SpikecMetadata.read(snn).report
    if report.equilibrium:
        print(f"T={report.equilibrium['timesteps']}: {equilibrium_line(report.equilibrium)}")
    if report.timesteps_search:
        print(f"T={report.timesteps_search['timesteps']}: {bound_line(report.timesteps_search)}")
    verification = report.verification
    if verification:
        print(verification_line(verification))
    for extra in outputs_of(split_options(options)[1]):
        print(f"wrote {extra.path} ({extra.what})")
    print(f"wrote {args.output}")
    return 0


def verification_line(verification: dict) -> str:
    """What compile measured on held-out calibration samples, per output, in one line."""
    samples = f"{verification['samples']} {'held-out ' if verification['held_out'] else ''}calibration sample" + (
        "s" if verification["samples"] != 1 else ""
    )

    def measured(outputs: dict) -> str:
        return "; ".join(
            f"{name} cosine {m['cosine']:.4f}, relative max error {m['relative_max_error']:.2e}"
            for name, m in outputs.items()
        )

    when = f" at T={verification['timesteps']}" if verification["timesteps"] else ""
    line = f"verified on {samples} against the {verification['reference']}{when}: {measured(verification['outputs'])}"
    against_input = verification.get("reference_against_input")
    if against_input:  # what making the reference from the input cost (SpikeZIP-TF: quantizing)
        line += f"; the {verification['reference']} against the input model: {measured(against_input)}"
    return line


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    """The compile command's flags, generated from CompileOptions and each method's Options: one
    declaration per option (spikec/passes/options.py). Flags default to absent, so that the options
    passed on are only those given, and a flag of another method can be refused."""
    from spikec.compiler import CompileOptions
    from spikec.methods import METHODS
    from spikec.passes.options import Options, flags_of, kind_of

    actions: dict[str, argparse.Action] = {}
    fields: dict[str, tuple[str, list[str]]] = {}  # option -> (its flag, the methods it belongs to; [] = all)
    groups: list[tuple[str, str | None, type[Options]]] = [("options of every method", None, CompileOptions)]
    groups += [(f"{m.name}: {m.paper}", m.name, m.Options) for m in METHODS.values()]
    for title, owner, options in groups:
        group = parser.add_argument_group(title)
        for f in options.declared():
            if f.name in actions:  # the same option in another method (levels): one flag, its help per method
                assert owner is not None, "the options of every method come first and are distinct"
                actions[f.name].help = (
                    (actions[f.name].help or "")
                    + f"; {owner}: {f.metadata['help']}"
                    + (f" [default {f.default}]" if f.default is not None else "")
                )
                fields[f.name][1].append(owner)
                continue
            kind = kind_of(options, f)
            default = (
                "on by default, the flag turns it off"
                if f.default is True
                else None
                if kind == "bool" or f.default in (None, ())
                else f"default {f.default}"
            )
            text = f.metadata["help"] + (f" [{default}]" if default else "")
            kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{owner}: {text}" if owner else text}
            if kind == "bool":
                kwargs["action"] = "store_false" if f.default else "store_true"
            else:
                kwargs.update(metavar=f.metadata.get("metavar"), type={"int": int, "float": float}.get(kind, str))
                if kind == "list":
                    kwargs["action"] = "append"
                if f.name == "method":
                    kwargs["choices"] = list(METHODS)
            actions[f.name] = group.add_argument(*flags_of(f), **kwargs)
            fields[f.name] = (flags_of(f)[0], [owner] if owner else [])
    parser.set_defaults(compile_fields=fields)


def _compile_options(args) -> dict:
    """The options given on the command line; a flag of another method than the chosen one is an error."""
    method = getattr(args, "method", "ecmt")
    options = {}
    for name, (flag, owners) in args.compile_fields.items():
        if not hasattr(args, name):
            continue
        if owners and method not in owners:
            raise SpikecError(f"argument {flag}: an option of method {' and '.join(owners)}, not of {method}")
        value = getattr(args, name)
        options[name] = tuple(o for spec in value for o in spec.split(",") if o) if isinstance(value, list) else value
    return options


def _quantize_options(args) -> dict:
    """What `quantize` and `finetune` (which quantizes first) take alike."""
    return {
        "levels": args.levels,
        "input_shapes": _input_shapes(args.input_shape),
        "batch_size": args.batch_size,
        "progress": not args.quiet,
        "per_tensor": args.per_tensor,
        "zero_points": args.zero_points,
        "refit": not args.no_refit,
    }


def cmd_quantize(args) -> int:
    from spikec.compiler import quantize
    from spikec.methods.spikezip import describe_quantization, recorded_quantization

    summary = recorded_quantization(quantize(args.model, args.calib, args.output, **_quantize_options(args)))
    assert summary is not None, "quantize_model records its summary in every QANN it makes"
    print(f"{describe_quantization(summary)}; wrote {args.output}")
    return 0


def cmd_finetune(args) -> int:
    from spikec.compiler import finetune
    from spikec.methods.spikezip import describe_quantization

    _, summary = finetune(
        args.model,
        args.calib,
        args.output,
        **_quantize_options(args),
        steps=args.steps,
        time_budget=args.time_budget,
        lr=args.lr,
        checkpoint=args.checkpoint,
        hidden_weight=args.hidden_weight,
        qdrop=args.qdrop,
    )
    kept = "" if summary["kept_step"] == summary["steps"] else f" (kept the parameters of step {summary['kept_step']})"
    print(
        f"{describe_quantization(summary['quantization'])}; distillation loss on {summary['measured_samples']} "
        f"{summary['measured_on']} samples {summary['loss_before']:.4g} -> {summary['loss_after']:.4g} after "
        f"{summary['steps']} steps{kept}; wrote {args.output}"
    )
    return 0


def cmd_calib_make(args) -> int:
    from spikec import calibdata, modelio

    files = [("text file", args.text)] if args.text else []
    reads = modelio.reads(models=[("input model", args.model)], files=files)
    modelio.check_outputs([("output", args.output)], reads)  # before the work, not after it
    if args.text:
        if args.tokenizer is None:
            raise SpikecError("argument --text: needs --tokenizer DIR (a saved Hugging Face tokenizer)")
        arrays = calibdata.from_text(
            args.model, args.text, args.tokenizer, max_length=args.max_length, progress=not args.quiet
        )
    elif args.images:
        arrays = calibdata.from_images(
            args.model,
            args.images,
            resize=args.resize and _numbers("--resize", args.resize, "x", int),
            resample=args.resample,
            scale=args.scale,
            mean=_numbers("--mean", args.mean, ",", float),
            std=_numbers("--std", args.std, ",", float),
            progress=not args.quiet,
        )
    else:
        arrays = calibdata.from_callable(args.model, args.python)
    modelio.write([("output", args.output, arrays)], reads)
    count = len(next(iter(arrays.values())))
    print(
        f"wrote {args.output}: {count} samples of "
        + ", ".join(f"{name} {value.dtype} {list(value.shape[1:])}" for name, value in arrays.items())
    )
    return 0


def cmd_run(args) -> int:
    from spikec import modelio
    from spikec.calibrate import load_inputs
    from spikec.evaluate import run_dataset

    reads = modelio.reads(models=[("input model", args.model)], files=[("--inputs file", args.inputs)])
    modelio.check_outputs([("output", args.output)], reads)  # before the run, not after it
    session = _session(args.model)
    feeds = load_inputs(args.inputs, _user_inputs(args.model), what="inputs")
    outputs = run_dataset(
        session,
        feeds,
        batch_size=args.batch_size,
        timesteps=args.timesteps,
        until_quiet=args.until_quiet,
        progress=not args.quiet,
    )
    modelio.write([("output", args.output, outputs)], reads)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    if SPIKES_STEPS in outputs:
        print(_equilibrium_line(outputs[SPIKES_STEPS]))
    return 0


SPIKES_STEPS = "spikec.spikes.steps"


def _equilibrium_line(spikes_steps: np.ndarray) -> str:
    from spikec.runtime import equilibrium_steps

    t_eq = equilibrium_steps(spikes_steps)
    reached = [t for t in t_eq if t is not None]
    line = f"T_eq (steps until no neuron fires): {len(reached)} of {len(t_eq)} samples quiet"
    if reached:
        line += f", max {max(reached)}, mean {np.mean(reached):.1f}"
    if len(reached) < len(t_eq):
        line += f"; {len(t_eq) - len(reached)} still firing at step {len(spikes_steps)}: raise --timesteps"
    return line


def _user_inputs(path: str):
    """The model to check --inputs against: a stateful model's spikec.* inputs (time step, neuron state)
    are fed by the driver, not by the user, so they are dropped from a weightless copy of its graph."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    driver = [i for i in model.graph.input if i.name.startswith("spikec.")]
    if not driver:
        return path
    for graph_input in driver:
        model.graph.input.remove(graph_input)
    return model


def _session(path: str):
    from spikec.evaluate import open_session

    return open_session(path)


def inspect_model(path: str) -> dict:
    from spikec.graphinfo import summarize
    from spikec.passes.loader import load_model
    from spikec.runtime.metadata import CompileReport, SpikecMetadata

    model = load_model(path)
    histogram = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    record = SpikecMetadata.read(model, path)
    report = record.report if record else CompileReport()
    return {
        "model": path,
        "method": record and record.method,
        "mode": record and record.mode,
        "timesteps": record and record.timesteps,
        "options": record.options if record else {},
        "ops": [{"domain": d, "op": o, "count": c} for (d, o), c in sorted(histogram.items())],
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "neurons": report.neurons or [],
        "compensated": report.compensated or [],
        "regions": report.regions or [],
        "verification": report.verification,
        # rewrites (original ops -> spikec ops), neuron counts per sample, ops left in float and why
        **(
            summarize(model)
            if record is None or record.mode != "ttfs"
            else {"ttfs": report.ttfs, "rewrites": [], "float_ops": [], "neuron_counts": {}}
        ),
    }


def _summary(values) -> str:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 1:
        return f"{array[0]:.4g}"
    return f"[{array.min():.3g} .. {array.max():.3g}] x{array.size}"


def _console():
    """A rich console at the terminal's width; into a file or a pipe (no terminal, no COLUMNS), wide enough
    that no cell is cut: node and tensor names are what one greps such output for."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=10_000)


def cmd_inspect(args) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    passes = "one pass (time-to-first-spike)" if info["mode"] == "ttfs" else f"T={info['timesteps']}"
    console.print(
        f"[bold]{info['model']}[/bold]  method={info['method'] or 'none (ANN)'}  mode={info['mode']}  {passes}"
    )
    if info["verification"]:
        console.print(verification_line(info["verification"]), markup=False)
    ops = Table(title="ops by domain")
    for column in ("domain", "op", "count"):
        ops.add_column(column)
    for row in info["ops"]:
        ops.add_row(row["domain"], row["op"], str(row["count"]))
    console.print(ops)
    if info["rewrites"]:
        rewrites = Table(title="rewritten regions")
        for column in ("region", "kind", "original ops", "spikec ops"):
            rewrites.add_column(column)
        for row in info["rewrites"]:
            rewrites.add_row(row["region"], row["kind"], " ".join(row["original_ops"]), "\n".join(row["spikec_ops"]))
        console.print(rewrites)
    if "ttfs" in info:
        ttfs = info["ttfs"]
        timing = f"time precision {ttfs['precision']}" if ttfs["precision"] else "float spike times"
        sites = Table(title=f"TTFS sites: {len(ttfs['sites'])} spiking layers, {timing}")
        # the loss the ranges' clipping would have cost: what the held-out samples showed before widening
        clipped = ttfs.get("clipped") or {}
        for column in ("site", "role", "emit", "receives", "range [a, b]", "from", "held-out clipped, past"):
            sites.add_column(column)
        for row in ttfs["sites"]:
            clip = clipped.get(row["site"])
            sites.add_row(
                row["site"],
                row["role"],
                row["emit"],
                " ".join(row["receives"]),
                f"[{row['lower']:.4g}, {row['upper']:.4g}]",
                "construction" if row["analytic"] else "calibration",
                ""
                if clip is None
                else f"{clip['share']:.2%}, {clip['overshoot']:.2g} span past "
                f"[{clip['from'][0]:.4g}, {clip['from'][1]:.4g}]",
            )
        console.print(sites)
        for row in ttfs["float_nodes"]:
            console.print(f"float (decoded, then encoded): {row['node']} ({row['op']})")
    if info["neurons"]:
        from spikec.graphinfo import neuron_label

        counts = {site["tensor"]: site["neurons"] for site in info["neuron_counts"]["sites"]}
        neurons = Table(
            title=f"neurons: {info['neuron_counts']['neuron_nodes']} neuron nodes, "
            f"{info['neuron_counts']['neurons_total'] or '?'} neurons per sample"
        )
        for column in ("input tensor", "neurons", "neuron", "thresholds", "feeds"):
            neurons.add_column(column)
        for row in info["neurons"]:
            count = counts.get(row["tensor"])
            thresholds = (
                f"+{_summary(row['theta_pos'])} / -{_summary(row['theta_neg'])}"
                if "theta_pos" in row
                else _summary(row["threshold"])
            )
            neurons.add_row(
                row["tensor"],
                "?" if count is None else str(count),
                neuron_label(row),
                thresholds,
                ", ".join(row.get("consumers", [row.get("region", "")])),
            )
        console.print(neurons)
    if info["float_ops"]:
        floats = Table(title="ops outside the spikec op set, and why")
        for column in ("category", "nodes", "ops", "why"):
            floats.add_column(column)
        for row in info["float_ops"]:
            floats.add_row(
                row["category"],
                str(row["nodes"]),
                ", ".join(f"{op} x{count}" for op, count in row["ops"].items()),
                row["reason"],
            )
        console.print(floats)
    return 0


def _labels(path: str | None, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """--labels: a 'labels' array (or an archive's only array), one class index per sample of ``feeds``."""
    from spikec.calibrate import read_npz
    from spikec.evaluate import check_labels

    if not path:
        return None
    arrays = read_npz(path, "labels")
    if "labels" not in arrays and len(arrays) != 1:
        raise SpikecError(f"labels {path}: expected a 'labels' array, got keys {sorted(arrays)}")
    return check_labels(
        arrays.get("labels", next(iter(arrays.values()), None)), len(next(iter(feeds.values()))), f"labels {path}"
    )


def cmd_eval(args) -> int:
    from spikec.calibrate import load_inputs
    from spikec.evaluate import compare

    feeds = load_inputs(args.inputs, args.ann, what="inputs")
    result = compare(
        args.ann,
        args.snn,
        feeds,
        labels=_labels(args.labels, feeds),
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.table import Table

    for name, data in result.items():
        table = Table(
            title=f"{name}: SNN vs ANN"
            + (f" (ANN accuracy {data['ann_accuracy']:.4f})" if "ann_accuracy" in data else "")
        )
        columns = list(data["per_t"][0])
        for column in columns:
            table.add_column(column)
        for row in data["per_t"]:
            table.add_row(*[str(row[c]) if c == "t" else f"{row[c]:.5g}" for c in columns])
        _console().print(table)
    return 0


def cmd_report(args) -> int:
    from spikec import modelio
    from spikec.calibrate import load_inputs
    from spikec.report import build_report, check_directory, report_files, write_report

    reads = modelio.reads(
        models=[("ANN", args.ann), ("SNN", args.snn), *([("QANN", args.qann)] if args.qann else [])],
        files=[("--inputs file", args.inputs), ("--labels file", args.labels)],
    )
    method = _method(args.snn)
    if method is not None:  # before the run, not after it; an SNN that does not load is reported by the run
        check_directory(args.output, report_files(method), reads, args.force)
    feeds = load_inputs(args.inputs, args.ann, what="inputs")
    data = build_report(
        args.ann,
        args.snn,
        feeds,
        labels=_labels(args.labels, feeds),
        qann=args.qann,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    index = write_report(data, args.output, reads, args.force)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for label, reference in data["fidelity"].items():
        for name, output in reference["outputs"].items():
            last = output["per_t"][-1]
            print(
                f"{name} vs {label}"
                + (f" at T={last['t']}" if data["stepped"] else "")
                + f": cosine {last['cosine']:.4f}"
                + (
                    f", accuracy {last['accuracy']:.4f} ({label} {output['accuracy']:.4f})"
                    if "accuracy" in last
                    else ""
                )
            )
    energy = data["energy"]
    print(f"energy SNN/ANN {energy['ratio']:.3f} (papers' convention {energy['ratio_paper_convention']:.3f})")
    print(f"wrote {index} (plots, report.json)")
    return 0


def _method(path: str) -> str | None:
    """The method recorded in a spikec model's metadata; None where the file does not read as one (the
    report itself then says what is wrong with it)."""
    import onnx

    from spikec import methods
    from spikec.runtime.metadata import SpikecMetadata

    if not os.path.isfile(path):
        return None  # reading a FIFO would block
    try:
        record = SpikecMetadata.read(onnx.load(path, load_external_data=False), path)
    except Exception:
        return None
    return record.method if record is not None and record.method in methods.METHODS else None


def cmd_ugo_train(args) -> int:
    from pathlib import Path

    from rich.table import Table

    from spikec import modelio, ugo

    names = [args.only] if args.only else list(ugo.SPECS)
    for name in names:
        if name not in ugo.SPECS:
            raise SpikecError(f"argument --only {name!r}: choose one of {', '.join(ugo.SPECS)}")
    directory = Path(args.output_dir) if args.output_dir else ugo.DATA_DIR
    if not directory.is_dir():
        raise SpikecError(f"argument --output-dir {directory}: no such directory")
    sizes = {name: [args.hidden] if args.hidden is not None else ugo.shipped_sizes(name) for name in names}
    targets = {(name, hidden): directory / ugo.path_for(name, hidden).name for name in names for hidden in sizes[name]}
    modelio.check_outputs([("output", path) for path in targets.values()])  # before the fits, not after them
    table = Table(title="UGO fits over each operator's domain (relative = mean |error| / max |f|)")
    for column in ("operator", "N", "fit", "mean relative", "max abs", "IF T=32", "IF T=64", "IF T=128", "weights"):
        table.add_column(column)
    refits = []
    for (name, hidden), target in targets.items():
        fits = [("spikec", ugo.fit(name, hidden))]
        if args.paper:
            fits.append(("paper recipe", ugo.train_paper(name, hidden, progress=not args.quiet)))
        refits.append(("output", target, fits[0][1].arrays()))
        for kind, operator in fits:
            error = ugo.fit_error(operator)
            table.add_row(
                name,
                str(hidden),
                kind,
                f"{error['mean_relative']:.2e}",
                f"{error['max_abs']:.2e}",
                *[f"{ugo.spiking_error(operator, t):.2e}" for t in (32, 64, 128)],
                str(target) if kind == "spikec" else "",
            )
    modelio.write(refits)  # all refits or none
    _console().print(table)
    return 0


def collect_info() -> dict:
    """Versions, the native kernel library (where it is, whether it loads, its ISA, whether it was built from
    the kernel sources this spikec has) and the registered methods."""
    import importlib.metadata
    import platform

    from spikec.methods import METHODS
    from spikec.runtime import native

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    path = native.library_path()
    built, sources = (native.built_from(path) if path else None), native.source_digest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale library: said below, not as a warning
        loads = native.available()
    return {
        "spikec": version("spikec"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": {p: version(p) for p in ("onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "torch")},
        "native": {
            "library": os.fspath(path) if path else None,
            "loads": loads,
            "isa": native.kernel_isa() if loads else None,
            "built_from": built,
            "sources": sources,
            "matches_sources": built is not None and built == sources,
        },
        "methods": {name: method.paper for name, method in METHODS.items()},
        "default_timesteps": {name: method.default_timesteps for name, method in METHODS.items() if method.stepped},
        # with the method's default options
        "measures_timesteps": {
            name: method.measures_timesteps(method.Options()) for name, method in METHODS.items() if method.stepped
        },
    }


def cmd_info(args) -> int:
    from spikec.equilibrium import BOUND_CAP, ROUND_TO
    from spikec.methods import METHODS

    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        f"spikec {info['spikec']} (Python {info['python']}, {info['machine']})",
        "packages: " + ", ".join(f"{p} {v or 'not installed'}" for p, v in info["packages"].items()),
    ]
    kernels = info["native"]
    if kernels["library"] is None:
        lines.append(
            "native kernels: not built (reinstall where a C++ compiler is available, or `make native`); "
            "spikec ops run as their ONNX functions"
        )
    elif not kernels["matches_sources"]:
        lines.append(
            f"native kernels: {kernels['library']} was built from other kernel sources: rebuild it with "
            f"`make native`; spikec ops run as their ONNX functions"
        )
    else:
        lines.append(f"native kernels: {kernels['library']} ({kernels['isa']}, sources {kernels['sources']})")

    def steps(name: str) -> str:
        if name not in info["default_timesteps"]:
            return "one pass, no T"
        fewest = info["default_timesteps"][name]
        if fewest is None:
            return "default T measured: the steps until no neuron fires on held-out samples, plus a margin"
        if info["measures_timesteps"][name]:
            return (
                f"default T measured: the fewest steps, from {fewest} in steps of {ROUND_TO} up to {BOUND_CAP}, "
                f"that meet its bound ({METHODS[name].bound}) on held-out samples"
            )
        return f"default T={fewest}"

    lines += [f"method {name}: {paper}; {steps(name)}" for name, paper in info["methods"].items()]
    print("\n".join(lines))
    return 0


def cmd_tune(args) -> int:
    from pathlib import Path

    from spikec import methods, modelio
    from spikec.calibrate import load_inputs
    from spikec.compiler import compile as compile_model
    from spikec.runtime.metadata import SpikecMetadata
    from spikec.tune import front, pick, plot, search_space, split, tune

    if args.min_cosine is not None and not -1.0 <= args.min_cosine <= 1.0:
        raise SpikecError(f"argument --min-cosine {args.min_cosine}: a cosine lies in [-1, 1]")
    if args.max_energy is not None and not args.max_energy > 0:
        raise SpikecError(f"argument --max-energy {args.max_energy}: expected a positive ratio SNN/ANN")
    figure = args.plot or Path(args.output).with_name(Path(args.output).stem + ".front.png")
    reads = modelio.reads(models=[("input model", args.model)], files=[("calibration data", args.calib)])
    # before the search, not after it; the state file is read as well as written, so it is checked as an output
    modelio.check_outputs([("output", args.output), ("--plot file", figure), ("--resume file", args.resume)], reads)
    space = search_space(args.method, args.knob or ())
    feeds = load_inputs(args.calib, args.model, what="calibration data")
    points = tune(
        args.model,
        feeds,
        args.method,
        knobs=space,
        max_timesteps=args.max_timesteps,
        time_budget=args.time_budget,
        state=args.resume,
        progress=not args.quiet,
        batch_size=args.batch_size,
    )
    if not points:
        raise SpikecError("--time-budget: spent before the first setting was evaluated")
    best = front(points)
    knobs = [k for k in best[0] if k not in ("method", "t", "cosine", "energy", "energy_paper")]
    print("Pareto front (validation cosine up, energy estimate SNN/ANN down, T down):")
    rows = [["T", "cosine", "energy", "energy(paper)", *knobs]]
    rows += [
        [
            str(p["t"]),
            f"{p['cosine']:.5f}",
            f"{p['energy']:.3f}",
            f"{p['energy_paper']:.3f}",
            *(str(p[k]) for k in knobs),
        ]
        for p in best
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    try:
        chosen = pick(
            points,
            args.min_cosine,
            max_energy=args.max_energy,
            max_timesteps=args.max_timesteps,
            minimize=args.minimize,
        )
    except SpikecError:
        print(f"plot: {plot(points, None, figure)}")  # the front shows why nothing meets the constraints
        raise
    print(
        f"chosen: T={chosen['t']} cosine={chosen['cosine']:.5f} energy={chosen['energy']:.3f} "
        + " ".join(f"{k}={chosen[k]}" for k in knobs)
    )
    print(f"plot: {plot(points, chosen, figure)}")
    options = {k: chosen[k] for k in knobs}
    if methods.get(args.method).stepped:
        options["timesteps"] = chosen["t"]
    # the setting as measured: calibrated on the fit part, verified on the validation part it was chosen on
    fit, validation = split(feeds)
    snn = compile_model(
        args.model, fit, args.output, verification=validation, method=args.method, progress=not args.quiet, **options
    )
    print(verification_line(SpikecMetadata.read(snn).report.verification))
    return 0


def _per_method_steps(text: str | None) -> dict[str, int]:
    """--timesteps ecmt=8,sta=32"""
    steps: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise SpikecError(f"argument --timesteps: {item!r} is not METHOD=T with T a positive integer")
        steps[name.strip()] = int(value)
    return steps


def cmd_compare(args) -> int:
    from spikec.calibrate import load_inputs
    from spikec.compare import compare_methods

    feeds = load_inputs(args.calib, args.model, what="calibration data")
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    result = compare_methods(
        args.model,
        feeds,
        labels=_labels(args.labels, feeds),
        **({"names": names} if names else {}),
        timesteps=_per_method_steps(args.timesteps),
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = result["methods"]
    accuracy = any("accuracy" in r for r in rows)
    header = [
        "method",
        "T",
        "cosine",
        "rel.max.err",
        *(["accuracy(ANN)"] if accuracy else []),
        "T@cos0.99",
        "energy",
        "energy(paper)",
        "spikes/neuron/step",
        "time",
    ]
    table = [header]
    for r in rows:
        if "error" in r:
            table.append([r["method"], "-", f"fails: {r['error']}"])
            continue
        table.append(
            [
                r["method"],
                str(r["timesteps"] or "1 pass"),
                f"{r['cosine']:.5f}",
                f"{r['relative_max_error']:.3g}",
                *(
                    [f"{100 * r['accuracy']:.2f}%({100 * r['ann_accuracy']:.2f}%)" if "accuracy" in r else "-"]
                    if accuracy
                    else []
                ),
                str(r["t_at_min_cosine"] or "-"),
                f"{r['energy_ratio']:.3g}",
                f"{r['energy_ratio_paper']:.3g}",
                f"{r['spikes_per_neuron_per_step']:.3g}",
                f"{r['time_ratio']:.3g}",
            ]
        )
    widths = [
        max(len(line[i]) for line in table if i < len(line) and len(line) == len(header)) for i in range(len(header))
    ]
    print(
        f"{result['model']}: {result['fit_samples']} samples calibrate, {result['validation_samples']} validate; "
        f"energy and time as SNN/ANN"
    )
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip())
    pick = result["recommendation"]
    print(f"recommended: {pick['method']} ({pick['reason']}; rule: docs/compare.md)")
    return 0


def add_quantize_arguments(p: argparse.ArgumentParser, calib_help: str) -> None:
    """The arguments of spikec's PTQ, shared by quantize and finetune (which quantizes first)."""
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, help=calib_help)
    p.add_argument("--levels", type=int, default=16, help="quantization levels L")
    p.add_argument(
        "--per-tensor", action="store_true", help="one scale per tensor, not one per channel of the last axis"
    )
    p.add_argument(
        "--zero-points",
        action="store_true",
        help="a zero point per channel where biased weight products read the quantizer (finer, more spikes)",
    )
    p.add_argument(
        "--no-refit",
        action="store_true",
        help="keep the float weights (bias-corrected) instead of refitting them to the float model's outputs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikec", description="Convert Transformer ANNs (ONNX) into spiking neural networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, the native kernels and the methods of this installation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compile", help="convert an ANN ONNX model into an SNN")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, help=".npz keyed by input name, first axis = samples (held-out data)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="override an input's dims")
    _add_compile_options(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "tune", help="search a method's knobs: Pareto front of fidelity vs energy vs T, compile the pick"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, help=".npz keyed by input name; a quarter of it validates")
    p.add_argument("--method", default="ecmt", help="ecmt, spikezip, sta or ttfs")
    p.add_argument("--min-cosine", type=float, help="the validation cosine the pick must reach (else the knee)")
    p.add_argument("--max-energy", type=float, help="the largest energy estimate SNN/ANN the pick may have")
    p.add_argument(
        "--max-timesteps",
        type=int,
        default=8,
        help="the largest T searched and picked (one run gives every smaller T; STA: T and T/2)",
    )
    p.add_argument(
        "--minimize",
        default="energy",
        choices=("energy", "timesteps"),
        help="what the pick spends least of among the settings reaching --min-cosine",
    )
    p.add_argument("--plot", metavar="PATH", help="the front's plot, a PNG (default: next to the output)")
    p.add_argument(
        "--time-budget", type=float, help="seconds; no new setting starts after it (at least one is evaluated)"
    )
    p.add_argument(
        "--knob",
        action="append",
        metavar="NAME=V1,V2",
        help="search these values of the method's option NAME instead of the default grid's (repeatable; "
        "one value fixes it)",
    )
    p.add_argument("--resume", metavar="STATE.json", help="keep evaluated settings here and continue from them")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "compare",
        help="every method on the same model and data: fidelity, energy, spikes, simulation time; which method to use",
    )
    p.add_argument("model")
    p.add_argument("--calib", required=True, help=".npz keyed by input name; a quarter of it validates")
    p.add_argument("--labels", help=".npz with a 'labels' array (one per calibration sample) for accuracy")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--timesteps", metavar="METHOD=T,...", help="T per method (default: each method's own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("run", help="run a model (ANN or SNN) on inputs and save its outputs")
    p.add_argument("model")
    p.add_argument("--inputs", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--timesteps", "-T", type=int, default=None, help="steps for a stateful model")
    p.add_argument(
        "--until-quiet",
        action="store_true",
        help="stateful spikezip model: stop once no neuron fires (dynamic T, capped by --timesteps)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("quantize", help="post-training quantization into the QANN that spikezip converts")
    add_quantize_arguments(p, calib_help=".npz keyed by input name, first axis = samples (held-out data)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="override an input's dims")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "finetune", help="quantize, then fine-tune the QANN (LSQ, distilled from the float model; needs torch)"
    )
    add_quantize_arguments(p, calib_help=".npz keyed by input name, first axis = samples (no labels)")
    p.add_argument(
        "--steps",
        type=int,
        default=1000,
        help="training steps at most; every fifth sample is held back from training, its loss measured every few "
        "hundred steps and at the end, and the parameters of the lowest measurement (the start included) are "
        "written",
    )
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop training after this long")
    p.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate of the weights")
    p.add_argument("--checkpoint", metavar="PATH", help="save progress here; an existing one is resumed")
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=4.0,
        metavar="W",
        help="also distill every LayerNorm's output, W times their mean error (default 4; 0: outputs only)",
    )
    p.add_argument(
        "--qdrop",
        type=float,
        default=0.0,
        metavar="P",
        help="QDrop: in training, each quantized value is float with probability P",
    )
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="override an input's dims")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("ugo", help="STA's universal group operators (exp, GELU, inverse, rsqrt)")
    ugo_commands = p.add_subparsers(dest="ugo_command", required=True)
    p = ugo_commands.add_parser("train", help="refit the operators, save their weights, print the fit errors")
    from spikec.ugo import SPECS

    p.add_argument("--only", metavar="NAME", help=f"one operator: {', '.join(SPECS)}")
    p.add_argument(
        "--hidden", type=int, metavar="N", help="hidden size (default: the paper's and the reference code's)"
    )
    p.add_argument("--paper", action="store_true", help="also run the paper's training recipe (torch) to compare")
    p.add_argument("--output-dir", metavar="DIR", help="where to write the weights (default: spikec's package data)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ugo_train)

    p = sub.add_parser("calib", help="calibration data for a model from text, images or a Python function")
    calib_commands = p.add_subparsers(dest="calib_command", required=True)
    p = calib_commands.add_parser("make", help="write the .npz compile --calib takes, checked against the model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="one sample per non-empty line, tokenized by --tokenizer")
    source.add_argument(
        "--images",
        metavar="DIR",
        help="one sample per image file under DIR (recursive, sorted), as --resize, --scale, --mean and --std say",
    )
    source.add_argument(
        "--python",
        metavar="MODULE:FUNCTION",
        help="a function (module or file.py) returning {input name: array, samples first}",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="a saved Hugging Face tokenizer (offline)")
    p.add_argument(
        "--max-length",
        type=int,
        help="pad and truncate to this many tokens (default: the model's static sequence length)",
    )
    p.add_argument("--resize", metavar="HxW", help="image size (default: the model's static size)")
    p.add_argument(
        "--resample", default="bilinear", help="resize filter: nearest, box, bilinear (default), bicubic or lanczos"
    )
    p.add_argument("--scale", type=float, default=1 / 255, help="pixel values times this (default 1/255: 0..1)")
    p.add_argument(
        "--mean",
        default="0",
        metavar="M[,M,M]",
        help="subtracted after --scale, one value or one per channel (default 0)",
    )
    p.add_argument(
        "--std", default="1", metavar="S[,S,S]", help="divides after --mean, one value or one per channel (default 1)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calib_make)

    p = sub.add_parser("inspect", help="show what a model contains and what spikec rewrote")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="fidelity of an SNN against its ANN for every T")
    p.add_argument("ann")
    p.add_argument("snn")
    p.add_argument("--inputs", required=True)
    p.add_argument("--labels", help=".npz with a 'labels' array for accuracy")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="HTML report: fidelity vs T, per-layer error, firing rates, energy")
    p.add_argument("ann", help="the ANN the SNN was compiled from (spikezip: its quantized ANN, or see --qann)")
    p.add_argument("snn", help="a spikec model of the ANN (stepped methods: time-unrolled)")
    p.add_argument(
        "--qann",
        help="spikezip: the quantized ANN the SNN is equivalent to (compile --save-qann); "
        "the SNN is then measured against it and against ANN, the float model",
    )
    p.add_argument("--inputs", required=True)
    p.add_argument("--labels", help=".npz with a 'labels' array for accuracy")
    p.add_argument("-o", "--output", required=True, help="directory for index.html, the PNG plots and report.json")
    p.add_argument("--force", action="store_true", help="replace a report already in that directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="also print report.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_report)
    _name_flags(parser)
    return parser


def _name_flags(parser: argparse.ArgumentParser) -> None:
    """Give each (sub)command's namespace ``flags``: its arguments' names as the API spells them (the dest)
    -> the flag typed here, so that an error naming an argument (one text for the API and the CLI) names
    the flag."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    parser.set_defaults(flags=flags)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _name_flags(subparser)


def _with_flags(message: str, flags: dict[str, str]) -> str:
    """'argument batch_size=0: ...' -> 'argument --batch-size=0: ...' where the command has that flag."""
    return re.sub(r"\bargument (\w+)", lambda m: f"argument {flags.get(m[1], m[1])}", message)


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised wherever Python is when it arrives, so that every cleanup (spikec.modelio
    removes its temporaries) runs as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    # A second signal while cleaning up takes the default action: the user insists. Whatever that leaves
    # behind, the next spikec run writing into that directory removes (spikec.modelio).
    for number in TERMINATING_SIGNALS:
        if signal.getsignal(number) is _interrupt:
            signal.signal(number, signal.SIG_DFL)
    raise Interrupted(signum)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"spikec: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spikec.runtime.session import QUIET_LOG_SEVERITY, set_default_log_severity

    # onnxruntime logs an error before raising it: the one-line error this tool prints says it already.
    set_default_log_severity(QUIET_LOG_SEVERITY)
    # Signals the caller ignores (nohup, background jobs) stay ignored.
    handlers = {
        number: signal.signal(number, _interrupt)
        for number in TERMINATING_SIGNALS
        if signal.getsignal(number) not in (signal.SIG_IGN, None)
        and threading.current_thread() is threading.main_thread()
    }
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            # numpy's floating-point warnings: spikec.verify refuses a model whose values overflowed, naming
            # the tensor; the warning itself names a line of spikec, which helps no user.
            warnings.filterwarnings(
                "ignore", r"(overflow|invalid value|divide by zero|underflow) encountered", RuntimeWarning
            )
            status = args.func(args)
            sys.stdout.flush()  # a closed pipe must show up here, not in the interpreter's exit flush
        return status
    except SpikecError as exc:
        print(f"spikec: error: {_with_flags(str(exc), getattr(args, 'flags', {}))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signum", signal.SIGINT)
        print(f"spikec: interrupted ({signal.Signals(number).name})", file=sys.stderr)
        return 128 + number
    except BrokenPipeError:
        # The reader went away (`spikec inspect --json | head -1`): not an error of ours. Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by SIGPIPE
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
