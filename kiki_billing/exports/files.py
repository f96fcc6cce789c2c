"""Writing a set of output files so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from kiki_billing.errors import InputError


def write_files_atomically(out_dir: Path, files: Mapping[str, str]) -> list[Path]:
    """Write every file of ``files`` (relative path -> text) under ``out_dir``.

    Each file is written to a temporary file beside its target, flushed and fsynced, and only
    when all of them are written are they renamed into place; an error before that removes
    the temporary files and leaves ``out_dir`` as it was.

    Returns:
        The paths written.

    Raises:
        InputError: ``out_dir`` cannot be created or written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for relative, text in files.items():
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
            )
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            staged.append((Path(temp_name), target))
        for staged_path, target in staged:
            os.replace(staged_path, target)
    except OSError as exc:
        for staged_path, _ in staged:
            with contextlib.suppress(OSError):
                staged_path.unlink()
        raise InputError(f"cannot write output: {exc.strerror}", file=str(out_dir)) from None
    return [target for _, target in staged]
