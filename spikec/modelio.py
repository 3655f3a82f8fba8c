"""Where spikec writes, and how: the one output mechanism of every command and of the Python API.

* An output is never a file the command reads (compared by resolved path and by device and inode, so a
  symlink or hard link to an input is caught; a model's external-data files count as read), nor another
  output of the same command, nor anything but a regular file (a FIFO, a device, a socket is refused,
  not replaced), nor a directory (``-o newdir/`` names a directory, not a file).
* Each file is written beside its destination as ``.NAME.spikec-tmp-<pid>-<n>`` (created as any tool
  creates a file: mode 0666 minus the umask), flushed to disk, and only when every output of the command
  is complete are they all renamed into place. Any failure on the way (a full disk, a signal, an error)
  removes the temporaries and leaves the old outputs as they were; an OSError becomes one line naming the
  file. A temporary that a killed process left behind (its pid is gone) is removed by the next write into
  that directory.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from spikec.errors import SpikecError
from spikec.runtime import weights

# protobuf cannot serialize a message of 2 GiB or more: larger models keep their weights beside them.
_PROTOBUF_LIMIT = 2**31 - 1
_TEMP_MARK = ".spikec-tmp-"
_TEMP_NAME = re.compile(r"^\..*" + re.escape(_TEMP_MARK) + r"(\d+)-\d+$")
_temp_counter = itertools.count()
# The signals a command cleans up after (spikec.cli turns them into exceptions), held back while outputs
# are renamed into place so that a command's outputs are all renamed or none.
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A destination name is cut to this length inside a temporary's name, which must stay under NAME_MAX.
_TEMP_STEM = 100

Source = str | os.PathLike
Read = tuple[str, Path]


# ------------------------------------------------------------------ what a command reads


def _tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from [attribute.t] if attribute.HasField("t") else []
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else []:
                yield from _tensors(subgraph)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def model_files(path: Source) -> list[Path]:
    """A model file and the external-data files it names (a file that does not parse is just itself:
    the loader reports what is wrong with it)."""
    path = Path(path)
    if not path.is_file():
        return [path]  # nothing to parse (reading a FIFO would block)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable file is the loader's to report
        return [path]
    locations = {
        entry.value
        for tensor in _tensors(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path, *(path.parent / location for location in sorted(locations))]


def reads(models: Sequence[tuple[str, object]] = (), files: Sequence[tuple[str, object]] = ()) -> list[Read]:
    """The files a command reads, as (what, path), from its arguments: models (with their external-data
    files) and other files. Arguments that are not paths (in-memory models, arrays) read no file."""
    result: list[Read] = []
    for what, source in models:
        if not isinstance(source, (str, os.PathLike, onnx.ModelProto)):
            raise SpikecError(
                f"{what}: expected an ONNX file's path or an onnx.ModelProto, got {type(source).__name__}"
            )
        if isinstance(source, (str, os.PathLike)):
            model, *data = model_files(source)
            result += [(what, model), *((f"{what}'s external data", path) for path in data)]
    result += [(what, Path(source)) for what, source in files if isinstance(source, (str, os.PathLike))]
    return result


# ------------------------------------------------------------------ checking an output path

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _stat(path: Path, label: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None  # absent, or a dangling symlink (which the rename replaces)
    except NotADirectoryError:
        raise SpikecError(f"{label}: a parent of it is not a directory") from None
    except OSError as exc:
        raise SpikecError(f"{label}: cannot be examined ({exc.strerror or exc})") from None


def _same_file(a: Path, a_stat: os.stat_result | None, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        b_stat = os.stat(b)
    except OSError:
        return False
    return a_stat is not None and (a_stat.st_dev, a_stat.st_ino) == (b_stat.st_dev, b_stat.st_ino)


def check_output(
    output: Source, reads: Sequence[Read] = (), *, what: str = "output", others: Sequence[Read] = ()
) -> Path:
    """``output`` if spikec may write it: not one of ``reads`` nor of ``others`` (the command's other
    outputs), not a directory or special file, in a writable directory."""
    text = os.fspath(output)
    path = Path(text)
    label = f"{what} {text}"
    if not text:
        raise SpikecError(f"{what}: empty path")
    status = _stat(path, label)
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise SpikecError(f"{label}: is a directory; name a file")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise SpikecError(f"{label}: ends in '{os.sep}', which names a directory (and none exists); name a file")
    if status is not None:
        kind = next((kind for test, kind in _SPECIAL if test(status.st_mode)), None)
        if kind is not None or not stat.S_ISREG(status.st_mode):
            raise SpikecError(f"{label}: is {kind or 'not a regular file'}; spikec only replaces regular files")
    for read_what, read in reads:
        if _same_file(path, status, read):
            same = "" if os.fspath(read) == text else f" ({read})"
            raise SpikecError(f"{label}: is the {read_what}{same}; choose another path")
    for other_what, other in others:
        if _same_file(path, status, other):
            raise SpikecError(f"{label}: is also the {other_what}; give each output its own path")
    parent = path.parent
    if not parent.is_dir():
        raise SpikecError(f"{label}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpikecError(f"{label}: directory {parent} is not writable")
    return path


def check_outputs(outputs: Sequence[tuple[str, Source | None]], reads: Sequence[Read] = ()) -> list[Path]:
    """Check every output a command will write (``(what, path)``; None = not written) against everything
    it reads and against each other, before any work is done."""
    given = [(what, path) for what, path in outputs if path is not None]
    for what, path in given:
        if not isinstance(path, (str, os.PathLike)):
            raise SpikecError(f"{what}: expected a file path (or None), got {type(path).__name__}")
    return [
        check_output(path, reads, what=what, others=[(w, Path(p)) for w, p in given[:index]])
        for index, (what, path) in enumerate(given)
    ]


# ------------------------------------------------------------------ temporaries


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process (EPERM): alive
    return True


def remove_stale_temporaries(directory: Path) -> None:
    """Remove spikec temporaries in ``directory`` whose process is gone (killed, or the machine stopped)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or _alive(int(match[1])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name[:_TEMP_STEM]}{_TEMP_MARK}{os.getpid()}-{next(_temp_counter)}")


