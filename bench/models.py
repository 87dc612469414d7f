"""The pipelines a benchmark runs: the embedded digits model, a local diffusers directory, or a full-size
architecture with random weights.

Each is wrapped in a :class:`BenchModel` that knows how to build the pipeline call for prompt ``i`` and how to get
a fresh, unquantized transformer (quantization with torchao is done in place and cannot be undone).

Random weights: the transformer is the real diffusers class with the published config and seeded random weights,
built directly on the device in the benchmark dtype. The pipeline around it has no text encoders (prompt
embeddings of the right shape are drawn from the prompt's seed). FLUX pipelines keep a VAE with random weights (the
FLUX.1 VAE architecture for ``flux``) and decode every call (``output_type="pt"``), so the timed call is the whole
pipeline after the text encoders; Qwen-Image returns latents. Latency only: the images say nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       QwenImagePipeline, QwenImageTransformer2DModel)

__all__ = ["BenchModel", "RANDOM_WEIGHTS", "FLUX_DEV_CONFIG", "QWEN_IMAGE_CONFIG", "load_model"]

#: ``FluxTransformer2DModel`` config of black-forest-labs/FLUX.1-dev (19 double + 38 single blocks, 11.9 B params).
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
#: ``AutoencoderKL`` config of FLUX.1-dev's VAE (16 latent channels, 8x downsampling, 83.8 M params).
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
#: A small VAE with the same 8x downsampling for ``flux-narrow`` (its 16 input channels are 4 latent channels).
NARROW_VAE_CONFIG: dict[str, Any] = dict(FLUX_VAE_CONFIG, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                         latent_channels=4)
#: FLUX.1-dev's scheduler config.
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
#: T5 tokens per prompt in FluxPipeline (``max_sequence_length=512``); the embedding widths come from the config.
FLUX_TEXT_TOKENS = 512

#: ``QwenImageTransformer2DModel`` config of Qwen/Qwen-Image (60 dual-stream blocks, 20.4 B params).
QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56)}
#: Qwen-Image's scheduler config.
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}
#: Text tokens per prompt for random-weights Qwen-Image: the seed's 274.33 TFLOPs for 4 Lightning steps at 1024²
#: are what this benchmark counts with 27 tokens (68.37 TFLOPs per forward at 16 tokens, 69.32 at 64).
QWEN_TEXT_TOKENS, QWEN_TEXT_DIM = 27, 3584

#: FLUX.1-dev's depth (19 double + 38 single blocks) at a tiny width: compile-time studies on a CPU (compile time
#: grows with the number of blocks a graph holds; the width barely matters to it).
FLUX_NARROW_CONFIG: dict[str, Any] = dict(FLUX_DEV_CONFIG, in_channels=16, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                          axes_dims_rope=(4, 6, 6))

RANDOM_WEIGHTS = ("flux", "qwen-image", "flux-tiny", "flux-narrow")
FAMILIES = {FluxTransformer2DModel: "flux", QwenImageTransformer2DModel: "qwen-image"}


@dataclasses.dataclass
class BenchModel:
    """A pipeline under benchmark.

    Attributes:
        name: what the results call the model.
        family: ``"flux"`` or ``"qwen-image"`` (picks the default configs).
        pipe: the diffusers pipeline (its progress bar disabled).
        device: where it runs.
        images: whether a call returns images in [0, 1] (``False``: latents, quality n/a).
        prompt_inputs: whether the prompt text is the model's input (``False``: prompts only index seeds/labels).
        make_inputs: ``(i, prompt) -> pipeline kwargs`` for prompt ``i`` (a fresh generator seeded ``seed + i``).
        make_transformer: builds a fresh, unquantized transformer (for the quantized modes).
        after_transformer: re-applies what loading added to the transformer (a fused LoRA), or ``None``.
        extra_metric: ``(column name, (i, images) -> score)`` for a model-specific quality score, or ``None``.
    """

    name: str
    family: str
    pipe: Any
    device: torch.device
    images: bool
    prompt_inputs: bool
    make_inputs: Callable[[int, str], dict[str, Any]]
    make_transformer: Callable[[], torch.nn.Module]
    after_transformer: Optional[Callable[[Any], None]] = None
    extra_metric: Optional[tuple[str, Callable[[int, torch.Tensor], float]]] = None

    def output_images(self, output: Any) -> Optional[torch.Tensor]:
        """The call's images as float ``(N, C, H, W)`` in [0, 1] on the CPU, or ``None`` for latents."""
        if not self.images:
            return None
        images = output.images
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected the pipeline to return a tensor (output_type='pt'), got {type(images)}")
        return images.detach().float().cpu()

    def replace_transformer(self) -> None:
        """Drop the current transformer (freeing its memory first) and install a fresh, unquantized one."""
        self.pipe.transformer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pipe.transformer = self.make_transformer().to(self.device).eval()
        if self.after_transformer is not None:
            self.after_transformer(self.pipe)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _random_module(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                   seed: int) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights, created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return transformer.eval()


