"""One guard for every integration: the outside library is installed, and in the tested range.

Why a guard at import time: an adapter written against one version of a fast-moving library (TRL
marks `rollout_func` experimental; GEM and SkyRL-gym are 0.x) fails in confusing ways deep inside
that library when the version differs. Failing at import, naming the extra and the range, turns
that into a one-line fix.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType

from packaging.specifiers import SpecifierSet
from packaging.version import Version


def require(module: str, dist: str, spec: str, extra: str) -> ModuleType:
    """Import `module` (from distribution `dist`) if its version is in `spec`, else ImportError.

    The message names the extra to install (`pip install "treegym[extra]"`) and the tested range.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # ModuleNotFoundError, or the library's own import failing
        raise ImportError(f'treegym.integrations.{extra} needs {dist}{spec} (pip install "treegym[{extra}]"): '
                          f"{exc}") from exc
    installed_version(dist, spec, extra)
    return mod


def installed_version(dist: str, spec: str, extra: str) -> str:
    """`dist`'s installed version, checked against `spec`, without importing it (for an adapter
    that must check before its library's imports run); ImportError when missing or outside."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise ImportError(f"treegym.integrations.{extra} needs {dist}{spec} "
                          f'(pip install "treegym[{extra}]"); {dist} is not installed as a distribution') from None
    check_version(dist, version, spec, extra)
    return version


def check_version(dist: str, version: str, spec: str, extra: str) -> None:
    """ImportError naming the supported range when `version` is outside `spec`."""
    if Version(version) not in SpecifierSet(spec, prereleases=True):
        raise ImportError(f"treegym.integrations.{extra} supports {dist}{spec} (the tested range); "
                          f"found {dist} {version}. Install a supported version: "
                          f'pip install "treegym[{extra}]"')


__all__ = ["require", "installed_version", "check_version"]