def _create(temp: Path) -> None:
    """An empty file with the mode any tool gives a new file (0666 minus the umask, which open applies)."""
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _sync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ------------------------------------------------------------------ writing


def external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is written with its weights beside it: it references external data (a model
    loaded with its weights mapped, runtime/weights.py, is written as it came) or protobuf cannot
    serialize it in one piece."""
    return any(weights.external_tensors(model)) or model.ByteSize() > _PROTOBUF_LIMIT


class Staged:
    """A model file and its external data (NAME and NAME.data) in a private directory: beside the
    destination, named as a temporary (removed when its process is gone), until `write` renames them
    into place; or, with no destination, in the system's temporary directory."""

    def __init__(self, destination: Path | None, reads: Sequence[Read] = ()):
        if destination is None:
            self.directory = Path(tempfile.mkdtemp(prefix="spikec-staged-"))
            name = "model.onnx"
        else:
            self.data_destination = check_output(
                destination.with_name(destination.name + ".data"), reads, what=f"external data of {destination}"
            )
            self.directory = _temp_path(destination)
            self.directory.mkdir()
            name = destination.name
        self.path = self.directory / name
        self.data = self.directory / (name + ".data")

    def save(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Write ``model``: every tensor of at least weights.EXTERNAL_MIN_BYTES into NAME.data (from memory,
        or from the file it references, runtime/weights.py), the rest into NAME; returns what NAME holds,
        the model with references (the caller's model is left as it is)."""
        written = _without_initializers(model)
        with weights.DataFile(self.data) as data:
            for tensor in model.graph.initializer:
                if (
                    tensor.data_type != onnx.TensorProto.STRING
                    and weights.nbytes_of(tensor) >= weights.EXTERNAL_MIN_BYTES
                ):
                    written.graph.initializer.append(data.add(tensor))
                else:
                    written.graph.initializer.append(weights.inline(tensor))
        return self.save_references(written)

    def save_references(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Write NAME: ``model``, whose external tensors already reference NAME.data."""
        with open(self.path, "wb") as handle:
            handle.write(model.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        return model

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its initializers (copying them would copy the weights)."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    return copy


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


@contextlib.contextmanager
def staging(destination: Source | None, reads: Sequence[Read] = ()) -> Iterator[Staged]:
    """A `Staged` model for ``destination`` (None: a temporary one), removed on the way out unless `write`
    moved it into place."""
    staged = Staged(None if destination is None else Path(destination), reads)
    try:
        yield staged
    finally:
        staged.remove()


Content = onnx.ModelProto | Staged | Mapping[str, np.ndarray] | bytes | str


def _writer(content: onnx.ModelProto | Mapping[str, np.ndarray] | bytes | str) -> Callable[[Path], None]:
    if isinstance(content, (bytes, str)):
        data = content.encode("utf-8") if isinstance(content, str) else content

        def write_data(temp: Path) -> None:
            temp.write_bytes(data)

        return write_data
    if isinstance(content, Mapping):

        def write_arrays(temp: Path) -> None:
            # through a file object: np.savez appends .npz to a name without it
            with open(temp, "wb") as handle:
                np.savez(handle, **content)

        return write_arrays
    return lambda temp: onnx.save_model(content, os.fspath(temp))


class _Staging:
    """Temporaries of one command, renamed into place together or removed together."""

    def __init__(self, reads: Sequence[Read]):
        self.reads = reads
        self.renames: list[tuple[Path, Path]] = []  # (temporary, destination), in commit order
        self.directories: list[Path] = []  # staging directories of models with external data

    def stage(self, path: Path, content: Content) -> None:
        if isinstance(content, Staged):
            self.renames += [(content.data, content.data_destination), (content.path, path)]
            return
        if isinstance(content, onnx.ModelProto) and external_data(content):
            self._stage_external(path, content)
            return
        temp = _temp_path(path)
        self.renames.append((temp, path))  # before it exists: a signal in between leaves nothing behind
        _create(temp)
        _writer(content)(temp)
        _sync(temp)

    def _stage_external(self, path: Path, model: onnx.ModelProto) -> None:
        # Weights go to <name>.data beside the model, moved into place before it, so that a reader never
        # sees the new model without its data.
        staged = Staged(path, self.reads)
        self.directories.append(staged.directory)
        staged.save(model)
        self.stage(path, staged)

    def commit(self) -> None:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
        try:
            while self.renames:
                os.replace(*self.renames[0])
                self.renames.pop(0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile acts now
        self.discard()  # the emptied staging directories

    def discard(self) -> None:
        for temp, _ in self.renames:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
        self.renames.clear()
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)
        self.directories.clear()


def write(outputs: Sequence[tuple[str, Source, Content]], reads: Sequence[Read] = ()) -> list[Path]:
    """Write every output, ``(what, path, content)`` with content a ModelProto, a mapping of arrays (.npz),
    bytes or text, all or nothing: each is checked as ``check_outputs`` does, staged as a temporary beside
    its destination, and they are renamed into place together once all are complete."""
    paths = check_outputs([(what, path) for what, path, _ in outputs], reads)
    for directory in dict.fromkeys(path.parent for path in paths):
        remove_stale_temporaries(directory)
    staging = _Staging(reads)
    failing: str | None = None
    try:
        for (what, _, content), path in zip(outputs, paths):
            failing = f"{what} {path}"
            staging.stage(path, content)
        failing = None
        staging.commit()
    except OSError as exc:
        failing = failing or (f"output {staging.renames[0][1]}" if staging.renames else "output")
        staging.discard()
        raise SpikecError(f"{failing}: cannot write it ({exc.strerror or exc})") from None
    except BaseException:
        staging.discard()
        raise
    return paths
