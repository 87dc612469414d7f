"""Scratch oracle for issue #14: run cache-dit 1.5.3 on the tiny pipelines of ``tests/families/`` (every case of
every registered family) and print what it does (markdown on stdout).

    python tools/families_oracle.py                 # every case
    python tools/families_oracle.py wan chroma      # some: case names, or family names (all their cases)
    python tools/families_oracle.py --no-cache-dit  # only the structure (no cache-dit runs)

Per family it reports
- the structure: transformer class(es), block ModuleLists (attribute, class, count), diffusers'
  ``TransformerBlockRegistry`` metadata for each block class, and cache-dit's ``BlockAdapter`` for the pipeline
  (block lists, ForwardPattern per list, has_separate_cfg, patch functor, check_forward_pattern) -- read with
  ``skip_post_init=True`` so nothing is patched;
- the transformer calls per denoising step of an UNCACHED run (1 = one call per step / batched CFG, 2 = separate
  cond + uncond calls) and the batch size of each call;
- cache-dit: ``DBCacheConfig(Fn=1, Bn=0, W=2, MC=2, R)`` with ``enable_separate_cfg`` left at cache-dit's default
  (``None`` -> its adapter / pipeline-name rule), R the smallest of ``THRESHOLDS`` that caches >= 1 step; for each
  cache context (one per block list per transformer): cached steps, cfg cached steps, residual diffs; and the number
  of entries ``cache_dit.summary(pipe)`` returns.

Single-threaded: tiny models run fastest that way and other processes share the two cores.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
logging.disable(logging.WARNING)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python tools/families_oracle.py`: tests.families lives in the repository root
    sys.path.insert(0, ROOT)
STEPS = 8
THRESHOLDS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 0.99, 1.0)


def _transformers(pipe) -> dict:
    out = {}
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out[name] = module
    return out


def block_lists(transformer) -> list[tuple[str, str, int]]:
    """(attribute, block class, count) for every ModuleList of modules directly on the transformer, in
    registration order (``named_children``; execution order is checked by hand in docs/families.md)."""
    found = []
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and isinstance(child[0], torch.nn.Module):
            classes = sorted({type(b).__name__ for b in child})
            found.append((name, "/".join(classes), len(child)))
    return found


def registry_metadata(block_class_names: set[str]) -> dict[str, tuple]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    out = {}
    for cls, meta in TransformerBlockRegistry._registry.items():
        if cls.__name__ in block_class_names:
            out[cls.__name__] = (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index)
    return out


def adapter_info(pipe) -> dict:
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    adapter = BlockAdapterRegister.get_adapter(pipe, skip_post_init=True)
    if adapter is None:
        return {"supported": False}
    transformers = adapter.transformer if isinstance(adapter.transformer, list) else [adapter.transformer]
    blocks = adapter.blocks
    if isinstance(blocks, torch.nn.ModuleList):
        blocks = [[blocks]]
    elif isinstance(blocks, list) and blocks and isinstance(blocks[0], torch.nn.ModuleList):
        blocks = [[b] for b in blocks] if len(transformers) > 1 else [blocks]
    names = []
    for t, lists in zip(transformers, blocks):
        names.append([next((n for n, c in t.named_children() if c is bl), "?") + f"[{len(bl)}]" for bl in lists])
    patterns = adapter.forward_pattern
    patterns = patterns if isinstance(patterns, list) else [patterns]
    return {"supported": True, "register_key": next(k for k in BlockAdapterRegister._adapters
                                                     if type(pipe).__name__.startswith(k)),
            "blocks": names, "patterns": [p.name for p in patterns],
            "has_separate_cfg": adapter.has_separate_cfg,
            "separate_cfg_default": BlockAdapterRegister.has_separate_cfg(adapter)
            or BlockAdapterRegister.has_separate_cfg(pipe),
            "patch_functor": type(adapter.patch_functor).__name__ if adapter.patch_functor else None,
            "check_forward_pattern": adapter.check_forward_pattern,
            "dummy_blocks_names": adapter.dummy_blocks_names or None}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def observe_blocks(pipe) -> tuple[dict, list]:
    """Forward hooks on the first block of every block list: how the transformer calls it (positional count,
    keyword names, shapes) and what it really returns (return annotations are wrong for some blocks)."""
    seen, handles = {}, []
    for attr, t in _transformers(pipe).items():
        for name, child in t.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) and isinstance(child[0], torch.nn.Module):
                key = f"{attr}.{name}"

                def hook(module, args, kwargs, output, __key=key):
                    if __key not in seen:
                        seen[__key] = {"args": [_describe(a) for a in args],
                                       "kwargs": {k: _describe(v) for k, v in kwargs.items()},
                                       "out": _describe(output)}

                handles.append(child[0].register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def count_calls(pipe, inputs: dict) -> dict:
    """Uncached run: transformer calls per step (by transformer attribute) and the batch of each call."""
    calls: list[tuple[str, int]] = []
    originals = {}
    seen, handles = observe_blocks(pipe)
    for name, t in _transformers(pipe).items():
        originals[name] = t.forward

        def wrapped(*args, __name=name, __orig=t.forward, **kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            batch = len(hs) if isinstance(hs, (list, tuple)) else hs.shape[0]
            calls.append((__name, batch))
            return __orig(*args, **kwargs)

        t.forward = wrapped
    try:
        t0 = time.perf_counter()
        pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
    finally:
        for name, t in _transformers(pipe).items():
            t.forward = originals[name]
        for handle in handles:
            handle.remove()
    per_transformer = {}
    for name, batch in calls:
        per_transformer.setdefault(name, []).append(batch)
    return {"seconds": seconds, "calls": len(calls), "per_transformer": {k: len(v) for k, v in per_transformer.items()},
            "batches": sorted({b for _, b in calls}), "blocks": seen}


def run_cache_dit(pipe, inputs: dict, threshold: float) -> dict:
    import cache_dit

    config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                     max_warmup_steps=2, max_continuous_cached_steps=2)
    cache_dit.enable_cache(pipe, cache_config=config)
    try:
        pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        manager = pipe._context_manager
        contexts = []
        for name, ctx in manager._cached_context_manager.items():
            contexts.append({
                "context": name.rsplit("_", 1)[0],
                "separate_cfg": ctx.cache_config.enable_separate_cfg,
                "transformer_calls": ctx.transformer_executed_steps,
                "cached": list(ctx.cached_steps), "cfg_cached": list(ctx.cfg_cached_steps),
                "diffs": {int(k): round(float(v), 4) for k, v in ctx.residual_diffs.items()},
                "cfg_diffs": {int(k): round(float(v), 4) for k, v in ctx.cfg_residual_diffs.items()}})
        stats = cache_dit.summary(pipe, logging=False)
        return {"threshold": threshold, "contexts": contexts, "summary_entries": len(stats)}
    finally:
        cache_dit.disable_cache(pipe)


def main(argv: list[str]) -> None:
    with_cache_dit = "--no-cache-dit" not in argv
    from tests.families import CASES, FAMILY_CASES

    wanted = [a for a in argv if not a.startswith("--")]
    names = [case for name in wanted for case in (FAMILY_CASES[name] if name in FAMILY_CASES else [name])]
    for name in names or list(CASES):
        builder, make_inputs = CASES[name].builder, CASES[name].inputs
        print(f"\n### {name} ({CASES[name].family})\n", flush=True)
        try:
            t0 = time.perf_counter()
            pipe = builder()
            build_s = time.perf_counter() - t0
            inputs = make_inputs()
            print(f"- pipeline: `{type(pipe).__name__}` (built in {build_s:.2f} s)")
            classes = set()
            for attr, t in _transformers(pipe).items():
                lists = block_lists(t)
                for _, cls_names, _ in lists:
                    classes.update(cls_names.split("/"))
                print(f"- `{attr}`: `{type(t).__name__}`, block lists: "
                      + ", ".join(f"`{n}` {c} x{k}" for n, c, k in lists))
            meta = registry_metadata(classes)
            print("- diffusers TransformerBlockRegistry (hidden idx, encoder idx): "
                  + (", ".join(f"{k} {v}" for k, v in sorted(meta.items())) or "none registered"))
            info = adapter_info(pipe)
            print(f"- cache-dit adapter: {info}")
            calls = count_calls(pipe, inputs)
            print(f"- uncached run, {STEPS} steps: {calls['seconds']:.2f} s, {calls['calls']} transformer calls "
                  f"{calls['per_transformer']}, call batch sizes {calls['batches']}")
            for key, io in calls["blocks"].items():
                print(f"  - first block of `{key}`: positional {io['args']}, keywords {io['kwargs']} -> {io['out']}")
            if not with_cache_dit or not info.get("supported"):
                continue
            result = previous = None
            for threshold in THRESHOLDS:
                previous, result = result, run_cache_dit(pipe, inputs, threshold)
                if any(c["cached"] or c["cfg_cached"] for c in result["contexts"]):
                    break
            if result["threshold"] >= 1.0 and previous is not None:
                # R >= 1 records -1.0 as the diff: show the real diffs of the last run below 1
                shown = [f"`{c['context']}` {c['diffs']}" + (f" cfg {c['cfg_diffs']}" if c["cfg_diffs"] else "")
                         for c in previous["contexts"]]
                print(f"- cache-dit R{previous['threshold']} cached nothing; its diffs: " + "; ".join(shown))
            print(f"- cache-dit F1B0_W2MC2_R{result['threshold']}: summary() entries {result['summary_entries']}, "
                  f"contexts {len(result['contexts'])}")
            for c in result["contexts"]:
                print(f"  - `{c['context']}` separate_cfg={c['separate_cfg']} calls={c['transformer_calls']} "
                      f"cached={c['cached']} cfg_cached={c['cfg_cached']} diffs={c['diffs']}"
                      + (f" cfg_diffs={c['cfg_diffs']}" if c["cfg_diffs"] else ""))
        except Exception as exc:  # report and go on with the next family
            print(f"- FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3, file=sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
