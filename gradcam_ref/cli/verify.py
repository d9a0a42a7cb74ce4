"""``gradcam-ref verify``: the table of :mod:`gradcam_ref.verify`, JSON, or one library's conventions in words."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(json_output: bool = False, explain: str | None = None, goldens_directory: str | Path | None = None,
        perturbation: str = "all") -> int:
    """``gradcam-ref verify``: print the table (or JSON, or ``--explain LIB``); 1 when a check fails."""
    from gradcam_ref.conventions import describe
    from gradcam_ref.verify import run as run_checks
    from gradcam_ref.verify import table

    if explain is not None:
        try:
            print(describe(explain))
        except ValueError as error:
            print(f"gradcam-ref verify --explain: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        checks, notes = run_checks(goldens_directory, perturbation=perturbation)
    except (FileNotFoundError, ValueError) as error:  # no goldens there, or a file not in the format
        print(f"gradcam-ref verify: {error}", file=sys.stderr)
        return 2
    print(json.dumps([c.as_dict() for c in checks], indent=1) if json_output else table(checks))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0 if checks and all(c.passed for c in checks) else 1
