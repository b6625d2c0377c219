"""Every torch.jit call of the project, in one place: script, save with metadata, load.

torch 2.14 deprecates TorchScript with a FutureWarning on each call; TorchScript stays our deploy format
(one self-contained graph, loadable from C++), so exactly that warning is filtered here and nowhere else.
A TorchScript file is a program: load only files you trust, from a path you named.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from stages.core.artifacts import UserError, atomic_path

METADATA = "metadata.json"


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with _quiet():
        return torch.jit.script(module)


def save(
    module: torch.nn.Module,
    path: Path,
    metadata: dict[str, Any],
    check: Callable[[torch.jit.ScriptModule], None] | None = None,
) -> torch.jit.ScriptModule:
    """Script and save atomically; `check` gets the file loaded back and may raise before it replaces `path`,
    so a failed check leaves any previous file untouched."""
    scripted = script(module)
    with atomic_path(path) as partial, _quiet():
        torch.jit.save(scripted, str(partial), _extra_files={METADATA: json.dumps(metadata, default=str)})
        if check is not None:
            check(torch.jit.load(str(partial), map_location="cpu").eval())
    return scripted


def load(path: Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.name.endswith(".partial"):
        raise UserError(f"{path}: unfinished write of an interrupted run; rerun `export`")
    extra = {METADATA: ""}
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception:  # torch raises RuntimeError/ValueError/zipfile errors for foreign files
        raise UserError(f"{path}: not a TorchScript file written by `export`") from None
    if not extra[METADATA]:
        raise UserError(f"{path}: TorchScript file without ini-toolkit metadata")
    return module.eval(), json.loads(extra[METADATA])
