"""Model-family adapters: which block lists form the cached chain, how the transformer embeds its inputs before the
blocks and projects after them, and whether its pipeline runs CFG as separate transformer calls.

An adapter is registered for transformer classes (torchao-style registry: adding a family touches one file).
Blocks are called ``block(hidden_states=h, encoder_hidden_states=e, **block_kwargs)`` and return ``(e, h)``
(cache-dit's ForwardPattern_1, shared by FLUX.1 and Qwen-Image).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["Adapter", "Embedded", "register_adapter", "adapter_for", "adapter_named", "supported_models"]


class Embedded:
    """What the adapter's ``embed`` returns: streams entering the first block and what the blocks/output need."""

    __slots__ = ("hidden", "encoder", "block_kwargs", "out_kwargs")

    def __init__(self, hidden: torch.Tensor, encoder: torch.Tensor, block_kwargs: dict[str, Any],
                 out_kwargs: dict[str, Any]) -> None:
        self.hidden = hidden
        self.encoder = encoder
        self.block_kwargs = block_kwargs
        self.out_kwargs = out_kwargs


class Adapter:
    """Base class. Subclasses set ``name``, ``block_lists`` and implement ``embed`` / ``project``."""

    name: str = "base"
    #: attribute names of the transformer's block ModuleLists, in execution order; they form ONE cached chain.
    block_lists: tuple[str, ...] = ()
    #: whether the model's attention processors use diffusers' fused QKV projections once fused
    fused_qkv: bool = False
    #: the forward's attention-kwargs argument, whose ``"scale"`` entry scales PEFT LoRA layers (diffusers
    #: ``apply_lora_scale``)
    attention_kwargs: str = "joint_attention_kwargs"

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for attr in self.block_lists:
            out.extend(getattr(transformer, attr))
        return out

    def embed(self, transformer: torch.nn.Module, *args: Any, **kwargs: Any) -> Embedded:
        raise NotImplementedError

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    #: the forward's positional argument names (to read positional calls), and the linear that embeds the hidden
    #: stream (its ``out_features`` is the width of both streams): what :meth:`stream_shapes` needs
    signature: tuple[str, ...] = ()
    embedder: str = ""
    #: ``true_cfg_scale`` of a pipeline call that does not pass one (for :meth:`separate_cfg`)
    default_true_cfg_scale = 1.0

    def stream_shapes(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
        """``((hidden shape, dtype), (encoder shape, dtype))`` of the streams leaving the Fn blocks for these inputs,
        without running anything (the cache's buffers are allocated from it before the first step, so that step runs
        the same compiled code as every later one); ``None`` when the adapter cannot tell (the first step then runs
        the segments uncompiled and allocates from its outputs). The default fits dual-stream models whose streams
        keep the width of the ``embedder`` linear, and whose first block broadcasts the encoder stream to the hidden
        stream's batch (its modulation is per image)."""
        if not self.embedder:
            return None
        kwargs = dict(zip(self.signature, args), **kwargs)
        hidden, encoder = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        width = getattr(transformer, self.embedder).out_features
        batch = max(hidden.shape[0], encoder.shape[0])
        return (((hidden.shape[0], hidden.shape[1], width), hidden.dtype),
                ((batch, encoder.shape[1], width), encoder.dtype))

    def eager_inputs(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Inputs computed outside the compiled graphs, before every step (added to ``kwargs``, read by
        :meth:`embed`). Default: none."""
        return kwargs

    def separate_cfg(self, call_kwargs: dict[str, Any]) -> bool:
        """Whether a pipeline call with these kwargs runs conditional and unconditional as separate forwards (FLUX's
        and Qwen-Image's pipelines: ``true_cfg_scale > 1`` and a negative prompt). The runtime does not need this (it
        follows the pipeline's cache contexts); it configures peers that must be told, such as cache-dit's
        ``enable_separate_cfg`` in the benchmark and parity tests."""
        has_negative = (call_kwargs.get("negative_prompt") is not None
                        or call_kwargs.get("negative_prompt_embeds") is not None)
        return call_kwargs.get("true_cfg_scale", self.default_true_cfg_scale) > 1 and has_negative


_REGISTRY: list[tuple[tuple[type, ...], Adapter]] = []


def register_adapter(transformer_classes: tuple[type, ...], adapter: Adapter) -> None:
    _REGISTRY.append((transformer_classes, adapter))


def _load_builtin() -> None:
    if not _REGISTRY:
        from . import flux, qwen_image  # noqa: F401  (registers on import)


def adapter_for(transformer: torch.nn.Module) -> Adapter:
    """The adapter for this transformer instance, or a ``ValueError`` listing what is supported."""
    _load_builtin()
    for classes, adapter in _REGISTRY:
        if isinstance(transformer, classes):
            return adapter
    raise ValueError(f"dbcache_compile has no adapter for {type(transformer).__name__}; supported transformers: "
                     f"{', '.join(supported_models())}")


def adapter_named(name: str) -> Adapter:
    """The registered adapter called ``name`` (``"flux"``, ``"qwen-image"``)."""
    _load_builtin()
    for _, adapter in _REGISTRY:
        if adapter.name == name:
            return adapter
    raise ValueError(f"no adapter named {name!r}; registered: {[a.name for _, a in _REGISTRY]}")


def supported_models() -> list[str]:
    _load_builtin()
    return [cls.__name__ for classes, _ in _REGISTRY for cls in classes]


def reject_unsupported(kwargs: dict[str, Any], names: tuple[str, ...], model: str) -> None:
    """Raise ``NotImplementedError`` for forward arguments the cached forward does not implement."""
    for name in names:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{model}: the cached forward does not support `{name}` yet; "
                                      f"call dbcache_compile.disable() for this pipeline")

