"""The pipelines a benchmark runs: the embedded digits model, a local diffusers directory, or a full-size
architecture with random weights.

Each is wrapped in a :class:`BenchModel` that knows how to build the pipeline call for prompt ``i`` and how to get
a fresh, unquantized transformer (quantization with torchao is done in place and cannot be undone).

Random weights: the transformer is the real diffusers class with the published config and seeded random weights,
built directly on the device in the benchmark dtype. The pipeline around it has no text encoders (prompt
embeddings of the right shape are drawn from the prompt's seed). FLUX, Wan 2.1 T2V 14B, SD3.5 Large and
HunyuanVideo 1.5 pipelines keep a VAE with random weights (each model's own VAE architecture) and decode every call
(``output_type="pt"``), so the timed call is the whole pipeline after the text encoders; Qwen-Image returns latents.
Latency only: the images (video frames) say nothing. ``<family>-tiny`` are the tiny pipelines of
:mod:`dbcache_compile.testing` / ``tests/families/`` (one file per family of the registry; run the bench from the
repository root) for CPU checks of the same code paths.
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

__all__ = ["BenchModel", "RANDOM_WEIGHTS", "FULL_SIZE", "TINY_FAMILIES", "FLUX_DEV_CONFIG", "QWEN_IMAGE_CONFIG",
           "WAN_T2V_14B_CONFIG", "SD35_LARGE_CONFIG", "HUNYUAN_VIDEO15_T2V_CONFIG", "output_frames", "load_model"]

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

# ---------------------------------------------------------------------------------------------------------------
# Wan 2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers), 14.29 B transformer parameters (published: 14B).
# ---------------------------------------------------------------------------------------------------------------
#: ``WanTransformer3DModel`` config of Wan2.1-T2V-14B: 40 blocks, 40 heads x 128 (dim 5120), FFN 13824, umT5 text
#: dim 4096, 16 latent channels in and out, patch (1, 2, 2). These are the checkpoint's transformer/config.json values,
#: which are also diffusers 0.42.1's ``WanTransformer3DModel.__init__`` defaults (the 1.3B model differs: 30 blocks,
#: 12 heads, FFN 8960); rope_max_seq_len 1024 is the class default the checkpoint keeps.
WAN_T2V_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
#: ``AutoencoderKLWan`` of Wan 2.1: the class defaults are the released Wan 2.1 VAE (base_dim 96, z_dim 16,
#: dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsampling [False, True, True], its latents_mean / latents_std;
#: 126.9 M params). WanPipeline's docstring example loads it in float32 next to a bf16 transformer: so does this.
WAN_VAE_CONFIG: dict[str, Any] = {}
#: umT5-XXL tokens per prompt in WanPipeline (``max_sequence_length=512``, padded), width ``text_dim`` (4096).
WAN_TEXT_TOKENS = 512
#: WanPipeline's call defaults (480P: 480 x 832, 81 frames, guidance 5.0: true CFG, a cond and an uncond call per
#: step) and the scheduler of its docstring example: UniPC, flow prediction, flow_shift 3.0 ("3.0 for 480P").
WAN_DEFAULTS = {"height": 480, "width": 832, "num_frames": 81, "guidance_scale": 5.0, "flow_shift": 3.0}

# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3.5 Large (stabilityai/stable-diffusion-3.5-large), 8.06 B transformer parameters (published: 8.1B).
# ---------------------------------------------------------------------------------------------------------------
#: ``SD3Transformer2DModel`` config of SD3.5 Large (transformer/config.json): 38 MMDiT blocks, 38 heads x 64 (dim
#: 2432 = caption_projection_dim), joint_attention_dim 4096 (T5-XXL / padded CLIP), pooled 2048 (CLIP-L 768 + CLIP-G
#: 1280), 16 latent channels, patch 2, qk RMSNorm, no MMDiT-X dual-attention layers (those are SD3.5 Medium's),
#: pos_embed_max_size 192, sample_size 128 (1024 px).
SD35_LARGE_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
    "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "dual_attention_layers": (),
    "qk_norm": "rms_norm"}
#: SD3 / SD3.5's ``AutoencoderKL`` (vae/config.json): FLUX.1's architecture (16 latent channels, 8x, 83.8 M params)
#: with SD3's scaling_factor 1.5305 and shift_factor 0.0609.
SD3_VAE_CONFIG: dict[str, Any] = dict(FLUX_VAE_CONFIG, scaling_factor=1.5305, shift_factor=0.0609)
#: StableDiffusion3Pipeline's prompt embedding: 77 CLIP tokens (CLIP-L + CLIP-G, 2048 wide, zero-padded to 4096)
#: followed by ``max_sequence_length=256`` T5-XXL tokens: 333 x 4096, plus the 2048-wide pooled CLIP embedding.
SD3_TEXT_TOKENS = 77 + 256
#: SD3.5 Large's model-card sampling (1024², guidance 3.5: batched CFG, one call on [uncond, cond] per step; 28
#: steps, pass ``--steps 28``) and its scheduler config (FlowMatchEulerDiscreteScheduler, shift 3.0).
SD35_DEFAULTS = {"height": 1024, "width": 1024, "guidance_scale": 3.5, "shift": 3.0}

# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5 480p T2V (hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v), 8.33 B params (published: 8.3B).
# ---------------------------------------------------------------------------------------------------------------
#: ``HunyuanVideo15Transformer3DModel`` config of the 480p T2V checkpoint: diffusers 0.42.1's class defaults are the
#: released 480p model (54 double-stream blocks, 16 heads x 128, 2 refiner blocks, mlp_ratio 4, in_channels 65 = 32
#: noisy latents + 32 condition latents + 1 mask, out 32, Qwen2.5-VL-7B text 3584, Glyph-ByT5 1472, SigLIP image 1152,
#: rope (16, 56, 56), target_size 640 = the 480p bucket), with task_type "t2v" as the t2v checkpoint has it.
HUNYUAN_VIDEO15_T2V_CONFIG: dict[str, Any] = {
    "in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54,
    "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1, "qk_norm": "rms_norm",
    "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152, "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56), "target_size": 640, "task_type": "t2v", "use_meanflow": False}
#: ``AutoencoderKLHunyuanVideo15``: the class defaults are the released VAE (32 latent channels, 16x spatial, 4x
#: temporal compression, 1.26 B params). Tiled decoding on, as the pipeline's docstring example does
#: (``pipe.vae.enable_tiling()``): 121 frames at 480p do not decode in one piece on one GPU otherwise.
HUNYUAN_VIDEO15_VAE_CONFIG: dict[str, Any] = {}
#: HunyuanVideo15Pipeline's text inputs: ``tokenizer_max_length=1000`` Qwen2.5-VL tokens (3584 wide, after the
#: 108-token template crop) with a mask, and ``tokenizer_2_max_length=256`` Glyph-ByT5 tokens (1472 wide); a prompt
#: without quoted text gets all-zero ByT5 embeddings with a zero mask (``_get_byt5_prompt_embeds``). The mask of the
#: Qwen tokens marks the first 64 as the prompt (the attention cost does not depend on it: padded tokens stay in the
#: sequence, masked).
HUNYUAN_VIDEO15_TEXT = {"tokens": 1000, "valid_tokens": 64, "glyph_tokens": 256}
#: HunyuanVideo15Pipeline's defaults at 480p: the 16:9 bucket of target_size 640 (480 x 848, what the pipeline picks
#: without height/width), 121 frames, ClassifierFreeGuidance 6.0 (a cond and an uncond call per step, cache contexts
#: pred_cond / pred_uncond); FlowMatchEulerDiscreteScheduler shift 5.0 (the tiny pipeline's; the shift does not change
#: the cost of a step).
HUNYUAN_VIDEO15_DEFAULTS = {"height": 480, "width": 848, "num_frames": 121, "guidance_scale": 6.0, "shift": 5.0}

#: Default configs of the full-size families added for issue #14 (no seed table to reproduce for them; with random
#: weights the residual diffs say nothing, so forced schedules: ``R1.0`` caches every step the W / MC gates allow).
FORCED_CONFIGS = ("F1B0_W4MC6_R1.0", "F4B0_W4MC3_R1.0", "F8B0_W4MC2_R1.0")

#: ``--random-weights`` name -> (case of ``tests/families/``, display name) of the tiny CPU variants of the full-size
#: families below; the case's family record says the rest (its name, its CFG mode).
TINY_FAMILIES: dict[str, tuple[str, str]] = {
    "wan-tiny": ("wan", "tiny Wan 2.1 T2V"),
    "sd3.5-tiny": ("sd35", "tiny SD3.5"),
    "hunyuanvideo-1.5-tiny": ("hunyuan_video15", "tiny HunyuanVideo 1.5 T2V"),
}
#: full-size ``--random-weights`` names (GPU only: tens of GB in bf16).
FULL_SIZE = ("flux", "qwen-image", "wan", "sd3.5", "hunyuanvideo-1.5")

RANDOM_WEIGHTS = ("flux", "qwen-image", "flux-tiny", "qwen-image-tiny", "flux-narrow", "wan", "sd3.5",
                  "hunyuanvideo-1.5", *TINY_FAMILIES)
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
        default_configs: the cache configs when ``--configs`` is not given (``None``: the family's table rows).
        separate_cfg: whether a call runs cond and uncond as separate transformer forwards (what cache-dit's
            ``enable_separate_cfg`` is told); ``None``: ask the model's family (FLUX, Qwen-Image).
        resolution: what the results call the output size (``"832x480, 81 frames"``); empty: ``--width x --height``.
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
    default_configs: Optional[tuple[str, ...]] = None
    separate_cfg: Optional[bool] = None
    resolution: str = ""

    def output_images(self, output: Any) -> Optional[torch.Tensor]:
        """The call's images as float ``(N, C, H, W)`` in [0, 1] on the CPU, or ``None`` for latents (and for random
        weights: latency only). Video pipelines return ``frames`` ``(N, F, C, H, W)``: their frames are the images,
        ``(N * F, C, H, W)``."""
        if not self.images:
            return None
        return output_frames(output).detach().float().cpu()

    def replace_transformer(self) -> None:
        """Drop the current transformer (freeing its memory first) and install a fresh, unquantized one."""
        self.pipe.transformer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pipe.transformer = self.make_transformer().to(self.device).eval()
        if self.after_transformer is not None:
            self.after_transformer(self.pipe)


def output_frames(output: Any) -> torch.Tensor:
    """The images of a pipeline output (``output_type="pt"``) as one ``(N, C, H, W)`` tensor: ``images`` of image
    pipelines, ``frames`` ``(N, F, C, H, W)`` of video pipelines (Wan, HunyuanVideo, ...) flattened to ``N * F``
    images."""
    images = getattr(output, "images", None)
    if images is None:
        images = getattr(output, "frames", None)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected the pipeline to return a tensor of images or frames (output_type='pt'), got "
                        f"{type(images).__name__} from {type(output).__name__}")
    if images.ndim == 5:
        images = images.flatten(0, 1)
    if images.ndim != 4:
        raise TypeError(f"expected (N, C, H, W) images or (N, F, C, H, W) frames, got shape {tuple(images.shape)}")
    return images


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _random_module(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                   seed: int) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights, created directly on ``device`` in ``dtype``. The class's
    ``_keep_in_fp32_modules`` (Wan: rope, time_embedder, scale_shift_table, norm1-3) stay float32, as
    ``from_pretrained(torch_dtype=...)`` keeps them (the same name rule as diffusers' ``load_model_dict_into_meta``)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
                    tensor.data = tensor.data.float()
    return module.eval()


def _on(device: torch.device, dtype: torch.dtype) -> Callable[[Any], Any]:
    """Move a call kwarg to ``device``: floating tensors also to ``dtype``; anything else unchanged."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return value
    return move


