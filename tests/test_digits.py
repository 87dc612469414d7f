"""Tests of the tiny FLUX digits model behind the demo (dbcache_compile.digits): weights, sample quality, pipeline
contract, the demo's batches and its labelled grid."""

from __future__ import annotations

import socket

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from dbcache_compile.digits import WEIGHTS_DIR, DigitsPipeline, load_digits_pipeline
from dbcache_compile.digits import classifier
from dbcache_compile.digits.demo import DigitSamples, balanced_labels, generate_digits, image_grid
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
    """The demo's model loads from the weights shipped in the package without any network access, as a FLUX
    transformer (the architecture the cache targets) small enough to ship (< 5 MiB)."""
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
    """Without weights the user gets an error naming the command that trains them."""
    with pytest.raises(FileNotFoundError, match="dbcache_compile.digits.train"):
        DigitsPipeline.from_pretrained_embedded(tmp_path)


def test_classifier_on_real_digits() -> None:
    """The accuracy column is meaningful: the classifier recognises >= 97 % of real held-out digits, whatever image
    format the pipeline returns."""
    assert classifier.held_out_accuracy() >= 0.97
    images, labels = load_real_digits()
    assert images.shape == (1797, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
    assert classifier.accuracy(images[:200], labels[:200]) >= 0.97
    # uint8 and (N, 1, 16, 16) tensor inputs are accepted too
    as_uint8 = (images[:50] * 255).round().astype(np.uint8)
    assert (classifier.classify(as_uint8) == classifier.classify(torch.from_numpy(images[:50])[:, None])).all()


def test_generated_digits_are_recognised(samples_20: np.ndarray) -> None:
    """The shipped model really draws the requested digits (>= 90 % recognised), so the demo's accuracy column can
    show what caching costs."""
    assert classifier.accuracy(samples_20, LABELS) >= 0.9


def test_random_model_is_near_chance() -> None:
    """An untrained model scores near chance: a high accuracy comes from the trained weights, not the classifier."""
    torch.manual_seed(0)
    random_pipe = DigitsPipeline(
        transformer=build_transformer().eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        conditioner=build_conditioner().eval(),
    )
    images = random_pipe(LABELS, num_inference_steps=20, generator=_gen(0), progress=False).images
    assert classifier.accuracy(images, LABELS) <= 0.3


def test_same_seed_same_images(pipe: DigitsPipeline, samples_20: np.ndarray) -> None:
    """The same seed gives the same images and another seed other images: the demo compares variants image by image."""
    again = pipe(LABELS, num_inference_steps=20, generator=_gen(0), progress=False).images
    np.testing.assert_array_equal(again, samples_20)
    other = pipe(LABELS, num_inference_steps=20, generator=_gen(1), progress=False).images
    assert not np.array_equal(other, samples_20)


def test_output_types(pipe: DigitsPipeline, samples_20: np.ndarray) -> None:
    """The pipeline returns np / pt / pil / latent outputs like a diffusers pipeline, consistently with each other."""
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
    """The digits pipeline calls its transformer exactly as diffusers' FluxPipeline does (keyword arguments, sigmas,
    return_dict=False), so what the demo shows carries over to FLUX.1 pipelines."""
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
    """Images are packed into 2x2-patch tokens with image ids as FluxPipeline packs latents."""
    images = torch.randn(3, 1, 16, 16)
    tokens = pack_images(images)
    # FluxPipeline._pack_latents: token (r, c) holds pixels [2r:2r+2, 2c:2c+2] in row-major order
    torch.testing.assert_close(tokens[:, 8 * 2 + 5], images[:, 0, 4:6, 10:12].reshape(3, 4))
    torch.testing.assert_close(unpack_tokens(tokens), images)
    ids = image_ids()
    assert ids.shape == (64, 3) and (ids[:, 0] == 0).all()
    assert ids[8 * 2 + 5].tolist() == [0.0, 2.0, 5.0]


def test_invalid_arguments(pipe: DigitsPipeline) -> None:
    """Bad labels or output types are errors, never silently clamped."""
    for bad in ([10], [-1], [], [1.5]):
        with pytest.raises(ValueError):
            pipe(bad, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], num_inference_steps=1, output_type="jpeg", progress=False)


def test_train_smoke(tmp_path) -> None:
    """The documented training command writes weights the pipeline loads."""
    info = train(tmp_path, steps=2, batch_size=4, threads=torch.get_num_threads())
    assert info["steps"] == 2
    pipe = DigitsPipeline.from_pretrained_embedded(tmp_path)
    assert pipe([4], num_inference_steps=1, progress=False).images.shape == (1, 16, 16)


def test_demo_core(pipe: DigitsPipeline, samples_20: np.ndarray) -> None:
    """The demo's batches: balanced labels class by class, the same noise (and images) as a plain pipeline call with
    the same seed, timed, and scored by the classifier."""
    assert balanced_labels(2) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    samples = generate_digits(pipe, per_class=3, num_inference_steps=20, seed=0)
    np.testing.assert_array_equal(samples.images, samples_20)  # same noise as the plain pipeline call
    assert samples.labels.tolist() == LABELS and samples.seconds > 0
    assert samples.accuracy == classifier.accuracy(samples_20, LABELS)


def test_demo_grid_labels_its_rows_and_marks_misrecognised_digits(samples_20: np.ndarray) -> None:
    """grid.png shows one row per variant with the variant's name written on its left, the digits in the same
    columns, and digits the classifier does not recognise tinted red."""
    labels = np.asarray(LABELS)
    samples = DigitSamples(images=samples_20, labels=labels, predicted=labels.copy(), seconds=1.0)
    wrong = labels.copy()
    wrong[0] = 7  # the classifier missed the first digit (a 0)
    missed = DigitSamples(images=samples_20, labels=labels, predicted=wrong, seconds=1.0)
    grid = np.asarray(image_grid([("uncached eager", samples), ("cached", missed)], scale=2))
    side, pad = 32, 2
    assert grid.shape[0] == 2 * (side + pad) + pad and grid.ndim == 3
    label_width = grid.shape[1] - len(LABELS) * (side + pad)
    assert label_width > 20  # room for the names
    for row in range(2):
        strip = grid[pad + row * (side + pad): (row + 1) * (side + pad), :label_width]
        assert (strip > 150).any(), f"row {row} has no label text"
    names = [grid[pad + r * (side + pad): (r + 1) * (side + pad), :label_width] for r in range(2)]
    assert not np.array_equal(names[0], names[1])  # two different names
    first = [grid[pad + r * (side + pad): pad + r * (side + pad) + side, label_width: label_width + side]
             for r in (0, 1)]
    assert np.array_equal(first[0][..., 0], first[0][..., 1])  # recognised: grey
    assert (first[1][..., 0] >= first[1][..., 1]).all() and (first[1][..., 0] > first[1][..., 1]).any()  # red tint
    other = DigitSamples(images=samples_20[:10], labels=np.arange(10), predicted=np.arange(10), seconds=1.0)
    with pytest.raises(ValueError, match="other labels"):
        image_grid([("a", samples), ("b", other)])
