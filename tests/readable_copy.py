"""A copy of the project's code that another user can import.

Tests that run the daemon's code as `nobody` or as a daemon user cannot import
it from the checkout when the checkout sits in a folder only its owner may
enter (`mktemp -d` makes such a folder, mode 0700). They import this copy,
readable by everyone, from a folder the user can reach.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "hrw")


def readable_copy(dest: Path, *modules: Path) -> str:
    """Copy the packages (and these extra modules) into `dest`, made for it, readable
    and enterable by everyone; return the PYTHONPATH that imports them from there."""
    dest.mkdir()
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for module in modules:
        shutil.copy2(module, dest / module.name)
    for path in (dest, *dest.rglob("*")):
        mode = path.stat().st_mode
        os.chmod(path, mode | 0o555 if path.is_dir() or mode & 0o100 else mode | 0o444)
    return str(dest)
