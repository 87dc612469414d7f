"""DBCache under diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``,
Ulysses / Ring on ``torch.distributed``), with the same decision on every rank.

Under context parallelism each rank holds a shard of the sequence, so the Fn residual is a shard too. A decision
taken on a shard differs between ranks, and ranks that take different paths pair up the wrong collectives (a hang,
or silently mixed tensors). So the relative L1 diff is computed over the whole tensor: the sums of ``|prev - cur|``
and ``|prev|`` are all-reduced over the context-parallel group with one functional collective
(``torch.distributed._functional_collectives.all_reduce``), which traces into compiled graphs (``fullgraph=True``,
0 graph breaks); the host still reads the device once per step whose gates allow a hit. Every rank then holds the
same diff, bit for bit, and takes the same path. (cache-dit 1.5.3 does the same with two blocking ``all_reduce(AVG)``
calls of the per-rank means outside its graphs.)

Where diffusers shards the streams matters for the residual's base (``docs/context_parallel.md``): FLUX splits the
transformer's inputs in a hook on the root module (before the embeddings), Qwen-Image in a hook on the first block
(after them). Hooks that run inside a call we make fire by themselves; the ones we must apply ourselves are the
transformer's own (root) hooks registered before our hook (:func:`inner_hooks`) and the first block's split of the
residual's base (:func:`split_like`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["cp_group", "relative_l1_over", "inner_hooks", "split_like", "check_same_config", "plan_conflicts",
           "check_plan", "CP_INPUT", "CP_OUTPUT", "STREAM_ARGUMENTS"]

#: prefix of the names diffusers gives its context-parallel split hooks (``cp_input---<module>``)
CP_INPUT = "cp_input---"
#: prefix of the names diffusers gives its context-parallel gather hooks (``cp_output---<module>``)
CP_OUTPUT = "cp_output---"
#: the block arguments that carry the streams whose residuals a chain caches (plus the names diffusers'
#: ``TransformerBlockRegistry`` gives for a block class); a block's split of any other input (Qwen-Image's per-block
#: ``encoder_hidden_states_mask`` / ``modulate_index``) leaves the streams as they are
STREAM_ARGUMENTS = ("hidden_states", "encoder_hidden_states")


def cp_group(transformer: torch.nn.Module) -> Optional[Any]:
    """The context-parallel process group of ``transformer`` (``None`` without context parallelism, or with one
    rank)."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group()


def relative_l1_over(prev: torch.Tensor, cur: torch.Tensor, group: Any) -> torch.Tensor:
    """``sum|prev - cur| / sum|prev|`` over the shards of every rank in ``group`` (float32 sums, one functional
    all-reduce): the relative L1 diff of the whole tensor, identical on every rank."""
    from torch.distributed import _functional_collectives as funcol
    sums = torch.stack([(prev - cur).abs().sum(dtype=torch.float32), prev.abs().sum(dtype=torch.float32)])
    sums = funcol.all_reduce(sums, "sum", group)
    return sums[0] / sums[1]


def inner_hooks(module: torch.nn.Module, name: str) -> list[Any]:
    """The hooks of ``module``'s diffusers registry that sit inside hook ``name`` (registered before it), outermost
    first: a hook that replaces the forward must apply their ``pre_forward`` / ``post_forward`` itself."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return []
    order = registry._hook_order
    return [registry.hooks[n] for n in reversed(order[:order.index(name)])]


def split_like(block: torch.nn.Module, hidden: torch.Tensor, argument: str = "hidden_states",
               before: Optional[str] = None) -> torch.Tensor:
    """``hidden`` sharded the way ``block``'s context-parallel split hooks shard its ``argument`` (only the hooks
    registered before hook ``before``, when given: later ones already ran before us). Unchanged without such
    hooks."""
    registry = getattr(block, "_diffusers_hook", None)
    if registry is None:
        return hidden
    names = registry._hook_order
    if before is not None and before in names:
        names = names[:names.index(before)]
    for hook_name in names:
        hook = registry.hooks[hook_name]
        plan = getattr(hook, "metadata", None)
        if hook_name.startswith(CP_INPUT) and isinstance(plan, dict) and argument in plan:
            # the hook looks up every input of its plan: the others are absent (None: skipped)
            _, kwargs = hook.pre_forward(block, **dict(dict.fromkeys(plan), **{argument: hidden}))
            hidden = kwargs[argument]
    return hidden


def check_same_config(config: Any, group: Any, device: torch.device) -> None:
    """Every rank must run the same cache config, or their decisions (and then their collectives) part ways: compare
    a digest of ``str(config)`` across ``group`` once per generation (one small all-gather) and raise the same
    ``ValueError`` on every rank when they differ."""
    import hashlib

    import torch.distributed as dist
    digest = int.from_bytes(hashlib.sha256(str(config).encode()).digest()[:7], "big")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    digests = [int(t.item()) for t in everyone]
    if len(set(digests)) > 1:
        raise ValueError(f"dbcache_compile: the ranks of the context-parallel group run different cache configs (this "
                         f"rank: {config}); every rank must call optimize() with the same config")


def _plan_points(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, Any]]:
    """``(plan key, module, plan entry)`` of every split / gather point of ``transformer``'s context-parallel plan:
    the hooks ``enable_parallelism`` registered (whatever plan it was given), else, before ``enable_parallelism``,
    the transformer's ``_cp_plan`` (instance or class attribute) resolved as diffusers resolves it."""
    points = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "_hook_order", ()):
            if name.startswith((CP_INPUT, CP_OUTPUT)):
                points.append((name.split("---", 1)[1], module, registry.hooks[name].metadata))
    if points or getattr(transformer, "_parallel_config", None) is not None:
        return points
    plan = getattr(transformer, "_cp_plan", None) or {}
    if not plan:
        return points
    from diffusers.hooks.context_parallel import _get_submodule_by_name
    for key, entry in plan.items():
        modules = _get_submodule_by_name(transformer, key)
        points.extend((key, m, entry) for m in (modules if isinstance(modules, list) else [modules]))
    return points


