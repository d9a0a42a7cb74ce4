"""Files written whole or not at all: a temporary file beside the target, renamed into place.

The one way the package (PNGs, evaluation reports, checkpoints) and ``benchmarks/`` write a file
that a reader may open while it is being written, or that an interrupted run must not leave
half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary path beside ``path``, renamed to ``path`` on success, removed on failure.

    Its name is short (``.gradcam-ref-XXXXXXXX.tmp``: ``path``'s own may be as long as the file
    system allows) and the file gets the usual permissions (the umask's), not mkstemp's 0600.
    """
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=".gradcam-ref-", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(path: str | os.PathLike[str], document: Any, **dump: Any) -> None:
    """``document`` as JSON (``indent=1``, a final newline; ``dump``: more of ``json.dump``'s
    options) to ``path``, atomically (:func:`atomic_path`); its folder is made if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(document, f, indent=1, **dump)
        f.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
