"""spikec command line: compile, quantize, run, inspect, eval, report, ugo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

from spikec.errors import SpikecError


def _read_npz(path: str, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise SpikecError(f"{what} {path}: no such file") from None
    except Exception as exc:  # numpy raises several types for a corrupt archive
        raise SpikecError(f"{what} {path}: not a readable .npz ({type(exc).__name__})") from None


def _input_shapes(specs: list[str] | None) -> dict[str, list[int | str]] | None:
    if not specs:
        return None
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        if not sep or not name or not dims:
            raise SpikecError(f"argument --input-shape {spec!r}: expected name=d0,d1,... (e.g. input_ids=batch,32)")
        shapes[name] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in dims.split(",")]
    return shapes


def cmd_compile(args) -> int:
    from spikec.compiler import compile as compile_model
    from spikec.compiler import split_options
    from spikec.passes.options import outputs_of

    options = _compile_options(args)
    compile_model(args.model, args.calib, args.output, input_shapes=_input_shapes(args.input_shape), **options)
    for path, what in outputs_of(split_options(options)[1]):
        print(f"wrote {path} ({what})")
    print(f"wrote {args.output}")
    return 0


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    """The compile command's flags, generated from CompileOptions and each method's Options: one
    declaration per option (spikec/passes/options.py). Flags default to absent, so that the options
    passed on are only those given, and a flag of another method can be refused."""
    from spikec.compiler import CompileOptions
    from spikec.methods import METHODS
    from spikec.passes.options import flags_of, kind_of

    actions: dict[str, argparse.Action] = {}
    fields: dict[str, tuple[str, list[str]]] = {}  # option -> (its flag, the methods it belongs to; [] = all)
    groups = [("options of every method", None, CompileOptions)]
    groups += [(f"{m.name}: {m.paper}", m.name, m.Options) for m in METHODS.values()]
    for title, owner, options in groups:
        group = parser.add_argument_group(title)
        for f in options.declared():
            if f.name in actions:  # the same option in another method (levels): one flag, its help per method
                actions[f.name].help += f"; {owner}: {f.metadata['help']}" + \
                    (f" [default {f.default}]" if f.default is not None else "")
                fields[f.name][1].append(owner)
                continue
            kind = kind_of(options, f)
            default = ("on by default, the flag turns it off" if f.default is True else None if kind == "bool"
                       or f.default in (None, ()) else f"default {f.default}")
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


def cmd_quantize(args) -> int:
    from spikec.compiler import quantize

    quantize(args.model, args.calib, args.output, levels=args.levels, input_shapes=_input_shapes(args.input_shape),
             batch_size=args.batch_size, progress=not args.quiet)
    print(f"wrote {args.output}")
    return 0


def cmd_run(args) -> int:
    from spikec.calibrate import load_inputs
    from spikec.evaluate import run_dataset
    from spikec.modelio import check_output_path, save_arrays_atomic

    check_output_path(args.output, args.model)
    check_output_path(args.output, args.inputs, what="--inputs file")
    session = _session(args.model)
    feeds = load_inputs(args.inputs, _user_inputs(args.model), what="inputs")
    outputs = run_dataset(session, feeds, batch_size=args.batch_size, timesteps=args.timesteps,
                          until_quiet=args.until_quiet, progress=not args.quiet)
    save_arrays_atomic(outputs, args.output)
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

    model = load_model(path)
    histogram = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    report = json.loads(meta.get("spikec.report", "{}"))
    return {
        "model": path,
        "method": meta.get("spikec.method"),
        "mode": meta.get("spikec.mode"),
        "timesteps": int(meta["spikec.timesteps"]) if "spikec.timesteps" in meta else None,
        "options": json.loads(meta.get("spikec.options", "{}")),
        "ops": [{"domain": d, "op": o, "count": c} for (d, o), c in sorted(histogram.items())],
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "neurons": report.get("neurons", []),
        "compensated": report.get("compensated", []),
        "regions": report.get("regions", []),
        # rewrites (original ops -> spikec ops), neuron counts per sample, ops left in float and why
        **(summarize(model) if meta.get("spikec.method") != "ttfs" else
           {"ttfs": report["ttfs"], "rewrites": [], "float_ops": [], "neuron_counts": {}}),
    }


def _summary(values) -> str:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 1:
        return f"{array[0]:.4g}"
    return f"[{array.min():.3g} .. {array.max():.3g}] x{array.size}"


def cmd_inspect(args) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    passes = "one pass (time-to-first-spike)" if info["mode"] == "ttfs" else f"T={info['timesteps']}"
    console.print(f"[bold]{info['model']}[/bold]  method={info['method'] or 'none (ANN)'}  mode={info['mode']}  "
                  f"{passes}")
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
        for column in ("site", "role", "emit", "receives", "range [a, b]", "from"):
            sites.add_column(column)
        for row in ttfs["sites"]:
            sites.add_row(row["site"], row["role"], row["emit"], " ".join(row["receives"]),
                          f"[{row['lower']:.4g}, {row['upper']:.4g}]", "construction" if row["analytic"] else "calibration")
        console.print(sites)
        for row in ttfs["float_nodes"]:
            console.print(f"float (decoded, then encoded): {row['node']} ({row['op']})")
    if info["neurons"]:
        from spikec.graphinfo import neuron_label

        counts = {site["tensor"]: site["neurons"] for site in info["neuron_counts"]["sites"]}
        neurons = Table(title=f"neurons: {info['neuron_counts']['neuron_nodes']} neuron nodes, "
                              f"{info['neuron_counts']['neurons_total'] or '?'} neurons per sample")
        for column in ("input tensor", "neurons", "neuron", "thresholds", "feeds"):
            neurons.add_column(column)
        for row in info["neurons"]:
            count = counts.get(row["tensor"])
            thresholds = (f"+{_summary(row['theta_pos'])} / -{_summary(row['theta_neg'])}" if "theta_pos" in row
                          else _summary(row["threshold"]))
            neurons.add_row(row["tensor"], "?" if count is None else str(count), neuron_label(row), thresholds,
                            ", ".join(row.get("consumers", [row.get("region", "")])))
        console.print(neurons)
    if info["float_ops"]:
        floats = Table(title="ops outside the spikec op set, and why")
        for column in ("category", "nodes", "ops", "why"):
            floats.add_column(column)
        for row in info["float_ops"]:
            floats.add_row(row["category"], str(row["nodes"]),
                           ", ".join(f"{op} x{count}" for op, count in row["ops"].items()), row["reason"])
        console.print(floats)
    return 0


def _labels(path: str | None, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """--labels: a 'labels' array (or an archive's only array), one class index per sample of ``feeds``."""
    from spikec.evaluate import check_labels

    if not path:
        return None
    arrays = _read_npz(path, "labels")
    if "labels" not in arrays and len(arrays) != 1:
        raise SpikecError(f"labels {path}: expected a 'labels' array, got keys {sorted(arrays)}")
    return check_labels(arrays.get("labels", next(iter(arrays.values()), None)), len(next(iter(feeds.values()))),
                        f"labels {path}")


def cmd_eval(args) -> int:
    from spikec.calibrate import load_inputs
    from spikec.evaluate import compare

    feeds = load_inputs(args.inputs, args.ann, what="inputs")
    result = compare(args.ann, args.snn, feeds, labels=_labels(args.labels, feeds), batch_size=args.batch_size,
                     progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    for name, data in result.items():
        table = Table(title=f"{name}: SNN vs ANN" + (f" (ANN accuracy {data['ann_accuracy']:.4f})"
                                                       if "ann_accuracy" in data else ""))
        columns = list(data["per_t"][0])
        for column in columns:
            table.add_column(column)
        for row in data["per_t"]:
            table.add_row(*[str(row[c]) if c == "t" else f"{row[c]:.5g}" for c in columns])
        Console().print(table)
    return 0


def cmd_report(args) -> int:
    from spikec.calibrate import load_inputs
    from spikec.report import build_report, check_directory, write_report

    check_directory(args.output)  # before the run, not after it
    feeds = load_inputs(args.inputs, args.ann, what="inputs")
    if _method(args.snn) == "ttfs":
        return _report_ttfs(args, feeds)
    data = build_report(args.ann, args.snn, feeds, labels=_labels(args.labels, feeds), batch_size=args.batch_size,
                        progress=not args.quiet)
    index = write_report(data, args.output)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    energy = data["energy"]
    for name, output in data["fidelity"].items():
        last = output["per_t"][-1]
        print(f"{name} at T={last['t']}: cosine {last['cosine']:.4f}"
              + (f", accuracy {last['accuracy']:.4f} (ANN {output['ann_accuracy']:.4f})" if "accuracy" in last else ""))
    print(f"energy SNN/ANN {energy['ratio']:.3f} (papers' convention {energy['ratio_paper_convention']:.3f})")
    print(f"wrote {index} (plots, report.json)")
    return 0


def _method(path: str) -> str | None:
    import onnx

    from spikec.graphinfo import metadata

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return None  # the report itself says what is wrong with the file
    return metadata(model).get("spikec.method")


def _report_ttfs(args, feeds: dict[str, np.ndarray]) -> int:
    from spikec import ttfsreport

    data = ttfsreport.build(args.ann, args.snn, feeds, labels=_labels(args.labels, feeds), batch_size=args.batch_size)
    index = ttfsreport.write(data, args.output)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for name, f in data["fidelity"].items():
        print(f"{name}: cosine {f['cosine']:.6f}, relative max error {f['relative_max_error']:.3g}"
              + (f", accuracy {f['accuracy']:.4f} (ANN {f['ann_accuracy']:.4f})" if "accuracy" in f else ""))
    print(f"{data['layers']} spiking layers, {data['spikes_per_neuron']:.3f} spikes per neuron, "
          f"{data['clipped_sites']} site(s) clipped; energy SNN/ANN {data['energy']['snn_over_ann']:.3f} (Eq. 28)")
    print(f"wrote {index} (report.json)")
    return 0


def cmd_ugo_train(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from spikec import ugo

    names = [args.only] if args.only else list(ugo.SPECS)
    for name in names:
        if name not in ugo.SPECS:
            raise SpikecError(f"argument --only {name!r}: choose one of {', '.join(ugo.SPECS)}")
    directory = Path(args.output_dir) if args.output_dir else ugo.DATA_DIR
    if not directory.is_dir():
        raise SpikecError(f"argument --output-dir {directory}: no such directory")
    table = Table(title="UGO fits over each operator's domain (relative = mean |error| / max |f|)")
    for column in ("operator", "N", "fit", "mean relative", "max abs", "IF T=32", "IF T=64", "IF T=128", "weights"):
        table.add_column(column)
    for name in names:
        for hidden in ([args.hidden] if args.hidden else ugo.shipped_sizes(name)):
            fits = [("spikec", ugo.fit(name, hidden))]
            if args.paper:
                fits.append(("paper recipe", ugo.train_paper(name, hidden, progress=not args.quiet)))
            for kind, operator in fits:
                error = ugo.fit_error(operator)
                written = ""
                if kind == "spikec":
                    target = directory / ugo.path_for(name, hidden).name
                    operator.save(target)
                    written = str(target)
                table.add_row(name, str(hidden), kind, f"{error['mean_relative']:.2e}", f"{error['max_abs']:.2e}",
                              *[f"{ugo.spiking_error(operator, t):.2e}" for t in (32, 64, 128)], written)
    Console(width=200).print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikec", description="Convert Transformer ANNs (ONNX) into spiking neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="convert an ANN ONNX model into an SNN")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, help=".npz keyed by input name, first axis = samples (held-out data)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="override an input's dims")
    _add_compile_options(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a model (ANN or SNN) on inputs and save its outputs")
    p.add_argument("model")
    p.add_argument("--inputs", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--timesteps", "-T", type=int, default=None, help="steps for a stateful model")
    p.add_argument("--until-quiet", action="store_true",
                   help="stateful spikezip model: stop once no neuron fires (dynamic T, capped by --timesteps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("quantize", help="post-training quantization into the QANN that spikezip converts")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, help=".npz keyed by input name, first axis = samples (held-out data)")
    p.add_argument("--levels", type=int, default=16, help="quantization levels L")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="override an input's dims")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("ugo", help="STA's universal group operators (exp, GELU, inverse, rsqrt)")
    ugo_commands = p.add_subparsers(dest="ugo_command", required=True)
    p = ugo_commands.add_parser("train", help="refit the operators, save their weights, print the fit errors")
    p.add_argument("--only", metavar="NAME", help="one operator: exp, gelu, inverse or rsqrt")
    p.add_argument("--hidden", type=int, metavar="N", help="hidden size (default: the paper's and the reference code's)")
    p.add_argument("--paper", action="store_true", help="also run the paper's training recipe (torch) to compare")
    p.add_argument("--output-dir", metavar="DIR", help="where to write the weights (default: spikec's package data)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ugo_train)

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
    p.add_argument("ann")
    p.add_argument("snn", help="a time-unrolled spikec model of the ANN")
    p.add_argument("--inputs", required=True)
    p.add_argument("--labels", help=".npz with a 'labels' array for accuracy")
    p.add_argument("-o", "--output", required=True, help="directory for index.html, the PNG plots and report.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="also print report.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnxruntime

    # Errors only: onnxruntime's graph-optimizer warnings are not the user's to act on, and they would
    # bury the one-line error this tool promises.
    onnxruntime.set_default_logger_severity(3)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe must show up here, not in the interpreter's exit flush
        return status
    except SpikecError as exc:
        print(f"spikec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`spikec inspect --json | head -1`): not an error of ours. Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
