"""The whole pipeline: ``optimize(pipe, mode=...)`` also compiles the VAE decode.

With a compile mode and a pipeline whose ``vae`` is an ``AutoencoderKL`` (FLUX.1, SD3, ...) on a CUDA device,
``optimize`` compiles the VAE's ``decoder`` (the whole decode but the optional ``post_quant_conv``) with the
transformer's mode and the same kernel recipe, its 2-D convolution weights and input in ``channels_last`` (what
Inductor's convolution kernels prefer). ``compile_vae=False`` opts out; ``compile_vae=True`` compiles any pipeline
VAE's decoder on any device (other VAE classes, such as the video VAEs with frame caches, are not tested, and on a
CPU a compiled decode is not measured to pay for its compile: the default leaves both alone);
``compile_vae="default"`` (any ``torch.compile`` mode) gives the VAE its own mode. ``disable()`` removes it and
restores the weights' memory format: the decode is then exactly the original. ``summary().vae`` says what was
compiled.

The decoder is attached the diffusers way (a ``ModelHook`` in the decoder's ``HookRegistry``), compiled through its
own code object (its own recompile budget, released at ``disable()``), ``fullgraph=True``. CUDA graphs stay off
for it (``reduce-overhead`` -> ``default``, ``max-autotune`` -> ``max-autotune-no-cudagraphs``): the decode runs once
per image with large kernels, so graph replay saves next to nothing, while a cudagraph-tree pool would keep the
decoder's activations (gigabytes at 1024²) allocated for good.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["HOOK_NAME", "DEFAULT_CLASSES", "VaePlan", "prepare"]

HOOK_NAME = "dbcache_compile_vae"
#: VAE classes compiled by default (with a compile mode); others only with ``compile_vae=True``
DEFAULT_CLASSES = ("AutoencoderKL",)


@dataclasses.dataclass
class VaePlan:
    """A validated ``compile_vae`` request: :meth:`apply` attaches it and returns ``(description, undo)``."""

    vae: torch.nn.Module
    mode: str
    options: dict[str, Any]

    def apply(self) -> tuple[str, Callable[[], None]]:
        from diffusers.hooks.hooks import HookRegistry, ModelHook

        import hashlib
        import json

        from .compiled import CompiledSet, regional_options
        decoder = self.vae.decoder
        options = regional_options(self.options)
        # the compile store's key: the VAE's class and config (another optimize of the same VAE reuses the graph)
        config = json.dumps(dict(getattr(self.vae, "config", {}) or {}), sort_keys=True, default=str)
        compiled = CompiledSet(("vae", type(self.vae).__module__, type(self.vae).__qualname__,
                                hashlib.sha1(config.encode()).hexdigest()))
        forward = compiled.compile_method("decoder", type(decoder).forward, decoder, options)
        # 2-D convolution weights go channels_last (a 3-D video VAE's 5-D weights stay as they are)
        plain = {name for name, p in decoder.named_parameters()
                 if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)}

        class DecoderHook(ModelHook):
            def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if sample.dim() == 4:
                    sample = sample.contiguous(memory_format=torch.channels_last)
                out = forward(sample, *args, **kwargs)
                return out.contiguous() if isinstance(out, torch.Tensor) else out

        created = not hasattr(decoder, "_diffusers_hook")
        for name, param in decoder.named_parameters():
            if name in plain:
                param.data = param.data.contiguous(memory_format=torch.channels_last)
        registry = HookRegistry.check_if_exists_or_initialize(decoder)
        registry.register_hook(DecoderHook(), HOOK_NAME)

        def undo() -> None:
            compiled.release()
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:
                bound = vars(decoder).get("forward")
                if getattr(bound, "__func__", None) is type(decoder).forward:
                    del decoder.forward
                if created:
                    del decoder._diffusers_hook
            for name, param in decoder.named_parameters():
                if name in plain:
                    param.data = param.data.contiguous()

        mode = options.get("mode") or "backend " + str(options.get("backend"))
        layout = ", channels_last" if plain else ""
        return f"{type(self.vae).__name__}.decoder compiled ({mode}{layout})", undo


def prepare(pipeline: Any, mode: Optional[str], compile_vae: Union[bool, str, None],
            options: Optional[dict[str, Any]]) -> Optional[VaePlan]:
    """Validate ``compile_vae`` for this call of ``optimize`` (module doc); ``None`` when nothing is to compile
    (``compile_vae=None``: an ``AutoencoderKL`` on CUDA with a compile mode is compiled).

    ``options``: the transformer's ``torch.compile`` options (mode, recipe, user options), reused for the VAE."""
    from .optimize import COMPILE_MODES
    if compile_vae not in (None, True, False) and compile_vae not in COMPILE_MODES[1:]:
        raise ValueError(f"compile_vae must be None (compile an AutoencoderKL when a mode is given), True, False or a "
                         f"torch.compile mode {COMPILE_MODES[1:]}, got {compile_vae!r}")
    if compile_vae is False:
        return None
    vae = getattr(pipeline, "vae", None) if pipeline is not None else None
    decoder = getattr(vae, "decoder", None)
    if compile_vae is None:
        if (mode is None or not isinstance(decoder, torch.nn.Module) or type(vae).__name__ not in DEFAULT_CLASSES
                or next(vae.parameters()).device.type != "cuda"):
            return None
    else:
        if not isinstance(decoder, torch.nn.Module):
            what = "a bare transformer" if pipeline is None else f"{type(pipeline).__name__} (no vae.decoder)"
            raise ValueError(f"compile_vae={compile_vae!r}: there is no VAE decoder to compile on {what}; pass the "
                             f"pipeline, or leave compile_vae unset")
        if compile_vae is True and mode is None:
            raise ValueError("compile_vae=True needs a compile mode (mode='max-autotune', ...), or name the VAE's own "
                             "mode: compile_vae='default'")
    registry = getattr(decoder, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("this pipeline's VAE decoder is already compiled by dbcache_compile; call "
                         "dbcache_compile.disable() first")
    vae_mode = compile_vae if isinstance(compile_vae, str) else mode
    vae_options = dict(options or {})
    if "backend" not in vae_options:
        vae_options["mode"] = vae_mode
    vae_options["fullgraph"] = True
    return VaePlan(vae, vae_mode, vae_options)
