"""What every adapter needs before it imports its library: the installed version, checked against
the range its tests ran on, with an error that names the range and the extra to install."""

from __future__ import annotations

import importlib.metadata


def check_version(dist: str, low: str, high: str, *, module: str, extra: str) -> str:
    """`dist`'s installed version if `low <= version < high`, else an ImportError saying so."""
    supported = f"{dist}>={low},<{high}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f'{module} needs {dist}: pip install "treegym[{extra}]" ({supported})') from None
    from packaging.version import Version
    if not Version(low) <= Version(version) < Version(high):
        raise ImportError(f"{module} supports {supported}; found {dist} {version}. Install the tested range: "
                          f'pip install "treegym[{extra}]"')
    return version
