"""The dense CRF post-process (``plugins.semantic.crf``): the torch paths against the plain
reference on tiny images, the properties a user relies on, and its options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.errors import ConfigError
from plugins.semantic.crf import CRFOptions, dense_crf, dense_crf_batch, naive_dense_crf

# weights small enough that Q stays soft: a saturated (one-hot) Q would hide a wrong sum
SOFT = {"appearance_weight": 0.6, "smoothness_weight": 0.4, "theta_alpha": 3.0, "theta_beta": 30.0,
        "theta_gamma": 1.5, "iterations": 4}


def _case(h: int, w: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(classes, h, w, generator=g) * 1.5
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return logits, image


def _assert_distribution(q: torch.Tensor) -> None:
    assert q.dtype == torch.float32
    assert bool(((q >= 0) & (q <= 1)).all())
    torch.testing.assert_close(q.sum(dim=0), torch.ones(q.shape[1:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalization", ["symmetric", "none"])
@pytest.mark.parametrize("hw", [(6, 7), (7, 6), (8, 8)])
@pytest.mark.parametrize("window", [None, 3, 5, 17])
def test_matches_the_naive_reference(hw: tuple[int, int], window: int | None, normalization: str) -> None:
    """Exact path, windows smaller than the image and a window covering it (17 >= 2 x 8 - 1),
    with the reference code's kernel normalisation and with Algorithm 1's raw sums."""
    logits, image = _case(*hw)
    options = CRFOptions(window=window, normalization=normalization, **SOFT)
    got = dense_crf(logits, image, options)
    want = naive_dense_crf(logits, image, options)
    assert np.median(want.max(axis=0)) < 0.95  # not saturated: the comparison means something
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalization", ["symmetric", "none"])
def test_covering_window_equals_the_exact_path_and_the_defaults_match_the_reference(
        normalization: str) -> None:
    logits, image = _case(9, 11, classes=4, seed=1)
    exact = dense_crf(logits, image, CRFOptions(window=None, normalization=normalization))
    covering = dense_crf(logits, image, CRFOptions(window=21, normalization=normalization))
    np.testing.assert_allclose(covering.numpy(), exact.numpy(), atol=1e-5, rtol=0)
    want = naive_dense_crf(logits, image, CRFOptions(window=None, normalization=normalization))
    np.testing.assert_allclose(exact.numpy(), want, atol=1e-5, rtol=0)


def test_small_window_differs_from_full_but_is_a_distribution() -> None:
    logits, image = _case(16, 16, seed=2)
    full = dense_crf(logits, image, CRFOptions(window=None, **SOFT))
    small = dense_crf(logits, image, CRFOptions(window=3, **SOFT))
    assert (full - small).abs().max() > 1e-3
    _assert_distribution(small)
    _assert_distribution(full)


def test_zero_weights_give_the_softmax_of_the_unary() -> None:
    logits, image = _case(6, 7)
    for window in (None, 5):
        q = dense_crf(logits, image, CRFOptions(window=window, appearance_weight=0, smoothness_weight=0))
        torch.testing.assert_close(q, torch.softmax(logits, dim=0))


def test_batch_equals_one_image_at_a_time_and_float_images_equal_uint8() -> None:
    (l1, i1), (l2, i2) = _case(8, 9, seed=3), _case(8, 9, seed=4)
    options = CRFOptions(window=5, **SOFT)
    batch = dense_crf_batch(torch.stack([l1, l2]), torch.stack([i1, i2]).float(), options)
    torch.testing.assert_close(batch[0], dense_crf(l1, i1, options))
    torch.testing.assert_close(batch[1], dense_crf(l2, i2, options))


def _two_regions(h: int = 16, w: int = 16, flip: float = 0.25, seed: int = 0) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left half dark (class 0), right half bright (class 1); unaries confident but wrong on
    ``flip`` of the pixels."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(h, w, dtype=torch.int64)
    truth[:, w // 2:] = 1
    image = torch.where(truth.bool(), 200, 40).to(torch.uint8).expand(3, h, w).clone()
    image = (image.float() + torch.randn(3, h, w, generator=g) * 4).clamp(0, 255)
    noisy = torch.where(torch.rand(h, w, generator=g) < flip, 1 - truth, truth)
    logits = torch.nn.functional.one_hot(noisy, 2).permute(2, 0, 1).float() * 2.0 - 1.0
    return logits, image, truth


@pytest.mark.parametrize("window", [None, 5])
def test_reduces_label_noise_along_image_regions(window: int | None) -> None:
    """With the default parameters (DeepLab's weights, normalised kernels)."""
    logits, image, truth = _two_regions()
    wrong_before = int((logits.argmax(0) != truth).sum())
    q = dense_crf(logits, image, CRFOptions(window=window))
    wrong_after = int((q.argmax(0) != truth).sum())
    assert wrong_before > 40
    assert wrong_after < wrong_before // 4, (wrong_before, wrong_after)


def test_exact_path_refuses_a_large_image_and_names_the_fix() -> None:
    logits, image = _case(12, 20)
    with pytest.raises(ConfigError, match=r"12x20 image \(240 pixels\) is over max_pixels=200.*crf\.window"):
        dense_crf(logits, image, CRFOptions(window=None, max_pixels=200))
    dense_crf(logits, image, CRFOptions(window=5, max_pixels=200))  # the window path has no limit


@pytest.mark.parametrize(("field", "value"), [
    ("iterations", 0), ("appearance_weight", -1.0), ("theta_alpha", 0.0), ("theta_beta", -2.0),
    ("smoothness_weight", -0.5), ("theta_gamma", 0.0), ("window", 4), ("window", 0), ("max_pixels", 0),
    ("normalization", "l1"), ("bilateral", 1.0),
])
def test_bad_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        CRFOptions(**{field: value})


def test_defaults_are_deeplab_largefov() -> None:
    o = CRFOptions()
    assert (o.appearance_weight, o.theta_alpha, o.theta_beta, o.smoothness_weight, o.theta_gamma) == (
        4.0, 121.0, 5.0, 3.0, 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    logits, image = _case(16, 16, classes=4, seed=5)
    for window, normalization in ((None, "symmetric"), (7, "symmetric"), (7, "none")):
        options = CRFOptions(window=window, normalization=normalization, **SOFT)
        cpu = dense_crf(logits, image, options)
        gpu = dense_crf(logits.cuda(), image.cuda(), options)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_semantic_task_applies_the_crf_from_its_options_before_the_argmax() -> None:
    """``model.heads.semantic.crf``: the task's decision step denoises with the original image."""
    from pipeline.registry import default_registry

    task = default_registry().get("semantic")
    logits, image, truth = _two_regions()
    batch = {"image": image[None].to(torch.uint8)}
    plain = task.decide(logits[None], batch=batch, predictions={}, options=task.parse_options({}))[0]
    with_crf = task.decide(logits[None], batch=batch, predictions={},
                           options=task.parse_options({"crf": {"window": 5}}))[0]
    assert torch.equal(plain, logits.argmax(0))  # off by default
    assert int((with_crf != truth).sum()) < int((plain != truth).sum()) // 4
