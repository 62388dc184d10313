"""Figures the reliability tests measure, for ``docs/reliability.md``.

With ``SEG_FIGURES=/path/figures.json`` in the environment each test merges what it measured into
that JSON file (one key per section); without it nothing is written. ``-s`` also prints them.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def record(section: str, figures: dict[str, Any]) -> None:
    """Merge ``figures`` into ``section`` of the figures file (if one is configured) and print
    them."""
    print(f"\nfigures[{section}] = {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get("SEG_FIGURES")
    if not target:
        return
    # Tests on other xdist workers may merge into the same file at the same time.
    with Path(target).open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        data.setdefault(section, {}).update(figures)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
