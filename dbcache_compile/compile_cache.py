"""A warm start across processes: ``optimize(..., compile_cache=DIR)``.

What torch persists, and what this module does with it (torch 2.11-2.14; read in the 2.13 sources):

* Inductor keeps its on-disk caches under one directory, ``cache_dir()``
  (``torch/_inductor/runtime/cache_dir_utils.py``), which reads ``$TORCHINDUCTOR_CACHE_DIR`` at *every* call:
  the FX graph cache (``fxgraph/``: the generated wrapper code of each graph, with its guards), the AOTAutograd
  cache (``aotautograd/``: the joint graph's compiled forward, keyed on Dynamo's graph), the compiled C++ kernels
  and their Python bindings (``<2 chars>/<hash>.so`` on CPU), Triton kernels (``triton/<device>/``; also bundled
  into the FX graph entries) and autotuning results. So a compile cache is simply that directory:
  ``DIR/inductor`` is ``$TORCHINDUCTOR_CACHE_DIR`` (and ``DIR/inductor/triton/<index>`` ``$TRITON_CACHE_DIR``)
  **while our transformer's forward runs**, and the previous values are restored when the last such forward
  returns, so no other compile of the process reads or writes ``DIR`` (unless it runs in another thread at that very
  moment; torch passes both variables to its compile workers with each job:
  ``async_compile.py``, "we want to support changing these env vars after (and while) the process pool is
  running").
* ``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts`` ("mega-cache", ``torch/compiler/_cache.py``)
  serialize the FX graph and AOTAutograd entries (plus autotune / PGO ones) of the whole process into one byte
  string and write them back into the current ``cache_dir()``. They carry no compiled C++: in a probe on the tiny
  FLUX (CPU, ``segments``, 4 steps, a loaded machine), a fresh process that loaded them still spent 48.5 s in its
  first generation against 7.7 s with the whole directory and 112 s cold: the C++ compiles are most of the cold time
  on a CPU. The directory holds everything the mega-cache holds, so it is not used here.
* Nothing needs saving at the end of a generation: torch writes each entry as it is compiled, atomically (a
  temporary file renamed into place, ``write_atomic`` in ``torch/_inductor/codecache.py``; C++ builds under a file
  lock in ``DIR/inductor/locks``), so two processes can fill one ``DIR`` together and a process killed mid-generation
  keeps what it finished. What is loaded in a new process is decided by torch's keys (graph, inputs, config, torch
  version, device): a ``DIR`` written by another torch version is simply missed (and warned about here).
* Not persisted by torch: Dynamo's own tracing of the Python code and its guards (every process re-traces; on the
  tiny FLUX a third to a half of the warm first generation: bench/results/cold-start-cpu-2026-12-06), CUDA graphs
  (captured again per process), and automatic dynamic-shape decisions (Dynamo's PGO cache only works with
  ``torch.compiler.config.job_id`` set).

Layout of ``DIR``: ``dbcache_compile.json`` (what wrote it: torch, CUDA/HIP, Python versions) and ``inductor/``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["CompileCache", "open_compile_cache", "attach", "compile_cache_of", "MANIFEST"]

#: the file that marks a directory as a compile cache and records what wrote it
MANIFEST = "dbcache_compile.json"
_FORMAT = 1
#: torch's counters of its cache lookups: (counters group, key) per reported name
_COUNTERS = {
    "fxgraph_hit": ("inductor", "fxgraph_cache_hit"), "fxgraph_miss": ("inductor", "fxgraph_cache_miss"),
    "fxgraph_bypass": ("inductor", "fxgraph_cache_bypass"),
    "autograd_hit": ("aot_autograd", "autograd_cache_hit"), "autograd_miss": ("aot_autograd", "autograd_cache_miss"),
    "autograd_bypass": ("aot_autograd", "autograd_cache_bypass"),
}
_ENV_DIR, _ENV_TRITON = "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"


def _platform() -> dict[str, Optional[str]]:
    """What makes torch's cache entries unusable when it differs (torch keys its entries on these)."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "python": platform.python_version(), "machine": platform.machine()}


def _require_cache_dir() -> None:
    """A clear error on a torch whose Inductor has no ``cache_dir()`` reading ``$TORCHINDUCTOR_CACHE_DIR``."""
    try:
        from torch._inductor.runtime.runtime_utils import cache_dir  # noqa: F401
    except ImportError as e:  # torch 2.11-2.14 all have it
        raise RuntimeError(f"compile_cache needs Inductor's cache_dir() (torch._inductor.runtime.runtime_utils, "
                           f"torch 2.11-2.14); this torch {torch.__version__} has none") from e