def _random_weights(kind: str, device: torch.device, dtype: torch.dtype, steps: int, height: int, width: int,
                    seed: int, true_cfg_scale: float) -> BenchModel:
    if kind == "flux-tiny":
        from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
        pipe = tiny_flux_pipeline(seed).to(device=device, dtype=dtype)

        def make_inputs(i: int, prompt: str) -> dict[str, Any]:
            kwargs = flux_inputs(seed=seed + i)
            kwargs.update(prompt_embeds=kwargs["prompt_embeds"].to(device, dtype),
                          pooled_prompt_embeds=kwargs["pooled_prompt_embeds"].to(device, dtype),
                          height=height, width=width, output_type="pt", num_inference_steps=steps,
                          generator=_generator(seed + i))
            return kwargs

        return BenchModel("tiny FLUX (random weights, dbcache_compile.testing)", "flux", pipe, device, False, False,
                          make_inputs, lambda: tiny_flux_pipeline(seed).transformer.to(dtype))

    if kind in ("flux", "flux-narrow"):
        config = FLUX_DEV_CONFIG if kind == "flux" else FLUX_NARROW_CONFIG
        text_dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]

        def make_transformer() -> torch.nn.Module:
            return _random_module(FluxTransformer2DModel, config, device, dtype, seed)

        vae = _random_module(AutoencoderKL, FLUX_VAE_CONFIG if kind == "flux" else NARROW_VAE_CONFIG, device,
                             dtype, seed + 1)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=make_transformer())

        def make_inputs(i: int, prompt: str) -> dict[str, Any]:
            g = _generator(seed + i)
            return {"prompt_embeds": torch.randn(1, FLUX_TEXT_TOKENS, text_dim, generator=g).to(device, dtype),
                    "pooled_prompt_embeds": torch.randn(1, pooled_dim, generator=g).to(device, dtype),
                    "height": height, "width": width, "num_inference_steps": steps, "guidance_scale": 3.5,
                    "output_type": "pt", "generator": g}

        name = ("FLUX.1-dev architecture (random weights)" if kind == "flux"
                else "FLUX.1-dev depth at a tiny width (random weights, bench.models.FLUX_NARROW_CONFIG)")
    else:
        def make_transformer() -> torch.nn.Module:
            return _random_module(QwenImageTransformer2DModel, QWEN_IMAGE_CONFIG, device, dtype, seed)

        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=None,
                                 text_encoder=None, tokenizer=None, transformer=make_transformer())

        def make_inputs(i: int, prompt: str) -> dict[str, Any]:
            g = _generator(seed + i)
            kwargs = {"prompt_embeds": torch.randn(1, QWEN_TEXT_TOKENS, QWEN_TEXT_DIM, generator=g).to(device, dtype),
                      "prompt_embeds_mask": torch.ones(1, QWEN_TEXT_TOKENS, dtype=torch.long, device=device),
                      "height": height, "width": width, "num_inference_steps": steps,
                      "true_cfg_scale": true_cfg_scale, "output_type": "latent", "generator": g}
            if true_cfg_scale > 1:
                kwargs["negative_prompt_embeds"] = torch.randn(1, QWEN_TEXT_TOKENS, QWEN_TEXT_DIM,
                                                               generator=g).to(device, dtype)
                kwargs["negative_prompt_embeds_mask"] = kwargs["prompt_embeds_mask"]
            return kwargs

        name = "Qwen-Image architecture (random weights)"
    pipe.set_progress_bar_config(disable=True)
    return BenchModel(name, kind, pipe, device, False, False, make_inputs, make_transformer)


