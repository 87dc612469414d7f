"""``DigitsPipeline``: a FluxPipeline-shaped diffusers pipeline for the tiny class-conditional digits model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .model import (
    IMAGE_SIZE,
    NUM_CLASSES,
    DigitClassConditioner,
    image_ids,
    pack_images,
    text_ids,
    unpack_tokens,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Directory of the shipped weights (``transformer/``, ``conditioner/``, ``scheduler/``)."""

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """Output of :class:`DigitsPipeline`.

    ``images`` depends on ``output_type``:

    * ``"np"``: ``np.ndarray`` float32 (N, 16, 16), values in [0, 1] (0 = background, 1 = ink);
    * ``"pt"``: ``torch.Tensor`` float32 (N, 1, 16, 16), values in [0, 1];
    * ``"pil"``: list of N grayscale (mode ``"L"``) 16x16 ``PIL.Image.Image``;
    * ``"latent"``: the final packed tokens, ``torch.Tensor`` (N, 64, 4), in the model's [-1, 1] pixel scale.
    """

    images: np.ndarray | torch.Tensor | list[PIL.Image.Image]


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 16x16 digit generation with a tiny :class:`diffusers.FluxTransformer2DModel`.

    The denoising loop mirrors ``diffusers.FluxPipeline`` (pixel space, no VAE, no guidance): sigmas
    ``np.linspace(1, 1/steps, steps)`` on a ``FlowMatchEulerDiscreteScheduler``, one transformer call per step
    with ``timestep=t/1000`` and packed (N, 64, 4) ``hidden_states``.

    Modules: ``transformer`` (FluxTransformer2DModel), ``scheduler`` (FlowMatchEulerDiscreteScheduler),
    ``conditioner`` (:class:`~dbcache_compile.digits.model.DigitClassConditioner`).
    """

    model_cpu_offload_seq = "conditioner->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        conditioner: DigitClassConditioner,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, conditioner=conditioner)

    @classmethod
    def from_pretrained_embedded(
        cls,
        weights_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype = torch.float32,
    ) -> "DigitsPipeline":
        """Load the pipeline from local files only (default: the weights shipped inside this package).

        Args:
            weights_dir: directory holding ``transformer/``, ``conditioner/`` and ``scheduler/`` as written by
                ``python -m dbcache_compile.digits.train``; ``None`` means :data:`WEIGHTS_DIR`.
            device: device to move the modules to.
            torch_dtype: dtype of the transformer and conditioner weights.
        """
        root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        missing = [sub for sub in ("transformer", "conditioner", "scheduler") if not (root / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"digits weights not found in {root} (missing {missing}); "
                "create them with `python -m dbcache_compile.digits.train --out <dir>`"
            )
        transformer = FluxTransformer2DModel.from_pretrained(
            root / "transformer", local_files_only=True, torch_dtype=torch_dtype
        )
        conditioner = DigitClassConditioner.from_pretrained(
            root / "conditioner", local_files_only=True, torch_dtype=torch_dtype
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
        pipe = cls(transformer=transformer.eval(), scheduler=scheduler, conditioner=conditioner.eval())
        return pipe.to(device)

    @staticmethod
    def _labels_tensor(labels: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        tensor = torch.as_tensor(labels).to(device=device)
        if tensor.ndim != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"labels must be a non-empty 1-D sequence of ints, got {labels!r}")
        if int(tensor.min()) < 0 or int(tensor.max()) >= NUM_CLASSES:
            raise ValueError(f"labels must be digits in [0, {NUM_CLASSES}), got {tensor.tolist()}")
        return tensor.long()

    @torch.no_grad()
    def __call__(
        self,
        labels: list[int] | torch.Tensor,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        progress: bool = True,
        return_dict: bool = True,
    ) -> DigitsPipelineOutput | tuple:
        """Generate one 16x16 digit per entry of ``labels``.

        Args:
            labels: N requested digits, ints in 0..9.
            num_inference_steps: Euler steps (= transformer calls).
            generator: torch generator(s) for the initial noise (a list gives one per image, as in diffusers).
            latents: optional initial noise, packed (N, 64, 4); drawn from ``generator`` when ``None``.
            output_type: ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"``; see :class:`DigitsPipelineOutput`.
            progress: show the diffusers progress bar (``self.progress_bar``).
            return_dict: return a :class:`DigitsPipelineOutput` instead of a 1-tuple ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self._execution_device
        dtype = self.transformer.dtype
        label_ids = self._labels_tensor(labels, device)
        batch_size = label_ids.shape[0]

        prompt_embeds, pooled_prompt_embeds = self.conditioner(label_ids)
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype)
        txt_ids = text_ids(device=device, dtype=dtype)
        latent_image_ids = image_ids(device=device, dtype=dtype)

        if latents is None:
            noise = randn_tensor((batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator, device=device, dtype=dtype)
            latents = pack_images(noise)
        elif latents.shape != (batch_size, latent_image_ids.shape[0], 4):
            raise ValueError(f"latents must have shape ({batch_size}, 64, 4), got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps

        bar = self.progress_bar(total=num_inference_steps) if progress else tqdm(total=num_inference_steps, disable=True)
        with bar as progress_bar:
            for t in timesteps:
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                with self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(
                        hidden_states=latents,
                        timestep=timestep / 1000,
                        guidance=None,
                        pooled_projections=pooled_prompt_embeds,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=txt_ids,
                        img_ids=latent_image_ids,
                        joint_attention_kwargs=None,
                        return_dict=False,
                    )[0]
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            pixels = (unpack_tokens(latents).float() / 2 + 0.5).clamp(0, 1)  # (N, 1, 16, 16) in [0, 1]
            if output_type == "pt":
                images = pixels
            elif output_type == "np":
                images = pixels[:, 0].cpu().numpy()
            else:
                as_uint8 = (pixels[:, 0] * 255).round().to(torch.uint8).cpu().numpy()
                images = [PIL.Image.fromarray(img) for img in as_uint8]  # 2-D uint8 -> mode "L"

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DigitsPipelineOutput(images=images)


def load_digits_pipeline(
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
) -> DigitsPipeline:
    """The digits pipeline with the shipped weights (offline); see :meth:`DigitsPipeline.from_pretrained_embedded`."""
    return DigitsPipeline.from_pretrained_embedded(weights_dir=weights_dir, device=device, torch_dtype=torch_dtype)
