"""Files written whole or not at all: a temporary name per process, fsync, rename.

A kill at any moment leaves either the old file or the new one, plus at most a temporary
that the next run of the same command removes. Temporary names carry host and pid, so two
live processes (several jobs on one folder, or on a shared disk) never write the same one.
"""
from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import torch

from .metrics import json_safe


def process_tag() -> str:
    """host-pid: temporary names of two live processes never collide, even on a shared disk."""
    return f"{socket.gethostname()}-{os.getpid()}"


def replace_atomically(path: Path, write, binary: bool = True) -> None:
    """write(file) into a temporary beside `path`, fsync, rename over `path`; on any failure
    the temporary is removed and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{process_tag()}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """JSON (indented, NaN written as null) that is either absent or complete."""
    def write(f):
        json.dump(json_safe(obj), f, indent=1, ensure_ascii=False)
        f.write("\n")

    replace_atomically(path, write, binary=False)


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text), binary=False)


def save_torch_atomic(path: Path, obj) -> None:
    """torch.save of plain values and tensors, either absent or complete."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    replace_atomically(path, lambda f: f.write(buffer.getbuffer()))
