"""The repository root *is* the package `treegym` (see ../shared/DESIGN.md).

`package_dir={"treegym": "."}` maps the root onto the package name, so the top-level folders
(envs/, agents/, tree/, ...) become `treegym.envs`, `treegym.agents`, ... once installed, while
tests/, benchmarks/ and examples/ stay out of the wheel.
"""

from setuptools import find_packages, setup

_NOT_PACKAGED = ("tests", "tests.*", "benchmarks", "benchmarks.*", "examples", "examples.*",
                 "build", "build.*", "dist", "dist.*")
_SUBPACKAGES = find_packages(where=".", exclude=_NOT_PACKAGED)

setup(
    packages=["treegym"] + [f"treegym.{name}" for name in _SUBPACKAGES],
    package_dir={"treegym": "."},
    package_data={"treegym": ["py.typed", "train/warmstart/*", "train/warmstart_web/*"]},
    include_package_data=False,
)
