"""Safe output files: every path is checked against the inputs and the other outputs before any work, and all
files of one command are written to temp names beside their targets and renamed into place together at the end.

`PendingWrites` is the one way this package writes a file: a failure (or an interrupt) before `commit()` removes
every temp file, so it leaves neither the model nor its report behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx

from compressor.errors import CompressorError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of protobuf above which a model is saved with an external data file


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with symlinks and `..` resolved (the file need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX model file refers to (empty when unreadable: loading reports that)."""
    path = Path(model_path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a corrupt input is reported by the loader, with its own message
        return []
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    locations = set()
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return [path.parent / loc for loc in sorted(locations)]


def model_outputs(path: str | os.PathLike, label: str = "-o") -> dict[str, Path]:
    """The files writing a model to `path` may create: the model and its external data file."""
    path = Path(path)
    return {label: path, f"{label} external data": path.with_name(path.name + ".data")}


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_output_paths(inputs: list[str | os.PathLike], outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse (CompressorError) any output that is an input, an input's external data file, another output, a
    directory, or lies in a missing or unwritable directory. `outputs` maps an option name to its path."""
    protected: dict[Path, str] = {}
    for item in inputs:
        if isinstance(item, onnx.ModelProto):
            continue
        protected[resolved(item)] = f"the input {item}"
        for data in external_data_files(item):
            protected.setdefault(resolved(data), f"the external data file of the input {item}")
    seen: dict[Path, str] = {}
    for label, raw in outputs.items():
        if raw is None:
            continue
        path = resolved(raw)
        for other, what in protected.items():
            if _same_file(path, other):
                raise CompressorError(f"{label} {raw} is {what}: choose another path (inputs are never overwritten)")
        for other, other_label in seen.items():
            if _same_file(path, other):
                raise CompressorError(f"{label} {raw} is also {other_label}: give each output its own path")
        seen[path] = label
        if path.is_dir():
            raise CompressorError(f"{label} {raw} is a directory")
        if not path.parent.is_dir():
            raise CompressorError(f"{label} {raw}: directory does not exist: {Path(raw).parent}")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CompressorError(f"{label} {raw}: directory is not writable: {Path(raw).parent}")


@contextmanager
def _signals_blocked():
    """Hold SIGINT/SIGTERM while files are renamed, so an interrupt never leaves half of them in place."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # not available on this platform / thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PendingWrites:
    """Files staged under temp names beside their targets; `commit()` renames them all, `discard()` removes them.

    Use as a context manager: leaving it by an exception (an interrupt included) discards everything staged.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temp, final)
        self._dirs: list[Path] = []

    def __enter__(self) -> "PendingWrites":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()

    def stage_path(self, path: str | os.PathLike) -> Path:
        """An empty temp file beside `path` for the caller to fill; `commit()` renames it to `path`."""
        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise CompressorError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
        os.close(fd)
        self._staged.append((Path(tmp), path))
        return Path(tmp)

    def stage_bytes(self, path: str | os.PathLike, data: bytes) -> Path:
        """Write `data` to a temp file that `commit()` renames to `path`; returns the temp path."""
        path = Path(path)
        tmp = self.stage_path(path)
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise CompressorError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return tmp

    def stage_text(self, path: str | os.PathLike, text: str) -> Path:
        """Text version of stage_bytes (UTF-8)."""
        return self.stage_bytes(path, text.encode("utf-8"))

    def stage_model(self, proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
        """Stage an ONNX model; past EXTERNAL_DATA_THRESHOLD its weights go to PATH.data. Returns the staged model
        path, a runnable model file (its external data sits beside it) until commit()."""
        path = Path(path)
        if proto.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
            return self.stage_bytes(path, proto.SerializeToString())
        try:
            folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        except OSError as exc:
            raise CompressorError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
        self._dirs.append(folder)
        data_name = f"{path.name}.data"
        try:
            onnx.save_model(proto, str(folder / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types on a full disk
            raise CompressorError(f"cannot write {path}: {exc}") from exc
        self._staged += [(folder / data_name, path.parent / data_name), (folder / path.name, path)]
        return folder / path.name

    def commit(self) -> list[Path]:
        """Rename every staged file into place (in staging order, signals held); returns the final paths."""
        with _signals_blocked():
            try:
                for tmp, final in self._staged:
                    os.replace(tmp, final)
            except OSError as exc:
                self.discard()
                raise CompressorError(f"cannot write {final}: {exc.strerror or exc}") from exc
            finals = [final for _, final in self._staged]
            self._staged = []
            self._remove_dirs()
        return finals

    def discard(self) -> None:
        """Remove every staged temp file."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        for folder in self._dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._dirs = []


def write_model(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write one model atomically (temp file, then rename); nothing is left behind on failure."""
    check_output_paths([], model_outputs(path, "output"))
    with PendingWrites() as pending:
        pending.stage_model(proto, path)
        pending.commit()
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one text file atomically (temp file, then rename)."""
    check_output_paths([], {"output": path})
    with PendingWrites() as pending:
        pending.stage_text(path, text)
        pending.commit()
    return Path(path)
