"""Where treegym keeps what it generates (worlds, indexes, models).

One function so every module agrees on the cache root, and tests can redirect all of it with a
single environment variable (``TREEGYM_HOME``) instead of patching paths module by module. It sits
at the top of the package and imports nothing from it, so every layer (data, envs, retrieval
indexes, agents) may use it without reaching backwards.
"""

from __future__ import annotations

import os
from pathlib import Path


def treegym_home() -> Path:
    """The cache root: ``$TREEGYM_HOME`` if set, else ``~/.cache/treegym``; created on demand.

    Read on every call (not at import) so a test or a user can change the variable at run time.
    """
    raw = os.environ.get("TREEGYM_HOME")
    home = Path(raw).expanduser() if raw else Path.home() / ".cache" / "treegym"
    home.mkdir(parents=True, exist_ok=True)
    return home
