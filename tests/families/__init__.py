"""Tiny pipelines of every model family: one file here per family file of ``dbcache_compile/families/``
(``tests/families/wan.py`` for ``dbcache_compile/families/wan.py``), collected by iterating the family registry.

Each file holds its family's tiny pipelines (the real diffusers pipeline classes around a tiny transformer with
seeded random weights, a VAE as small as the pipeline allows, no text encoder wherever the pipeline accepts prompt
embeddings; nothing mocked, nothing downloaded) as module-level data of one shape::

    FAMILY = "wan"                          # the family's registered name
    CASES = {"wan": Case(tiny_wan_pipeline, wan_inputs, threshold=0.1, record=0.1), ...}

A :class:`Case` is one pipeline in one call mode: ``pipe = case.builder()``, ``pipe(**case.inputs(),
num_inference_steps=8)`` runs on a CPU in a few seconds (single-threaded: ``torch.set_num_threads(1)``, as the test
suite does; on a shared 2-core machine two threads made a tiny forward 40x slower). The parity tests
(``tests/test_families.py``), the golden graph records (``tools/graph_records.py``), ``tools/families_oracle.py``
and the bench's ``*-tiny`` models read :data:`CASES`. Collection fails loudly when a registered family has no file
here or a file here names no registered family, so adding a family without its tiny pipeline fails the suite.

``docs/families.md`` describes every family (block lists, block forward patterns, CFG, cache-dit's adapter) and
records cache-dit's decisions on these pipelines.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Optional

__all__ = ["Case", "CASES", "FAMILY_CASES", "PARITY", "CFG_COUNT", "RECORDS", "case_family", "check_layout"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny pipeline in one call mode.

    Attributes:
        builder: ``(seed=0) -> pipeline``.
        inputs: ``(batch=1, seed=0, ...) -> call kwargs`` (prompt embeddings, a small resolution, few frames).
        threshold: the residual-diff threshold of the cache-dit parity test (``F1B0_W2M0MC2_T0O1_R<threshold>``:
            one that makes cache-dit 1.5.3 cache on the tiny model, docs/families.md section 5.1), or ``None``: no
            parity test for this case.
        separate_cfg: ``None``: cache-dit runs with its own defaults; ``True`` / ``False``: cache-dit 1.5.3 counts
            this call mode's transformer calls wrongly (its separate-CFG flag comes from the adapter / pipeline
            name, docs/families.md sections 3 and 5.2), so the parity test tells it the real call pattern (whether
            the pipeline makes two calls per step, ``enable_separate_cfg``).
        record: the threshold of the golden graph records (``graphs/family-<case>-<lowering>.json``): the parity
            threshold, or a higher one where that one caches nothing in the record's 6 steps (the record must run the
            compiled hit path); ``None``: no record.
        record_lowerings: the lowerings recorded (those of them the family runs). Each (family, lowering) needs
            one record; a family with several cases records the lowerings a second case would only repeat once
            (``segments`` traces every block: its records cost the suite several seconds each).
        family: the registered family's name (filled in at collection).
    """

    builder: Callable[..., Any]
    inputs: Callable[..., dict]
    threshold: Optional[float] = None
    separate_cfg: Optional[bool] = None
    record: Optional[float] = None
    record_lowerings: tuple[str, ...] = ("regional", "segments")
    family: str = ""


def check_layout(families: dict[str, str], files: set[str]) -> None:
    """``ImportError`` unless ``files`` (the module names of this folder) are exactly the module names of the
    registered ``families`` (module name -> family name)."""
    if families.keys() - files:
        raise ImportError(
            "registered families without a test file in tests/families/: "
            + ", ".join(f"{families[m]} (dbcache_compile/families/{m}.py: add tests/families/{m}.py)"
                        for m in sorted(families.keys() - files)))
    if files - families.keys():
        raise ImportError(f"tests/families/ files that name no registered family (no dbcache_compile/families/<name>"
                          f".py): {', '.join(f'{m}.py' for m in sorted(files - families.keys()))}")


def _collect() -> dict[str, dict[str, Case]]:
    from dbcache_compile.families import families

    module_of = {f.name: f.module.rsplit(".", 1)[-1] for f in families()}
    check_layout({module: name for name, module in module_of.items()},
                 {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
    out: dict[str, dict[str, Case]] = {}
    for family in families():
        module = module_of[family.name]
        mod = importlib.import_module(f"{__name__}.{module}")
        if getattr(mod, "FAMILY", None) != family.name:
            raise ImportError(f"tests/families/{module}.py: FAMILY = {getattr(mod, 'FAMILY', None)!r}, but "
                              f"dbcache_compile/families/{module}.py registers {family.name!r}")
        cases = getattr(mod, "CASES", None)
        if not cases or not all(isinstance(c, Case) for c in cases.values()):
            raise ImportError(f"tests/families/{module}.py needs CASES: a non-empty dict of name -> Case")
        out[family.name] = {name: dataclasses.replace(case, family=family.name) for name, case in cases.items()}
    return out


#: family name -> its cases, in :func:`dbcache_compile.families.families` order
FAMILY_CASES: dict[str, dict[str, Case]] = _collect()
#: every case by its (unique) name
CASES: dict[str, Case] = {}
for _cases in FAMILY_CASES.values():
    for _name, _case in _cases.items():
        if _name in CASES:
            raise ImportError(f"case {_name!r} is defined by two families: {CASES[_name].family}, {_case.family}")
        CASES[_name] = _case
#: cases compared with cache-dit 1.5.3 run with its own defaults
PARITY: dict[str, Case] = {n: c for n, c in CASES.items() if c.threshold is not None and c.separate_cfg is None}
#: cases where cache-dit 1.5.3 miscounts the CFG calls: compared with cache-dit told the real call pattern
CFG_COUNT: dict[str, Case] = {n: c for n, c in CASES.items() if c.threshold is not None and c.separate_cfg is not None}
#: cases with golden graph records
RECORDS: dict[str, Case] = {n: c for n, c in CASES.items() if c.record is not None}


def case_family(name: str):
    """The registered :class:`~dbcache_compile.families.Family` of case ``name``."""
    from dbcache_compile.families import family_named
    return family_named(CASES[name].family)


def first_transformer_call(pipe: Any, inputs: dict) -> dict:
    """The keyword arguments the pipeline passes to its transformer on its first call (a real call to replay);
    positional arguments by name (Sana's pipeline passes the latents positionally)."""
    import inspect

    import torch
    seen: dict = {}
    names = list(inspect.signature(type(pipe.transformer).forward).parameters)[1:]

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("kwargs", dict(zip(names, args), **kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**inputs, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen["kwargs"]
