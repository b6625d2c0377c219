"""HDF5 artifacts: atomic writes, provenance, schema checks, weights as datasets.

Every artifact is an HDF5 file whose root attributes describe it (fastMRI style): `schema`, `stage`,
`params`, `inputs` (paths and sha256), `seed`, `versions`, `created_utc`, `wall_seconds`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from models.params import UserError

SCHEMA_VERSIONS = {"dataset": 1, "victim": 1, "surrogate": 1, "metrics": 1, "checkpoint": 1, "verification": 1}


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def describe_inputs(paths: list[str | Path]) -> list[dict[str, str]]:
    return [{"path": str(p), "sha256": sha256(p)} for p in paths]


def _check_writable(path: Path) -> None:
    """Fail before any work if `path` cannot be created (a missing folder is simply created)."""
    parent = path.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UserError(f"cannot write {path}: {ancestor} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {parent}: {e.strerror}") from None
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, /sys)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {path}: folder {parent} is not writable ({e.strerror})") from None


def prepare_output(path: str | Path) -> Path:
    """Validate an output path early, so a stage fails before hours of work rather than after."""
    path = Path(path)
    _check_writable(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary `<name>.partial` path; rename it onto `path` only if the block succeeds."""
    path = prepare_output(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


@contextlib.contextmanager
def write_artifact(
    path: str | Path,
    kind: str,
    stage: str,
    params: dict[str, Any],
    inputs: list[str | Path] | list[dict[str, str]] = (),
    seed: int | None = None,
    started: float | None = None,
) -> Iterator[h5py.File]:
    """Open a new artifact for writing; provenance is stamped on entry, the file appears atomically on exit."""
    records = [i if isinstance(i, dict) else describe_inputs([i])[0] for i in inputs]
    with atomic_path(path) as partial:
        with h5py.File(partial, "w") as f:
            f.attrs["schema"] = f"{kind}/{SCHEMA_VERSIONS[kind]}"
            f.attrs["stage"] = stage
            f.attrs["params"] = json.dumps(params, sort_keys=True, default=str)
            f.attrs["inputs"] = json.dumps(records)
            f.attrs["seed"] = -1 if seed is None else int(seed)
            f.attrs["versions"] = json.dumps(versions(), sort_keys=True)
            f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            yield f
            if started is not None:
                f.attrs["wall_seconds"] = round(time.time() - started, 3)


def open_artifact(path: str | Path, kind: str) -> h5py.File:
    """Open an artifact read-only after checking it exists, is HDF5, and holds a schema we can read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a {kind} HDF5 file")
    if path.name.endswith(".partial"):  # an interrupted write is never accepted, whatever it holds
        raise UserError(f"{path}: unfinished write of an interrupted run; rerun the stage that makes it")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, expected a {kind} HDF5 file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80" or magic == b"PK\x03\x04":  # pickle protocol >= 2, or torch.save's zip of pickles
        raise UserError(
            f"{path}: a pickle or torch.save file, not an HDF5 {kind} artifact; "
            "pickles can run code, so they are never loaded"
        )
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path}: not a readable HDF5 file (truncated or another format)") from None
    schema = f.attrs.get("schema")
    if isinstance(schema, bytes):
        schema = schema.decode()
    if not isinstance(schema, str) or "/" not in schema:
        f.close()
        raise UserError(f"{path}: no schema attribute, not an ini-toolkit artifact")
    name, _, version = schema.partition("/")
    if name != kind:
        f.close()
        raise UserError(f"{path}: holds a {name!r} artifact, expected {kind!r}")
    if not version.isdigit() or int(version) > SCHEMA_VERSIONS[kind]:
        f.close()
        raise UserError(f"{path}: schema {schema} is newer than this tool reads ({kind}/{SCHEMA_VERSIONS[kind]})")
    return f


def artifact_kind(path: str | Path) -> str:
    """Peek at an artifact's kind ("victim", "surrogate", ...; "" for none) to choose its reader; open_artifact
    then checks the file in full."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("schema", "")).partition("/")[0]
    except OSError:
        raise UserError(f"{path}: not a readable HDF5 file (truncated or another format)") from None


MEMINFO = Path("/proc/meminfo")


def available_memory() -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say (no check then)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes: int, what: str) -> None:
    """Fail early, with one line, when an estimate from shapes exceeds the memory available now,
    instead of being killed by the kernel hours later. `what` names the job: "reading mnist.h5"."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise UserError(
            f"{what} needs ~{_size(nbytes)}, only {_size(available)} available; "
            "use a smaller budget, pool or --limit, or free memory"
        )


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def attr_json(f: h5py.File | h5py.Group, key: str) -> Any:
    return json.loads(f.attrs[key])


def save_state(group: h5py.Group, state: dict[str, torch.Tensor]) -> None:
    """One dataset per tensor; names keep the state_dict keys (dots are legal in HDF5 names)."""
    for key, tensor in state.items():
        group.create_dataset(key, data=tensor.detach().cpu().numpy())


def load_state(group: h5py.Group) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.asarray(group[key][()])) for key in group.keys()}


def save_history(group: h5py.Group, history: dict[str, list[float]]) -> None:
    for key, values in history.items():
        group.create_dataset(key, data=np.asarray(values, dtype=np.float64))


def load_history(group: h5py.Group) -> dict[str, list[float]]:
    return {key: [float(v) for v in group[key][()]] for key in group.keys()}
