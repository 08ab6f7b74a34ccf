"""Writing files safely: a temp file beside the destination, then a rename; nothing is left behind on failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from compressor.errors import CompressorError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a fresh temp file in `path`'s folder, then rename it to `path`.

    A CompressorError when no temp file can be made there; on a failure later the temp file is removed and the
    exception propagates (callers word it)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CompressorError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _require_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise CompressorError(f"output directory does not exist: {path.parent}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text to `path` through a temp file and a rename."""
    path = Path(path)
    _require_folder(path)
    try:
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as exc:
        raise CompressorError(f"cannot write {path}: {exc.strerror or exc}") from exc


def save_model(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `proto` to `path` atomically; models over 1.8 GB get one external data file beside it."""
    path = Path(path)
    _require_folder(path)
    if not os.access(path.parent, os.W_OK):
        raise CompressorError(f"output directory is not writable: {path.parent}")
    data_name = f"{path.name}.data"
    tmp_data = path.parent / f".{data_name}.tmp"

    def write(tmp: str) -> None:
        if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
            os.replace(path.parent / data_name, tmp_data)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(proto, tmp)

    try:
        return atomic_write(path, write)
    except CompressorError:
        raise
    except Exception as exc:
        tmp_data.unlink(missing_ok=True)
        raise CompressorError(f"cannot write {path}: {exc}") from exc
