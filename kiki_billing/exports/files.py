"""Writing a set of output files so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from kiki_billing.errors import InputError

RUN_FILE_PATTERNS = ("invoices/*.json", "xero-invoices*.csv", "quickbooks-invoices*.csv")
"""Files a run writes under ``--out``; one left over from an earlier run is removed."""


def write_files_atomically(
    out_dir: Path, files: Mapping[str, str], *, replace: Iterable[str] = ()
) -> list[Path]:
    """Write every file of ``files`` (relative path -> text) under ``out_dir``.

    Each file is written to a temporary file beside its target (readable by its owner only),
    flushed and fsynced, and only when all of them are written are they renamed into place;
    an error before that removes the temporary files and leaves ``out_dir`` as it was.

    Args:
        out_dir: The folder.
        files: Relative path -> text.
        replace: Glob patterns (relative to ``out_dir``) of files an earlier run of the same
            kind wrote: any of them this run did not write is removed once the new files are
            in place, so no stale invoice stands beside the new summary.

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
        written = {target.resolve() for _, target in staged}
        for pattern in replace:
            for old in out_dir.glob(pattern):
                if old.is_file() and old.resolve() not in written:
                    old.unlink()
    except OSError as exc:
        for staged_path, _ in staged:
            with contextlib.suppress(OSError):
                staged_path.unlink()
        raise InputError(f"cannot write output: {exc.strerror}", file=str(out_dir)) from None
    return [target for _, target in staged]