def _stream_arguments(block: torch.nn.Module) -> set[str]:
    names = set(STREAM_ARGUMENTS)
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
        meta = TransformerBlockRegistry.get(type(block))
        names.update(n for n in (meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name) if n)
    except Exception:  # not registered
        pass
    return names


def plan_conflicts(transformer: torch.nn.Module, blocks: list[torch.nn.Module], fn: int, bn: int) -> list[str]:
    """The points of ``transformer``'s context-parallel plan that change how a stream is sharded inside the cached
    part of a chain (``blocks``, with ``fn`` first and ``bn`` last blocks always computed): one line each, naming the
    module. Empty when the plan is safe for this split.

    The cache keeps residuals between fixed points of the chain: the Fn residual (output of block ``fn - 1`` minus
    input of block 0) and the middle residual (output of the last middle block minus input of block ``fn``); on a
    hit the middle blocks do not run. Both ends of a residual must be sharded alike, so no split or gather may sit
    on (or inside) the Fn or middle blocks, except

    * a split of block 0's stream inputs (the chain's entry: Qwen-Image, Wan, ChronoEdit; the residual's base is
      sharded the same way, :func:`split_like`);
    * a split of a block input that is not a stream (Qwen-Image's per-block mask, MiniMax-H3's ``adaln_indices``);
    * a module that splits its inputs and gathers its outputs (whole streams in and out: Helios' ``attn1`` /
      ``attn2`` / ``ffn``).

    Splits and gathers before the chain (FLUX's root split), on the Bn blocks, or after the chain (``proj_out``) are
    safe: the Bn blocks run on every step. The rule is conservative: a gather and a re-split that cancel out inside
    the middle blocks would cache correctly but are reported too."""
    where = {}
    for i, block in enumerate(blocks):
        for sub in block.modules():
            where.setdefault(id(sub), i)
    middle_end = len(blocks) - bn
    per_module: dict[int, dict[str, Any]] = {}
    for key, module, entry in _plan_points(transformer):
        i = where.get(id(module))
        if i is None or i >= middle_end:
            continue
        info = per_module.setdefault(id(module), {"keys": [], "inputs": set(), "out_split": False, "gather": False,
                                                   "index": i, "module": module})
        info["keys"].append(key)
        if isinstance(entry, dict):
            for arg, spec in entry.items():
                specs = spec if isinstance(spec, (list, tuple)) else [spec]
                if any(getattr(x, "split_output", False) for x in specs):
                    info["out_split"] = True
                else:
                    info["inputs"].add(arg)
        else:
            info["gather"] = True
    problems = []
    for info in per_module.values():
        i, module = info["index"], info["module"]
        is_block = module is blocks[i]
        streams = info["inputs"] & _stream_arguments(module) if is_block else info["inputs"]
        if streams and info["gather"] and not info["out_split"]:
            continue  # whole streams in and out
        if is_block and i == 0 and not info["gather"] and not info["out_split"]:
            continue  # the chain's entry split (or non-stream inputs)
        if is_block and not streams and not info["gather"] and not info["out_split"]:
            continue  # only non-stream inputs split
        what = [w for w, on in (("splits its inputs " + ", ".join(sorted(streams)), bool(streams)),
                                ("splits its outputs", info["out_split"]), ("gathers its outputs", info["gather"]))
                if on]
        part = f"one of the first {fn} (Fn) blocks" if i < fn else "one of the middle (cached) blocks"
        name = next((n for n, m in transformer.named_modules() if m is module), "/".join(info["keys"]))
        keys = [k for k in dict.fromkeys(info["keys"]) if k != name]
        entry = f" (plan entry {' / '.join(repr(k) for k in keys)})" if keys else ""
        problems.append(f"{name!r}{entry} {' and '.join(what)}: it is {'' if is_block else 'inside '}block {i} of "
                        f"the chain, {part}")
    return problems


def check_plan(transformer: torch.nn.Module, chains: list[tuple[list[torch.nn.Module], int, int]]) -> None:
    """Refuse (``ValueError`` naming the modules) a cache split whose Fn / middle blocks contain a point where
    ``transformer``'s context-parallel plan splits or gathers a stream (:func:`plan_conflicts`): its residuals would
    subtract a shard from a whole tensor (a shape error at the first step) or cache a mix of both. ``chains``:
    ``(blocks, Fn, Bn)`` per chain. A no-op without a plan."""
    problems = [p for blocks, fn, bn in chains for p in plan_conflicts(transformer, list(blocks), fn, bn)]
    if problems:
        raise ValueError(f"dbcache_compile: the context-parallel plan of {type(transformer).__name__} splits or "
                         f"gathers the sequence inside the blocks the cache computes residuals over: "
                         f"{'; '.join(problems)}. Splits and gathers must lie before the chain's first block (or on "
                         f"its inputs), on the last Bn blocks, or after the chain: use a plan that does (diffusers' "
                         f"own plans for FLUX, FLUX.2, Qwen-Image, Wan, LTX do), or choose Fn / Bn so that these "
                         f"modules fall in the Bn blocks")
