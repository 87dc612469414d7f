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

__all__ = ["cp_group", "relative_l1_over", "inner_hooks", "split_like", "check_same_config", "CP_INPUT"]

#: prefix of the names diffusers gives its context-parallel split hooks (``cp_input---<module>``)
CP_INPUT = "cp_input---"


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
