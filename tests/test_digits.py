"""Tests of the tiny FLUX digits model (dbcache_compile.digits): weights, sample quality, pipeline contract."""

from __future__ import annotations

import socket

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from dbcache_compile.digits import WEIGHTS_DIR, DigitsPipeline, load_digits_pipeline
from dbcache_compile.digits import classifier
from dbcache_compile.digits.demo import balanced_labels, generate_digits, mean_abs_diff, save_grid
from dbcache_compile.digits.model import (
    build_conditioner,
    build_transformer,
    image_ids,
    load_real_digits,
    pack_images,
    unpack_tokens,
)
from dbcache_compile.digits.train import train

LABELS = [d for d in range(10) for _ in range(3)]  # 3 samples per class


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def samples_20(pipe: DigitsPipeline) -> np.ndarray:
    return pipe(LABELS, num_inference_steps=20, generator=_gen(0), progress=False).images


def test_shipped_weights_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("loading the digits weights tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    pipe = load_digits_pipeline()
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    config = pipe.transformer.config
    assert config.in_channels == 4 and config.patch_size == 1 and not config.guidance_embeds
    assert config.num_layers + config.num_single_layers >= 8
    total_bytes = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total_bytes < 5 * 2**20


def test_missing_weights_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dbcache_compile.digits.train"):
        DigitsPipeline.from_pretrained_embedded(tmp_path)


def test_classifier_on_real_digits() -> None:
    assert classifier.held_out_accuracy() >= 0.97
    images, labels = load_real_digits()
    assert images.shape == (1797, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
    assert classifier.accuracy(images[:200], labels[:200]) >= 0.97
    # uint8 and (N, 1, 16, 16) tensor inputs are accepted too
    as_uint8 = (images[:50] * 255).round().astype(np.uint8)
    assert (classifier.classify(as_uint8) == classifier.classify(torch.from_numpy(images[:50])[:, None])).all()


def test_generated_digits_are_recognised(samples_20: np.ndarray) -> None:
    assert classifier.accuracy(samples_20, LABELS) >= 0.9


def test_random_model_is_near_chance() -> None:
    torch.manual_seed(0)
    random_pipe = DigitsPipeline(
        transformer=build_transformer().eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        conditioner=build_conditioner().eval(),
    )
    images = random_pipe(LABELS, num_inference_steps=20, generator=_gen(0), progress=False).images
    assert classifier.accuracy(images, LABELS) <= 0.3


def test_same_seed_same_images(pipe: DigitsPipeline, samples_20: np.ndarray) -> None:
    again = pipe(LABELS, num_inference_steps=20, generator=_gen(0), progress=False).images
    np.testing.assert_array_equal(again, samples_20)
    other = pipe(LABELS, num_inference_steps=20, generator=_gen(1), progress=False).images
    assert not np.array_equal(other, samples_20)


def test_output_types(pipe: DigitsPipeline, samples_20: np.ndarray) -> None:
    assert samples_20.shape == (len(LABELS), 16, 16) and samples_20.dtype == np.float32
    assert samples_20.min() >= 0.0 and samples_20.max() <= 1.0

    labels = torch.tensor([7, 1])
    pt = pipe(labels, num_inference_steps=2, generator=_gen(0), output_type="pt", progress=False).images
    assert pt.shape == (2, 1, 16, 16) and pt.dtype == torch.float32
    pil = pipe(labels, num_inference_steps=2, generator=_gen(0), output_type="pil", progress=False).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].mode == "L" and pil[0].size == (16, 16)
    (latent,) = pipe(labels, num_inference_steps=2, generator=_gen(0), output_type="latent", return_dict=False)
    assert latent.shape == (2, 64, 4)
    np.testing.assert_allclose(pt[:, 0].numpy(), (unpack_tokens(latent) / 2 + 0.5).clamp(0, 1)[:, 0].numpy())


def test_transformer_called_like_flux_pipeline(pipe: DigitsPipeline) -> None:
    calls: list[dict] = []

    def record(module, args, kwargs):
        assert not args
        calls.append(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe([3, 5], num_inference_steps=4, generator=_gen(0), progress=False)
    finally:
        handle.remove()
    assert len(calls) == 4
    expected_sigmas = [1.0, 0.75, 0.5, 0.25]
    for kwargs, sigma in zip(calls, expected_sigmas):
        assert kwargs["hidden_states"].shape == (2, 64, 4)
        torch.testing.assert_close(kwargs["timestep"], torch.full((2,), sigma))
        assert kwargs["guidance"] is None and kwargs["joint_attention_kwargs"] is None
        assert kwargs["return_dict"] is False
        assert kwargs["encoder_hidden_states"].shape == (2, 4, 64)
        assert kwargs["pooled_projections"].shape == (2, 64)
        torch.testing.assert_close(kwargs["img_ids"], image_ids())
        torch.testing.assert_close(kwargs["txt_ids"], torch.zeros(4, 3))


def test_packing_matches_flux_conventions() -> None:
    images = torch.randn(3, 1, 16, 16)
    tokens = pack_images(images)
    # FluxPipeline._pack_latents: token (r, c) holds pixels [2r:2r+2, 2c:2c+2] in row-major order
    torch.testing.assert_close(tokens[:, 8 * 2 + 5], images[:, 0, 4:6, 10:12].reshape(3, 4))
    torch.testing.assert_close(unpack_tokens(tokens), images)
    ids = image_ids()
    assert ids.shape == (64, 3) and (ids[:, 0] == 0).all()
    assert ids[8 * 2 + 5].tolist() == [0.0, 2.0, 5.0]


def test_invalid_arguments(pipe: DigitsPipeline) -> None:
    for bad in ([10], [-1], [], [1.5]):
        with pytest.raises(ValueError):
            pipe(bad, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], num_inference_steps=1, output_type="jpeg", progress=False)


def test_train_smoke(tmp_path) -> None:
    info = train(tmp_path, steps=2, batch_size=4, threads=torch.get_num_threads())
    assert info["steps"] == 2
    pipe = DigitsPipeline.from_pretrained_embedded(tmp_path)
    assert pipe([4], num_inference_steps=1, progress=False).images.shape == (1, 16, 16)


def test_demo_core(pipe: DigitsPipeline, samples_20: np.ndarray, tmp_path) -> None:
    assert balanced_labels(2) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    samples = generate_digits(pipe, per_class=3, num_inference_steps=20, seed=0)
    np.testing.assert_array_equal(samples.images, samples_20)  # same noise as the plain pipeline call
    assert samples.labels.tolist() == LABELS and samples.seconds > 0
    assert samples.accuracy == classifier.accuracy(samples_20, LABELS)
    assert mean_abs_diff(samples, samples) == 0.0
    grid = PIL.Image.open(save_grid(samples, tmp_path / "grid.png", scale=2))
    assert grid.size == (2 + 3 * (32 + 2), 2 + 10 * (32 + 2)) and grid.mode == "RGB"
