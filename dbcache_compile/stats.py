"""What ``dbcache_compile.summary()`` returns: the decisions of the last generation."""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["CacheSummary"]


@dataclasses.dataclass
class CacheSummary:
    """Cache decisions of the last generation of one cached transformer.

    Attributes:
        config: the cache config in string form.
        num_steps: denoising steps seen (transformer calls, halved with separate CFG).
        cached_steps: step indices served from the cache (conditional / only branch).
        cfg_cached_steps: same for the unconditional branch with separate CFG (empty otherwise).
        residual_diffs: step -> relative L1 diff of the Fn residual, for steps whose gates allowed a diff
            (``-1.0``: threshold >= 1, hit without a diff), as cache-dit records them.
        cfg_residual_diffs: same for the unconditional branch.
        separate_cfg: whether the last generation ran with separate CFG state.
        lowering: ``"eager"``, ``"segments"``, ``"regional"`` or ``"cond"``.
        mode: the ``torch.compile`` mode, or ``None`` for eager.
        num_blocks / Fn / Bn: the block split.
        cudagraphs: CUDA-graph status of the compiled graphs.
        quantized: the torchao quantization applied (``None`` when none).
        attention: the diffusers attention backend set by ``optimize(attention=...)`` (``None``: untouched).
        fused_qkv: whether ``optimize(fuse_qkv=True)`` fused the attention projections.
        family: the model family's name (``"flux"``, ``"wan"``, ...; ``"generic"`` for a model in no family).
        prologue: whether whole steps run in our forward (a family with a prologue), else the model's own forward
            with block hooks.
        recipe: the kernel recipe of the compiled graphs (``None`` eager; :mod:`dbcache_compile.recipe`).
        vae: what was compiled of the pipeline's VAE (``None``: nothing; :mod:`dbcache_compile.vae`).
        branches: per cache context the pipeline entered (``"cond"``, ``"uncond"``, ``"cond_uncond"``, ...), in
            first-use order: ``{"calls": n, "cached_steps": [...]}``.
        compile_fallbacks: compiled function -> calls that ran uncompiled because torch's recompile limit for it was
            reached (empty when all is compiled).
        chains: families run through their own forward (cache-dit's contexts, e.g. HunyuanVideo's double and single
            blocks, each deciding on its own): per chain ``{"cached_steps", "cfg_cached_steps", "residual_diffs", "num_blocks",
            "branches"}`` (``branches``: cached steps per cache context, as ``branches`` above); ``cached_steps`` /
            ``residual_diffs`` above are the first chain's.
        lowerings: the lowerings the family can run (``optimize(graph=...)``).
        transformers: the pipeline's other denoisers (``"transformer_2"`` of Wan 2.2), each its own summary.
        compiled_graphs: ``{"reused": n, "compiled": m}``: Dynamo graphs taken from the process-wide store of
            compiled functions (compiled by an earlier ``optimize`` of the same model class, config, lowering and
            block split) and graphs compiled while this runtime ran.
    """

    config: str
    num_steps: int
    cached_steps: list[int]
    cfg_cached_steps: list[int]
    residual_diffs: dict[int, float]
    cfg_residual_diffs: dict[int, float]
    separate_cfg: bool
    lowering: str
    mode: Optional[str]
    num_blocks: int
    Fn: int
    Bn: int
    cudagraphs: Optional[str] = None
    quantized: Optional[str] = None
    attention: Optional[str] = None
    fused_qkv: bool = False
    family: str = ""
    prologue: bool = False
    recipe: Optional[str] = None
    vae: Optional[str] = None
    branches: dict[str, dict] = dataclasses.field(default_factory=dict)
    compile_fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    chains: dict[str, dict] = dataclasses.field(default_factory=dict)
    transformers: dict[str, "CacheSummary"] = dataclasses.field(default_factory=dict)
    lowerings: tuple[str, ...] = ()
    compiled_graphs: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def compute_steps(self) -> list[int]:
        cached = set(self.cached_steps)
        return [s for s in range(self.num_steps) if s not in cached]

    @property
    def block_ratio(self) -> float:
        """Transformer blocks of an uncached run divided by blocks executed (all branches, all chains); >= 1.

        With several chains each skips its own middle blocks (``num_blocks - Fn - Bn`` of that chain) on its own
        cached steps. Blocks dominate a DiT's FLOPs; ``bench`` measures the exact FLOP ratio with calflops."""
        if self.branches:
            calls = sum(b["calls"] for b in self.branches.values())
        else:
            calls = self.num_steps * (2 if self.separate_cfg else 1)
        full = calls * self.num_blocks
        if self.chains:
            skipped = sum(len(steps) * (chain["num_blocks"] - self.Fn - self.Bn)
                          for chain in self.chains.values() for steps in chain["branches"].values())
        elif self.branches:
            skipped = (sum(len(b["cached_steps"]) for b in self.branches.values())
                       * (self.num_blocks - self.Fn - self.Bn))
        else:
            skipped = (len(self.cached_steps) + len(self.cfg_cached_steps)) * (self.num_blocks - self.Fn - self.Bn)
        executed = full - skipped
        return full / executed if executed else float("nan")

    def __str__(self) -> str:
        lines = [
            f"DBCache {self.config} on {self.num_blocks} blocks (Fn={self.Fn}, Bn={self.Bn}); "
            f"lowering={self.lowering}, mode={self.mode}"
            + (f", family={self.family}" + (" (prologue)" if self.prologue else "") if self.family else "")
            + (f" (lowerings: {', '.join(self.lowerings)})" if self.lowerings else "")
            + (f", cudagraphs={self.cudagraphs}" if self.cudagraphs else "")
            + (f", quantized={self.quantized}" if self.quantized else "")
            + (f", attention={self.attention}" if self.attention else "")
            + (", fused QKV" if self.fused_qkv else ""),
        ]
        if self.recipe or self.vae:
            lines.append("  compiled: transformer" + (f" (recipe: {self.recipe})" if self.recipe else "")
                         + (f"; VAE: {self.vae}" if self.vae else "; VAE: not compiled"))
        if len(self.chains) > 1:
            # each block list decides on its own: no one "cached" list for the model
            lines.append(f"  steps: {self.num_steps}; {len(self.chains)} block lists, each with its own cache "
                         f"decision:")
            for name, chain in self.chains.items():
                branches = chain["branches"] or {"cond": chain["cached_steps"]}
                cached = "; ".join(f"{branch} cached {len(steps)} {steps}" for branch, steps in branches.items())
                lines.append(f"    {name} ({chain['num_blocks']} blocks): {cached}")
                if chain["residual_diffs"]:
                    diffs = ", ".join(f"{k}:{v:.4f}" for k, v in sorted(chain["residual_diffs"].items()))
                    lines.append(f"      residual diffs ({next(iter(branches))}): {diffs}")
        else:
            lines.append(f"  steps: {self.num_steps}, cached: {len(self.cached_steps)} {self.cached_steps}")
            if self.separate_cfg:
                lines.append(f"  uncond branch cached: {len(self.cfg_cached_steps)} {self.cfg_cached_steps}")
            for name, branch in list(self.branches.items())[2:]:
                lines.append(f"  {name} branch: {branch['calls']} calls, cached {len(branch['cached_steps'])} "
                             f"{branch['cached_steps']}")
            if self.residual_diffs:
                diffs = ", ".join(f"{k}:{v:.4f}" for k, v in sorted(self.residual_diffs.items()))
                lines.append(f"  residual diffs: {diffs}")
        lines.append(f"  block ratio (uncached / executed): {self.block_ratio:.2f}x")
        for name, other in self.transformers.items():
            lines.append(f"  {name}: " + str(other).replace("\n", "\n  "))
        if self.compile_fallbacks:
            lines.append(f"  recompile limit reached, calls run uncompiled: {self.compile_fallbacks}")
        if self.mode is not None and self.compiled_graphs:
            lines.append(f"  graphs: {self.compiled_graphs.get('reused', 0)} reused from the compile store, "
                         f"{self.compiled_graphs.get('compiled', 0)} compiled")
        return "\n".join(lines)
