"""Image-quality metrics: PSNR and SSIM (the library's, :func:`dbcache_compile.metrics.psnr` and
:func:`dbcache_compile.calibrate.ssim`, the latter torchmetrics'), torchmetrics' LPIPS,
transformers' CLIP (CLIP Score) and ImageReward.

Images are float tensors ``(N, C, H, W)`` with values in ``[0, 1]``. PSNR and SSIM compare a row's images with the
uncached eager images of the same prompts and seeds (``data_range=1``); CLIP Score and ImageReward score an image
against its prompt. Models are only ever loaded from local directories: LPIPS when torchvision and its AlexNet
weights are already on disk, CLIP Score from ``$CLIP_MODEL_DIR`` (a transformers ``CLIPModel`` directory, e.g.
``laion/CLIP-ViT-g-14-laion2B-s12B-b42K`` as the seed used), ImageReward from ``$IMAGEREWARD_MODEL_DIR``
(``ImageReward.pt`` + ``med_config.json``, with the ``image-reward`` package installed). Whatever is missing is
reported as ``n/a`` with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch

from dbcache_compile.calibrate import ssim
from dbcache_compile.metrics import psnr

__all__ = ["psnr", "ssim", "to_uint8", "Scorers"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats → uint8 ``[0, 255]`` (what the CLIP processor and PIL expect), on the CPU."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _three_channels(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class Scorers:
    """The optional learned metrics, loaded once; ``unavailable`` maps a metric name to why it is ``n/a``.

    Args:
        device: where the metric networks run (the pipeline's device).
        prompt_inputs: whether the prompts are the model's real text inputs; CLIP Score and ImageReward are
            meaningless otherwise (the tiny digits model, random weights).
        images: whether the rows produce decoded images at all (random weights produce latents).
    """

    def __init__(self, device: torch.device, prompt_inputs: bool, images: bool) -> None:
        self.device = device
        self.unavailable: dict[str, str] = {}
        self._lpips: Optional[Any] = None
        self._clip: Optional[tuple[Any, Any]] = None
        self._reward: Optional[Any] = None
        if not images:
            for name in ("PSNR", "SSIM", "LPIPS", "Clip Score", "ImageReward"):
                self.unavailable[name] = "random weights: latency only, no images to compare"
            return
        self._lpips = self._load_lpips()
        if not prompt_inputs:
            for name in ("Clip Score", "ImageReward"):
                self.unavailable[name] = "the prompts are not this model's input (they only index seeds/labels)"
            return
        self._clip = self._load_clip()
        self._reward = self._load_image_reward()

    # ----------------------------------------------------------------------------------------------- loading
    def _load_lpips(self) -> Optional[Any]:
        if importlib.util.find_spec("torchvision") is None:
            self.unavailable["LPIPS"] = "torchmetrics' LPIPS needs torchvision, which is not installed"
            return None
        weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        if not weights.is_file():
            self.unavailable["LPIPS"] = f"AlexNet weights not found locally ({weights}); nothing is downloaded"
            return None
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(self.device).eval()

    def _load_clip(self) -> Optional[tuple[Any, Any]]:
        path = os.environ.get("CLIP_MODEL_DIR")
        if not path:
            self.unavailable["Clip Score"] = "CLIP_MODEL_DIR is not set (a local transformers CLIP model directory)"
            return None
        if not Path(path).is_dir():
            raise FileNotFoundError(f"CLIP_MODEL_DIR={path} is not a directory")
        from transformers import CLIPModel, CLIPProcessor
        return (CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval(),
                CLIPProcessor.from_pretrained(path, local_files_only=True))

    def _load_image_reward(self) -> Optional[Any]:
        path = os.environ.get("IMAGEREWARD_MODEL_DIR")
        if not path:
            self.unavailable["ImageReward"] = "IMAGEREWARD_MODEL_DIR is not set (ImageReward.pt + med_config.json)"
            return None
        checkpoint, med_config = Path(path) / "ImageReward.pt", Path(path) / "med_config.json"
        if not checkpoint.is_file() or not med_config.is_file():
            raise FileNotFoundError(f"IMAGEREWARD_MODEL_DIR={path} must hold ImageReward.pt and med_config.json")
        if importlib.util.find_spec("ImageReward") is None:
            self.unavailable["ImageReward"] = "the image-reward package is not installed (pip install image-reward)"
            return None
        import ImageReward
        return ImageReward.load(str(checkpoint), med_config=str(med_config), device=str(self.device))

    # ----------------------------------------------------------------------------------------------- scoring
    def lpips(self, images: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
        """Mean LPIPS (AlexNet) of the batch against the reference, lower is closer; ``None`` when unavailable."""
        if self._lpips is None:
            return None
        value = self._lpips(_three_channels(images).float().to(self.device),
                            _three_channels(reference).float().to(self.device))
        self._lpips.reset()
        return float(value)

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> Optional[float]:
        """Mean CLIP Score, ``100 · max(cos(image, prompt), 0)`` (Hessel et al., 2021; torchmetrics' definition),
        of each image with its prompt (prompts truncated to CLIP's 77 tokens).

        Computed with transformers' ``CLIPModel`` directly: torchmetrics 1.9's ``CLIPScore`` accepts no local
        directory and breaks on transformers 5 (``get_image_features`` returns a model output there)."""
        if self._clip is None:
            return None
        model, processor = self._clip
        inputs = processor(text=prompts, images=list(to_uint8(_three_channels(images))), return_tensors="pt",
                           padding=True, truncation=True).to(self.device)
        out = model(**inputs)
        image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return float((100 * (image * text).sum(-1).clamp(min=0)).mean())

    def image_reward(self, images: torch.Tensor, prompts: list[str]) -> Optional[float]:
        """Mean ImageReward score of each image with its prompt."""
        if self._reward is None:
            return None
        import PIL.Image
        scores = [self._reward.score(prompt, PIL.Image.fromarray(img.permute(1, 2, 0).numpy()))
                  for img, prompt in zip(to_uint8(_three_channels(images)), prompts)]
        return float(sum(scores) / len(scores))
