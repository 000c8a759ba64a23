"""Safe file writing: atomic replacement and protection of the user's inputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deepshrink.errors import ConfigError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    An interrupted or failed write leaves no half-written file behind, and an existing file at
    `path` stays intact until the new one is complete. `protect` lists the inputs of the
    operation: writing over one of them is refused, because the user's data must never be lost.
    """
    target = Path(path)
    for input_path in protect:
        if Path(input_path).exists() and target.exists() and target.resolve() == Path(input_path).resolve():
            raise ConfigError(f"output path {str(target)!r} is also an input; choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