def _digits(device: torch.device, dtype: torch.dtype, steps: int, seed: int) -> BenchModel:
    from dbcache_compile.digits import WEIGHTS_DIR, load_digits_pipeline
    pipe = load_digits_pipeline(device=device, torch_dtype=dtype)

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        return {"labels": [i % 10], "num_inference_steps": steps, "generator": _generator(seed + i),
                "output_type": "pt", "progress": False}

    def make_transformer() -> torch.nn.Module:
        return FluxTransformer2DModel.from_pretrained(WEIGHTS_DIR / "transformer", local_files_only=True,
                                                      torch_dtype=dtype)

    def digit_accuracy(i: int, images: torch.Tensor) -> float:
        from dbcache_compile.digits.classifier import accuracy
        return accuracy(images, [i % 10] * len(images))

    return BenchModel("tiny digits FLUX (dbcache_compile.digits, 16x16)", "flux", pipe, device, True, False,
                      make_inputs, make_transformer, extra_metric=("Digit acc", digit_accuracy))


def _local(path: str, device: torch.device, dtype: torch.dtype, steps: int, height: int, width: int, seed: int,
           true_cfg_scale: float, guidance_scale: float, lora: Optional[str],
           scheduler_config: Optional[str]) -> BenchModel:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory. Pass 'tiny' or a local diffusers pipeline "
                                f"directory (FLUX.1-dev or Qwen-Image, with model_index.json); weights are never "
                                f"downloaded")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {path}: no model_index.json there; expected a diffusers pipeline "
                                f"directory such as a local copy of black-forest-labs/FLUX.1-dev or Qwen/Qwen-Image")
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"--lora {lora}: no such file (expected a LoRA .safetensors file)")
    pipe = DiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype)
    transformer = getattr(pipe, "transformer", None)
    family = next((name for cls, name in FAMILIES.items() if isinstance(transformer, cls)), None)
    if family is None:
        raise ValueError(f"--model {path}: the pipeline's transformer is {type(transformer).__name__}; the benchmark "
                         f"supports FluxTransformer2DModel (FLUX.1) and QwenImageTransformer2DModel (Qwen-Image)")
    if getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"--model {path}: the pipeline has no text encoder, so prompts cannot be encoded")
    if scheduler_config is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(Path(scheduler_config).read_text()))

    def fuse_lora(p: Any) -> None:
        p.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
        p.fuse_lora()
        p.unload_lora_weights()

    after = fuse_lora if lora is not None else None
    if after is not None:
        after(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt": prompt, "height": height, "width": width, "num_inference_steps": steps,
                                  "generator": _generator(seed + i), "output_type": "pt"}
        if family == "flux":
            kwargs["guidance_scale"] = guidance_scale
        else:
            kwargs["true_cfg_scale"] = true_cfg_scale
            if true_cfg_scale > 1:
                kwargs["negative_prompt"] = " "
        return kwargs

    def make_transformer() -> torch.nn.Module:
        return type(transformer).from_pretrained(str(root), subfolder="transformer", local_files_only=True,
                                                 torch_dtype=dtype)

    name = root.name + (f" + {Path(lora).name}" if lora else "")
    return BenchModel(name, family, pipe, device, True, True, make_inputs, make_transformer, after)


def load_model(model: Optional[str], random_weights: Optional[str], device: torch.device, dtype: torch.dtype,
               steps: int, height: int, width: int, seed: int, true_cfg_scale: float = 1.0,
               guidance_scale: float = 3.5, lora: Optional[str] = None,
               scheduler_config: Optional[str] = None) -> BenchModel:
    """Build the benchmarked pipeline from ``--model`` (``"tiny"`` or a directory) or ``--random-weights``.

    ``height``/``width`` are pixels (ignored by the 16x16 digits model); ``seed + i`` seeds prompt ``i``.
    """
    if (model is None) == (random_weights is None):
        raise ValueError("pass exactly one of --model (tiny or a local directory) and --random-weights")
    if random_weights is not None:
        if random_weights not in RANDOM_WEIGHTS:
            raise ValueError(f"--random-weights must be one of {RANDOM_WEIGHTS}, got {random_weights!r}")
        return _random_weights(random_weights, device, dtype, steps, height, width, seed, true_cfg_scale)
    if model == "tiny":
        return _digits(device, dtype, steps, seed)
    return _local(model, device, dtype, steps, height, width, seed, true_cfg_scale, guidance_scale, lora,
                  scheduler_config)