def _wan(device: torch.device, dtype: torch.dtype, steps: int, height: Optional[int], width: Optional[int],
         num_frames: Optional[int], seed: int, config: Optional[dict[str, Any]] = None,
         vae_config: Optional[dict[str, Any]] = None) -> BenchModel:
    """Wan 2.1 T2V 14B: WanPipeline, UniPC, the Wan VAE (float32) decoding every call, true CFG (two calls/step).
    ``config`` / ``vae_config`` replace the published configs (the tests run this wiring at a tiny width)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    config, vae_config = config or WAN_T2V_14B_CONFIG, WAN_VAE_CONFIG if vae_config is None else vae_config
    d = WAN_DEFAULTS
    height, width, num_frames = height or d["height"], width or d["width"], num_frames or d["num_frames"]

    def make_transformer() -> torch.nn.Module:
        return _random_module(WanTransformer3DModel, config, device, dtype, seed)

    vae = _random_module(AutoencoderKLWan, vae_config, device, torch.float32, seed + 1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=d["flow_shift"])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                       transformer=make_transformer())
    text_dim = config["text_dim"]

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        g = _generator(seed + i)
        return {"prompt_embeds": torch.randn(1, WAN_TEXT_TOKENS, text_dim, generator=g).to(device, dtype),
                "negative_prompt_embeds": torch.randn(1, WAN_TEXT_TOKENS, text_dim, generator=g).to(device, dtype),
                "height": height, "width": width, "num_frames": num_frames, "num_inference_steps": steps,
                "guidance_scale": d["guidance_scale"], "output_type": "pt", "generator": g}

    pipe.set_progress_bar_config(disable=True)
    return BenchModel("Wan 2.1 T2V 14B architecture (random weights)", "wan", pipe, device, False, False, make_inputs,
                      make_transformer, default_configs=FORCED_CONFIGS, separate_cfg=True,
                      resolution=f"{width}x{height}, {num_frames} frames")


def _sd35(device: torch.device, dtype: torch.dtype, steps: int, height: Optional[int], width: Optional[int],
          seed: int, config: Optional[dict[str, Any]] = None,
          vae_config: Optional[dict[str, Any]] = None) -> BenchModel:
    """SD3.5 Large: StableDiffusion3Pipeline, the SD3 VAE decoding every call, batched CFG (one call/step)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    config, vae_config = config or SD35_LARGE_CONFIG, vae_config or SD3_VAE_CONFIG
    d = SD35_DEFAULTS
    height, width = height or d["height"], width or d["width"]

    def make_transformer() -> torch.nn.Module:
        return _random_module(SD3Transformer2DModel, config, device, dtype, seed)

    vae = _random_module(AutoencoderKL, vae_config, device, dtype, seed + 1)
    pipe = StableDiffusion3Pipeline(transformer=make_transformer(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=d["shift"]), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    text_dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        g = _generator(seed + i)
        embeds = lambda: torch.randn(1, SD3_TEXT_TOKENS, text_dim, generator=g).to(device, dtype)  # noqa: E731
        pooled = lambda: torch.randn(1, pooled_dim, generator=g).to(device, dtype)  # noqa: E731
        return {"prompt_embeds": embeds(), "pooled_prompt_embeds": pooled(), "negative_prompt_embeds": embeds(),
                "negative_pooled_prompt_embeds": pooled(), "height": height, "width": width,
                "num_inference_steps": steps, "guidance_scale": d["guidance_scale"], "output_type": "pt",
                "generator": g}

    pipe.set_progress_bar_config(disable=True)
    return BenchModel("SD3.5 Large architecture (random weights)", "sd3", pipe, device, False, False, make_inputs,
                      make_transformer, default_configs=FORCED_CONFIGS, separate_cfg=False,
                      resolution=f"{width}x{height}")


def _hunyuan_video15(device: torch.device, dtype: torch.dtype, steps: int, height: Optional[int],
                     width: Optional[int], num_frames: Optional[int], seed: int,
                     config: Optional[dict[str, Any]] = None,
                     vae_config: Optional[dict[str, Any]] = None) -> BenchModel:
    """HunyuanVideo 1.5 480p T2V: HunyuanVideo15Pipeline with its CFG guider (two calls/step), the HunyuanVideo 1.5
    VAE (tiled) decoding every call."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)

    config = config or HUNYUAN_VIDEO15_T2V_CONFIG
    vae_config = HUNYUAN_VIDEO15_VAE_CONFIG if vae_config is None else vae_config
    d, text = HUNYUAN_VIDEO15_DEFAULTS, HUNYUAN_VIDEO15_TEXT
    height, width, num_frames = height or d["height"], width or d["width"], num_frames or d["num_frames"]

    def make_transformer() -> torch.nn.Module:
        return _random_module(HunyuanVideo15Transformer3DModel, config, device, dtype, seed)

    vae = _random_module(AutoencoderKLHunyuanVideo15, vae_config, device, dtype, seed + 1)
    vae.enable_tiling()
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=make_transformer(), vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=d["shift"]), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=d["guidance_scale"]))
    dim, dim_2 = config["text_embed_dim"], config["text_embed_2_dim"]

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        g = _generator(seed + i)
        mask = torch.zeros(1, text["tokens"], dtype=torch.long, device=device)
        mask[:, :text["valid_tokens"]] = 1
        glyph = torch.zeros(1, text["glyph_tokens"], dim_2, device=device, dtype=dtype)
        glyph_mask = torch.zeros(1, text["glyph_tokens"], dtype=torch.long, device=device)
        return {"prompt_embeds": torch.randn(1, text["tokens"], dim, generator=g).to(device, dtype),
                "prompt_embeds_mask": mask, "prompt_embeds_2": glyph, "prompt_embeds_mask_2": glyph_mask,
                "negative_prompt_embeds": torch.randn(1, text["tokens"], dim, generator=g).to(device, dtype),
                "negative_prompt_embeds_mask": mask, "negative_prompt_embeds_2": glyph,
                "negative_prompt_embeds_mask_2": glyph_mask, "height": height, "width": width,
                "num_frames": num_frames, "num_inference_steps": steps, "output_type": "pt", "generator": g}

    pipe.set_progress_bar_config(disable=True)
    return BenchModel("HunyuanVideo 1.5 480p T2V architecture (random weights)", "hunyuan-video-1.5", pipe, device,
                      False, False, make_inputs, make_transformer, default_configs=FORCED_CONFIGS,
                      separate_cfg=True,
                      resolution=f"{width}x{height}, {num_frames} frames")


def _tiny_family(kind: str, device: torch.device, dtype: torch.dtype, steps: int, height: Optional[int],
                 width: Optional[int], num_frames: Optional[int], seed: int) -> BenchModel:
    """``<family>-tiny``: the tiny pipeline of a case of ``tests/families/`` (the real diffusers classes, random
    weights) with its own call inputs; default config ``F1B0_W2MC2_R<t>`` with the case's parity threshold (one that
    makes cache-dit cache on it)."""
    from dbcache_compile.families import family_named
    from tests.families import CASES

    key, name = TINY_FAMILIES[kind]
    case = CASES[key]
    builder, family_inputs = case.builder, case.inputs
    pipe = builder(seed).to(device=device, dtype=dtype)
    move = _on(device, dtype)
    sample = family_inputs(seed=seed)
    video = "num_frames" in sample
    overrides = {k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames))
                 if v is not None and k in sample}

    def make_inputs(i: int, prompt: str) -> dict[str, Any]:
        kwargs = {k: move(v) for k, v in family_inputs(seed=seed + i).items()}
        kwargs.update(overrides, num_inference_steps=steps, generator=_generator(seed + i))
        return kwargs

    shape = {**sample, **overrides}
    resolution = f"{shape['width']}x{shape['height']}" + (f", {shape['num_frames']} frames" if video else "")
    # cond and uncond: Wan and HunyuanVideo 1.5 call the transformer twice per step (guidance > 1 / the CFG guider),
    # SD3 once on the batched [uncond, cond] pair
    separate = family_named(case.family).cfg != "batched" and sample.get("guidance_scale", 2.0) > 1
    return BenchModel(f"{name} (random weights, tests/families)", case.family, pipe, device, False,
                      False, make_inputs, lambda: builder(seed).transformer.to(dtype),
                      default_configs=(f"F1B0_W2MC2_R{case.threshold}",), separate_cfg=separate,
                      resolution=resolution)


def _random_weights(kind: str, device: torch.device, dtype: torch.dtype, steps: int, height: Optional[int],
                    width: Optional[int], seed: int, true_cfg_scale: float,
                    num_frames: Optional[int] = None) -> BenchModel:
    if kind in TINY_FAMILIES:
        return _tiny_family(kind, device, dtype, steps, height, width, num_frames, seed)
    if kind == "wan":
        return _wan(device, dtype, steps, height, width, num_frames, seed)
    if kind == "sd3.5":
        return _sd35(device, dtype, steps, height, width, seed)
    if kind == "hunyuanvideo-1.5":
        return _hunyuan_video15(device, dtype, steps, height, width, num_frames, seed)
    height, width = height or 1024, width or 1024
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
                          make_inputs, lambda: tiny_flux_pipeline(seed).transformer.to(dtype),
                          resolution=f"{width}x{height}")

    if kind == "qwen-image-tiny":  # the CPU stand-in of qwen-image (python -m bench gpu --dry-run)
        from dbcache_compile.testing import qwen_inputs, tiny_qwen_pipeline
        pipe = tiny_qwen_pipeline(seed).to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)

        def make_inputs(i: int, prompt: str) -> dict[str, Any]:
            kwargs = qwen_inputs(seed=seed + i)
            kwargs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                      if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            kwargs.update(height=height, width=width, num_inference_steps=steps, output_type="latent",
                          generator=_generator(seed + i))
            return kwargs

        return BenchModel("tiny Qwen-Image (random weights, dbcache_compile.testing)", "qwen-image", pipe, device,
                          False, False, make_inputs, lambda: tiny_qwen_pipeline(seed).transformer.to(dtype),
                          resolution=f"{width}x{height}")

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
    return BenchModel(name, kind, pipe, device, False, False, make_inputs, make_transformer,
                      resolution=f"{width}x{height}")


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
                      make_inputs, make_transformer, extra_metric=("Digit acc", digit_accuracy), resolution="16x16")


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
    return BenchModel(name, family, pipe, device, True, True, make_inputs, make_transformer, after,
                      resolution=f"{width}x{height}")


def load_model(model: Optional[str], random_weights: Optional[str], device: torch.device, dtype: torch.dtype,
               steps: int, height: Optional[int], width: Optional[int], seed: int, true_cfg_scale: float = 1.0,
               guidance_scale: float = 3.5, lora: Optional[str] = None,
               scheduler_config: Optional[str] = None, num_frames: Optional[int] = None) -> BenchModel:
    """Build the benchmarked pipeline from ``--model`` (``"tiny"`` or a directory) or ``--random-weights``.

    ``height``/``width`` are pixels (ignored by the 16x16 digits model), ``num_frames`` the video length (video
    families only); ``None`` is the model's default (1024² for FLUX / Qwen-Image, the pipeline's published defaults
    for Wan 2.1, SD3.5 Large and HunyuanVideo 1.5, the tiny pipelines' own sizes for ``*-tiny``). ``seed + i`` seeds
    prompt ``i``.
    """
    if (model is None) == (random_weights is None):
        raise ValueError("pass exactly one of --model (tiny or a local directory) and --random-weights")
    if random_weights is not None:
        if random_weights not in RANDOM_WEIGHTS:
            raise ValueError(f"--random-weights must be one of {RANDOM_WEIGHTS}, got {random_weights!r}")
        return _random_weights(random_weights, device, dtype, steps, height, width, seed, true_cfg_scale,
                               num_frames)
    if model == "tiny":
        return _digits(device, dtype, steps, seed)
    return _local(model, device, dtype, steps, height or 1024, width or 1024, seed, true_cfg_scale, guidance_scale,
                  lora, scheduler_config)