class CompileCache:
    """A directory that keeps torch's compile caches for the transformers optimized with it.

    Attributes:
        directory: the ``DIR`` given to :func:`dbcache_compile.optimize` (absolute).
        inductor_dir: ``DIR/inductor``, Inductor's cache directory while our forwards run.
        previous: what the manifest said when it was opened (``None``: a new directory, or an unreadable manifest).
        counts: torch's cache lookups that happened inside our forwards since ``optimize`` (``fxgraph_hit``,
            ``fxgraph_miss``, ``fxgraph_bypass``, ``autograd_hit``, ``autograd_miss``, ``autograd_bypass``).
    """

    def __init__(self, directory: Path, device: torch.device, previous: Optional[dict[str, Any]]) -> None:
        self.directory = directory
        self.inductor_dir = directory / "inductor"
        self.previous = previous
        self.counts = dict.fromkeys(_COUNTERS, 0)
        #: torch's counters when the first compile inside the current forward started (``None``: none yet)
        self._before: Optional[tuple[int, ...]] = None
        # Triton's own cache directory follows Inductor's layout (triton_cache_dir(): cache_dir()/triton/<index>)
        self._triton_dir = (str(self.inductor_dir / "triton" / str(device.index or 0))
                            if device.type == "cuda" else None)
        self._inductor_str = str(self.inductor_dir)

    def __repr__(self) -> str:
        return f"CompileCache({str(self.directory)!r}, {self.counts})"

    def create(self) -> None:
        """Create the directory and (re)write the manifest (atomically: a temporary file renamed into place)."""
        self.inductor_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"format": _FORMAT, "written_by": "dbcache_compile", **_platform(),
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=self.directory)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, self.directory / MANIFEST)

    def entries(self) -> dict[str, int]:
        """What the directory holds now: FX graph and AOTAutograd entries, compiled kernel libraries, bytes."""
        def files(sub: str) -> list[Path]:
            root = self.inductor_dir / sub
            return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")] if root.is_dir() else []
        libraries = [p for p in self.inductor_dir.glob("*/*.so")] if self.inductor_dir.is_dir() else []
        size = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())
        return {"fxgraph": len(files("fxgraph")), "aotautograd": len(files("aotautograd")),
                "kernel_libraries": len(libraries), "bytes": size}

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` run with Inductor's (and Triton's) cache directory pointing into ``DIR``, restored after;
        torch's cache lookups inside are added to :attr:`counts`. A compile error inside gets a note naming
        ``DIR`` (a truncated kernel library there makes torch's compile fail rather than rebuild it)."""
        watched = _watch_compiles()

        @functools.wraps(forward)
        def forward_in_compile_cache(*args: Any, **kwargs: Any) -> Any:
            _enter(self)
            self._before = None if watched else _lookups()
            try:
                return forward(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"dbcache_compile: this compile read and wrote the compile cache {self.directory} "
                               f"(optimize(compile_cache=...)). If that directory is damaged (files truncated by a "
                               f"full disk or an interrupted copy), delete it or pass an empty directory")
                raise
            finally:
                _exit()
                if self._before is not None:  # something compiled inside (or no compile callbacks to tell)
                    for name, new, old in zip(_NAMES, _lookups(), self._before):
                        self.counts[name] += new - old
                    self._before = None

        return forward_in_compile_cache


_NAMES = tuple(_COUNTERS)
#: the process-wide window: how many of our forwards run now (all threads), and the environment values before the
#: first of them, restored when the last returns (so overlapping forwards in two threads cannot leave DIR behind)
_LOCK = threading.Lock()
_WINDOW: dict[str, Any] = {"depth": 0, "saved": (None, None)}
#: per thread, the compile caches whose forward runs (innermost last): Dynamo compiles in the calling thread
_ACTIVE = threading.local()
_WATCHING: list[bool] = []
_LOCAL_CACHE_PATH: list[Any] = []


def _enter(store: CompileCache) -> None:
    env = os.environ
    with _LOCK:
        if _WINDOW["depth"] == 0:
            _WINDOW["saved"] = (env.get(_ENV_DIR), env.get(_ENV_TRITON))
        _WINDOW["depth"] += 1
        env[_ENV_DIR] = store._inductor_str
        if store._triton_dir is not None:
            env[_ENV_TRITON] = store._triton_dir
    _clear_local_cache_path()
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    stack.append(store)


def _exit() -> None:
    _ACTIVE.stack.pop()
    with _LOCK:
        _WINDOW["depth"] -= 1
        if _WINDOW["depth"] == 0:
            old_dir, old_triton = _WINDOW["saved"]
            _restore(os.environ, _ENV_DIR, old_dir)
            _restore(os.environ, _ENV_TRITON, old_triton)
    _clear_local_cache_path()


def _lookups() -> tuple[int, ...]:
    """torch's cache lookup counters, in :data:`_NAMES` order."""
    groups = torch._dynamo.utils.counters
    return tuple(groups[group].get(key, 0) for group, key in _COUNTERS.values())


def _on_compile_start(*args: Any) -> None:
    """Dynamo starts compiling: inside one of our forwards (this thread's), remember the counters (read once per
    forward that compiles, instead of around every forward)."""
    stack = getattr(_ACTIVE, "stack", None)
    if stack and stack[-1]._before is None:
        stack[-1]._before = _lookups()


def _watch_compiles() -> bool:
    """Register :func:`_on_compile_start` with Dynamo's compile callbacks once; ``False`` where this torch has
    none (the counters are then read around every forward)."""
    if not _WATCHING:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            callback_handler = None
        register = getattr(callback_handler, "register_start_callback", None)
        if register is not None:
            register(_on_compile_start)
        _WATCHING.append(register is not None)
    return _WATCHING[0]


def _clear_local_cache_path() -> None:
    """Inductor memoizes the path of its local autotuning cache (``CacheBase.get_local_cache_path``, a
    ``functools.cache`` over ``cache_dir()``): cleared when the directory changes, so that it follows it."""
    if not _LOCAL_CACHE_PATH:
        try:
            from torch._inductor.codecache import CacheBase
            path = getattr(CacheBase, "get_local_cache_path", None)
        except ImportError:
            path = None
        _LOCAL_CACHE_PATH.append(path if hasattr(path, "cache_clear") else None)
    if _LOCAL_CACHE_PATH[0] is not None:
        _LOCAL_CACHE_PATH[0].cache_clear()


def _restore(env: Any, key: str, value: Optional[str]) -> None:
    if value is None:
        env.pop(key, None)
    else:
        env[key] = value


def open_compile_cache(directory: Union[str, os.PathLike, None], mode: Optional[str],
                       device: torch.device) -> Optional[CompileCache]:
    """Validate ``optimize``'s ``compile_cache`` argument without writing anything (``None`` passes through).

    Errors: not a str / PathLike, an empty path, no compile ``mode``, a path that is a file, a non-empty directory
    that is not a compile cache, a directory that cannot be created or written, Inductor's FX graph cache turned off.
    Warnings: a directory written by another torch / CUDA / Python version (its entries will not be used), an
    unreadable manifest."""
    if directory is None:
        return None
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"compile_cache must be a directory path (str or os.PathLike), got "
                        f"{type(directory).__name__} {directory!r}")
    if not os.fspath(directory):
        raise ValueError("compile_cache must be a directory path, got an empty string")
    if mode is None:
        raise ValueError("compile_cache keeps torch.compile's caches: it needs a compile mode (mode='default', "
                         "'max-autotune', ...); without one nothing is compiled")
    _require_cache_dir()
    if torch.compiler.config.force_disable_caches:
        raise ValueError("compile_cache cannot work while torch's compile caches are disabled "
                         "(torch.compiler.config.force_disable_caches, $TORCHINDUCTOR_FORCE_DISABLE_CACHES)")
    if not torch._inductor.config.fx_graph_cache:
        raise ValueError("compile_cache needs Inductor's FX graph cache, which is off (torch._inductor.config."
                         "fx_graph_cache = False, $TORCHINDUCTOR_FX_GRAPH_CACHE=0): turn it on")
    if not getattr(torch._functorch.config, "enable_autograd_cache", True):
        warnings.warn("compile_cache: the AOTAutograd cache is off (torch._functorch.config.enable_autograd_cache); "
                      "a new process will re-run AOTAutograd's tracing before each FX graph cache hit", stacklevel=3)
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
    if path.exists() and not path.is_dir():
        raise ValueError(f"compile_cache={os.fspath(directory)!r} is a file; pass a directory")
    manifest = path / MANIFEST
    previous = None
    if path.is_dir():
        if manifest.is_file():
            previous = _read_manifest(manifest)
        elif any(p.name != "inductor" for p in path.iterdir()):
            raise ValueError(f"compile_cache={str(path)!r} is a non-empty directory that is not a compile cache (no "
                             f"{MANIFEST}); pass a new or empty directory, or one an earlier optimize(compile_cache="
                             f"...) filled")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"compile_cache={str(path)!r}: {existing} is not writable")
    if previous is not None:
        now = _platform()
        differ = {k: (previous.get(k), now[k]) for k in ("torch", "cuda", "hip", "python")
                  if previous.get(k) != now[k]}
        if differ:
            what = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in differ.items())
            warnings.warn(f"compile_cache {path} was last written by {what}: torch keys every entry on its version, "
                          f"so those entries will not be used and this process compiles cold (its own entries are "
                          f"added beside them)", stacklevel=3)
    return CompileCache(path, device, previous)


def _read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """The manifest's content; ``None`` (with a warning) when it cannot be read."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as e:
        warnings.warn(f"compile_cache: cannot read {path} ({e}); it is rewritten. torch checks its own entries, so "
                      f"damaged ones are compiled again", stacklevel=4)
        return None


def attach(runtime: Any, cache: CompileCache) -> None:
    """Run ``runtime``'s forward (the transformer's hook calls ``runtime.forward``) inside ``cache``'s directory."""
    runtime.forward = cache.wrap(runtime.forward)
    runtime.compile_cache = cache


def compile_cache_of(pipe_or_transformer: Any) -> Optional[CompileCache]:
    """The :class:`CompileCache` an optimized pipeline (or transformer) compiles into, ``None`` without one."""
    from .optimize import runtime_of
    return getattr(runtime_of(pipe_or_transformer), "compile_cache", None)
