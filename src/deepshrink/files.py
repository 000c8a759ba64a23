"""Safe file writing: atomic replacement, protection of the user's inputs, clean write errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deepshrink.errors import ConfigError, OutputError

PARTIAL_SUFFIX = ".partial"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours (EPERM)
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary files that a killed writer of `target` left behind.

    Each temporary file names the process that writes it (.NAME.PID.RANDOM.partial); one whose
    process is gone can never be completed. Files of live writers are left alone.

    Args:
        target: the file whose writers' temporary files are looked for.

    Returns:
        The temporary files removed.
    """
    removed = []
    for candidate in target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"):
        pid = candidate.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _write_error(target: Path, error: OSError) -> OutputError:
    reason = error.strerror or str(error)
    if target.is_dir():
        fix = "it is a directory: name a file inside it"
    elif not target.parent.exists():
        fix = f"its directory {str(target.parent)!r} does not exist and could not be made"
    else:
        fix = "check the path, its permissions and the free space"
    return OutputError(f"cannot write {str(target)!r}: {reason}; {fix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    An interrupted or failed write leaves no half-written file behind (one left by a killed
    process is removed by the next write of the same target), and an existing file at `path`
    stays intact until the new one is complete. `protect` lists the inputs of the operation:
    writing over one of them is refused, because the user's data must never be lost. Operating
    system errors (a directory, no space, no permission) become OutputError naming the path.

    Args:
        path: the file to write.
        protect: input paths that `path` must not be.

    Yields:
        The temporary path to write to.

    Raises:
        ConfigError: `path` is one of `protect`.
        OutputError: `path` is a directory or cannot be written.
    """
    target = Path(path)
    for input_path in protect:
        if Path(input_path).exists() and target.exists() and target.resolve() == Path(input_path).resolve():
            raise ConfigError(f"output path {str(target)!r} is also an input; choose another output path")
    if target.is_dir():
        raise _write_error(target, IsADirectoryError(21, "Is a directory"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        handle, temporary_name = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=target.parent
        )
        os.close(handle)
    except OSError as error:
        raise _write_error(target, error) from error
    temporary = Path(temporary_name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except OSError as error:
        raise _write_error(target, error) from error
    finally:
        if temporary.exists():
            temporary.unlink()
