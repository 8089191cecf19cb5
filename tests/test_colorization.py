"""The colorization task (issue 6): the ab gamut bins, soft encoding, annealed mean and class
rebalancing of Zhang et al. (ECCV 2016), the loss on a tiny model seeing the gray view, grayscale
source images, the streaming evaluator, the drawing and the saved prediction."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plugins.colorization.task as colorization
from pipeline.config import config_from_dict
from pipeline.data.card import ClassInfo, DatasetCard
from pipeline.errors import ConfigError
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import TaskRegistry
from plugins.colorization.ab_bins import (
    RebalancingPrior,
    ab_gamut,
    annealed_mean,
    nearest_bin,
    nearest_centres,
    soft_cross_entropy,
    soft_encode,
    soft_targets,
)
from plugins.colorization.color import lab_to_rgb, rgb_to_lab
from plugins.colorization.metrics import psnr
from plugins.colorization.task import PSNR_CAP_DB, ColorizationTask

CARD = DatasetCard("toy", [ClassInfo(1, "thing", (255, 0, 0), True)])
RED_AB = (80.109, 67.220)  # pure sRGB red in CIE Lab (D65)


@pytest.fixture(scope="module")
def centres() -> torch.Tensor:
    return ab_gamut(10.0)


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry(entry_points=False, plugins=[colorization])


def _model(registry: TaskRegistry, **heads: object) -> MultiTaskModel:
    cfg = config_from_dict({"model": {"backbone": "resnet18", "fpn_channels": 8, "tasks": ["colorization"],
                                      "heads": {"colorization": {"conv_dims": 8, **heads}}}})
    torch.manual_seed(0)
    return build_model(cfg, CARD, registry=registry)


def _images() -> torch.Tensor:
    """Two 32x32 colour images: a red top half over noise."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    img[:, :, :16] = torch.tensor([200, 40, 40], dtype=torch.uint8).view(3, 1, 1)
    return img


def _batch(images: torch.Tensor, names: list[str]) -> dict:
    return {"image": images, "file_names": names, "image_ids": list(range(len(names))), "has": {}}


def _gray(image: torch.Tensor) -> torch.Tensor:
    return image[:1].expand(3, -1, -1).clone()


# ------------------------------------------------------------------------------------------------
# bins, encodings, prior
# ------------------------------------------------------------------------------------------------
def test_gamut_bins_are_the_srgb_cells(centres: torch.Tensor) -> None:
    assert centres.shape == (261, 2) and centres.dtype == torch.float32
    assert torch.equal(centres, torch.round(centres / 10) * 10)  # cell centres on multiples of 10
    assert len({tuple(c) for c in centres.tolist()}) == 261
    # every 8-bit colour (a random sample, and the primaries) lands in an occupied cell
    g = torch.Generator().manual_seed(1)
    rgb = torch.cat([torch.randint(0, 256, (20000, 3), generator=g).double() / 255,
                     torch.eye(3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)])
    cells = torch.round(rgb_to_lab(rgb)[:, 1:] / 10) * 10
    occupied = {tuple(c) for c in centres.tolist()}
    assert all(tuple(c) in occupied for c in cells.float().tolist())
    assert (80.0, 70.0) in occupied and int(nearest_bin(torch.tensor(RED_AB).view(1, 2, 1, 1), centres)) == \
        centres.tolist().index([80.0, 70.0])
    # and every cell holds an in-gamut colour: some L and some ab inside the cell give sRGB in [0, 1]
    offsets = torch.linspace(-5, 5, 5)
    da, db = torch.meshgrid(offsets, offsets, indexing="ij")
    L = torch.linspace(0, 100, 401)
    for c in centres.double():
        ab = torch.stack([c[0] + da.reshape(-1), c[1] + db.reshape(-1)], dim=-1).double()
        lab = torch.cat([L.double().repeat_interleave(25)[:, None], ab.repeat(len(L), 1)], dim=1)
        rgb = lab_to_rgb(lab)
        assert bool(((rgb >= -1e-9) & (rgb <= 1 + 1e-9)).all(dim=1).any()), f"cell {c.tolist()} out of gamut"


def test_soft_encoding(centres: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    ab = rgb_to_lab(rgb, channels_first=True)[:, 1:].float()
    z = soft_encode(ab, centres)
    assert z.shape == (2, 261, 5, 7)
    assert torch.allclose(z.sum(dim=1), torch.ones(2, 5, 7), atol=1e-6)
    assert ((z > 0).sum(dim=1) == 5).all()
    assert torch.equal(z.argmax(dim=1), nearest_bin(ab, centres))
    # a target on an interior centre: weight 1 on it and exp(-10^2 / (2 * 5^2)) on its 4 neighbours
    z0 = soft_encode(torch.zeros(1, 2, 1, 1), centres)[0, :, 0, 0]
    total = 1 + 4 * math.exp(-2)
    assert float(z0[centres.tolist().index([0.0, 0.0])]) == pytest.approx(1 / total, rel=1e-6)
    neighbours = [centres.tolist().index(c) for c in ([10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0])]
    assert z0[neighbours].tolist() == pytest.approx([math.exp(-2) / total] * 4, rel=1e-6)


def test_lattice_search_equals_the_exhaustive_search(centres: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    # in gamut, around it, and far outside it (where the 5 x 5 cell search must fall back)
    ab = torch.cat([torch.randn(2, 2, 9, 9, generator=g) * s for s in (20.0, 80.0, 400.0)])
    near = nearest_centres(ab, centres, 5)
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 1, 2)
    d = torch.sqrt(((flat - centres[None]) ** 2).sum(dim=-1))  # pixels x Q, by hand
    best, idx = d.topk(5, dim=1, largest=False)
    assert torch.equal(near.index.permute(0, 2, 3, 1).reshape(-1, 5), idx)
    assert torch.allclose(near.distance.permute(0, 2, 3, 1).reshape(-1, 5), best, atol=1e-3)
    assert torch.equal(nearest_bin(ab, centres).flatten(), d.argmin(dim=1))
    # halfway between (0, 0) and (10, 0): the lower index, as argmin over all centres
    tie = nearest_bin(torch.tensor([5.0, 0.0]).view(1, 2, 1, 1), centres)
    assert int(tie) == centres.tolist().index([0.0, 0.0]) < centres.tolist().index([10.0, 0.0])
    # centres off any lattice take the exhaustive path and give the same answer
    shuffled = centres[torch.randperm(len(centres), generator=g)]
    assert torch.equal(shuffled[nearest_bin(ab, shuffled)], centres[nearest_bin(ab, centres)])


def test_sparse_cross_entropy_equals_the_dense_one(centres: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    ab = torch.randn(2, 2, 6, 5, generator=g) * 40
    logits = torch.randn(2, len(centres), 6, 5, generator=g, requires_grad=True)
    soft = soft_targets(ab, centres)
    assert soft.index.shape == soft.weight.shape == (2, 5, 6, 5)
    dense = -(soft_encode(ab, centres) * torch.log_softmax(logits, dim=1)).sum(dim=1)
    sparse = soft_cross_entropy(logits, soft)
    assert torch.allclose(sparse, dense, atol=1e-5)
    grad_dense, = torch.autograd.grad(dense.sum(), logits)
    grad_sparse, = torch.autograd.grad(sparse.sum(), logits)
    assert torch.allclose(grad_sparse, grad_dense, atol=1e-6)


def test_annealed_mean_interpolates_mean_and_mode(centres: torch.Tensor) -> None:
    idx = [centres.tolist().index(c) for c in ([0.0, 0.0], [50.0, 20.0], [-30.0, -40.0])]
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    logits = torch.full((1, 261, 1, 1), -1e4)
    logits[0, idx, 0, 0] = probs.log().float() + 3.0  # any constant: softmax ignores it
    chosen = centres[idx].double()
    mean = (probs[:, None] * chosen).sum(0)
    assert annealed_mean(logits, centres, 1.0)[0, :, 0, 0].tolist() == pytest.approx(mean.tolist(), abs=1e-4)
    sharp = probs**2 / (probs**2).sum()  # T = 0.5 squares the probabilities
    assert annealed_mean(logits, centres, 0.5)[0, :, 0, 0].tolist() == pytest.approx(
        (sharp[:, None] * chosen).sum(0).tolist(), abs=1e-4)
    assert annealed_mean(logits, centres, 0.01)[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-3)


def test_rebalancing_weights(centres: torch.Tensor) -> None:
    prior = RebalancingPrior(centres)
    assert torch.equal(prior.weights(0.5), torch.ones(261))
    prior.eval()
    prior.update(torch.zeros(10, dtype=torch.int64))
    assert int(prior.counts.sum()) == 0  # evaluation never moves the prior
    prior.train()
    prior.update(torch.tensor([0] * 30 + [200] * 10))
    # no smoothing (tiny sigma): p = (0.75, 0.25), w = 1 / (0.5 p + 0.5 / Q), normalised by sum p w
    p = torch.zeros(261, dtype=torch.float64)
    p[0], p[200] = 0.75, 0.25
    w = 1 / (0.5 * p + 0.5 / 261)
    expected = (w / (p * w).sum()).tolist()
    assert prior.weights(0.5, sigma=0.01).double().tolist() == pytest.approx(expected, rel=1e-5)
    smoothed = prior.probabilities(5.0)
    weights = prior.weights(0.5, 5.0).double()
    assert float((smoothed * weights).sum()) == pytest.approx(1.0, rel=1e-6)
    assert weights[200] > weights[0] and weights[100] > weights[200]  # rare bins weigh more
    assert torch.allclose(prior.weights(1.0), torch.ones(261))


def test_prior_counts_are_saved_and_restored(centres: torch.Tensor) -> None:
    prior = RebalancingPrior(centres)
    prior.update(torch.tensor([3, 3, 7, 260]))
    assert set(prior.state_dict()) == {"counts"}
    buffer = io.BytesIO()
    torch.save(prior.state_dict(), buffer)
    restored = RebalancingPrior(centres)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(restored.counts, prior.counts) and torch.equal(restored.weights(), prior.weights())


# ------------------------------------------------------------------------------------------------
# the model and the loss
# ------------------------------------------------------------------------------------------------
def _train(model: MultiTaskModel, batch: dict, steps: int = 15) -> list[float]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.total_loss(model.losses(model(batch), batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(("loss", "term"), [("classification", "ce"), ("regression", "smooth_l1")])
@pytest.mark.slow
def test_loss_decreases_on_a_fixed_batch(registry: TaskRegistry, loss: str, term: str) -> None:
    model = _model(registry, loss=loss)
    assert model.views == ["gray"]
    head = model.heads["colorization"]
    assert head.dense.decoder is not None and head.prior.num_bins == 261
    assert "heads.colorization.prior.counts" in model.state_dict()
    batch = _batch(_images(), ["a.png", "b.png"])
    assert list(model.eval().losses(model(batch), batch)) == [f"colorization/{term}"]
    assert int(head.prior.counts.sum()) == 0  # evaluation mode: the prior does not move
    losses = _train(model, batch)
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(head.prior.counts.sum()) == 15 * 2 * 8 * 8  # every target pixel at 1/4 resolution


def test_the_head_sees_only_the_luma(registry: TaskRegistry) -> None:
    model = _model(registry).eval()
    image = _images()
    luma = (image.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1)
    gray = luma[:, None].expand(-1, 3, -1, -1).float()  # a float 0..255 image with R = G = B = luma
    with torch.no_grad():
        a = model({"image": image})["colorization"]["raw"]
        b = model({"image": gray})["colorization"]["raw"]
    assert a.shape == (2, 261, 8, 8) and torch.allclose(a, b, atol=1e-4)


def test_grayscale_sources_are_skipped_with_a_warning(registry: TaskRegistry) -> None:
    colorization.gray_images_seen.clear()
    model = _model(registry).eval()
    model.heads["colorization"].prior.train().update(torch.arange(0, 261, 3))
    task, opts = model.tasks["colorization"], model.options["colorization"]
    colour = _images()  # (batch norm and group norm need two images at 32 x 32)
    mixed = _batch(torch.cat([colour, _gray(colour[0])[None]]), ["c1.png", "c2.png", "old_photo.jpg"])
    with pytest.warns(UserWarning, match=r"colorization: old_photo.jpg is a grayscale image \(R = G = B\): "
                                         r"no colour target, skipped \(1 grayscale image so far\)"):
        mixed_loss = task.losses(model(mixed)["colorization"], mixed, options=opts)["ce"].detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the colour image alone warns nothing; the same file not twice
        alone = _batch(colour, ["c1.png", "c2.png"])
        alone_loss = task.losses(model(alone)["colorization"], alone, options=opts)["ce"].detach()
        task.losses(model(mixed)["colorization"], mixed, options=opts)
    assert float(mixed_loss) == pytest.approx(float(alone_loss), rel=1e-5) and float(alone_loss) > 0
    # only gray images: a zero loss that still reaches the weights
    model.train()
    gray = _batch(torch.stack([_gray(colour[0]), _gray(colour[1])]), ["g1.png", "g2.png"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        terms = model.losses(model(gray), gray)
    assert [str(w.message).split(" is ")[0] for w in caught] == [f"colorization: g{i}.png" for i in (1, 2)]
    assert float(terms["colorization/ce"].detach()) == 0.0
    model.total_loss(terms).backward()
    grads = [p.grad for p in model.heads["colorization"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert int(model.heads["colorization"].prior.counts.sum()) == 87  # gray images count nothing
    # the evaluator skips and counts them; the colour image's metrics are unchanged
    model.eval()
    ev_mixed, ev_alone = task.evaluator(card=CARD, options=opts), task.evaluator(card=CARD, options=opts)
    ev_mixed.process(mixed, model.predict(mixed)["colorization"])
    ev_alone.process(alone, model.predict(alone)["colorization"])
    m, a = ev_mixed.compute(), ev_alone.compute()
    assert m.pop("skipped_gray") == 1.0 and a.pop("skipped_gray") == 0.0 and m == pytest.approx(a)


# ------------------------------------------------------------------------------------------------
# evaluator, prediction, drawing, files
# ------------------------------------------------------------------------------------------------
def _truth_lab(images: torch.Tensor) -> torch.Tensor:
    return rgb_to_lab(images.double() / 255, channels_first=True).float()


def test_evaluator_on_hand_made_predictions() -> None:
    images = _images()
    lab = _truth_lab(images)
    task = ColorizationTask()
    opts = task.parse_options({})
    ev = task.evaluator(card=CARD, options=opts)
    ev.process(_batch(images, ["a", "b"]), [{"lab": lab[0]}, {"lab": lab[1]}])
    got = ev.compute()
    # a perfect prediction: every ab error 0; its 8-bit RGB is the image exactly, PSNR inf -> the cap
    assert got["acc_ab_10"] == 1.0 and got["auc"] == 1.0 and got["psnr"] == PSNR_CAP_DB
    assert got["skipped_gray"] == 0.0
    gray = torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1)
    gray_rgb = torch.round(lab_to_rgb(gray.double(), channels_first=True, clip=True) * 255) / 255
    assert got["psnr_gray"] == pytest.approx(psnr(gray_rgb, images.double() / 255), rel=1e-9)
    assert got["psnr_gray"] < 30
    # the gray baseline as a prediction scores psnr_gray; an ab offset of 20 everywhere: auc 1 - 20/150
    shifted = lab.clone()
    shifted[:, 2] += 20.0
    ev.reset()
    ev.process(_batch(images[:1], ["a"]), [{"lab": gray[0]}])
    ev.process(_batch(images[1:], ["b"]), [{"lab": gray[1]}])  # streaming: two batches, one result
    assert ev.compute()["psnr"] == pytest.approx(got["psnr_gray"], rel=1e-9)
    ev.reset()
    ev.process(_batch(images, ["a", "b"]), [{"lab": shifted[0]}, {"lab": shifted[1]}])
    shifted_metrics = ev.compute()
    assert shifted_metrics["auc"] == pytest.approx(1 - 20 / 150, abs=1e-5)
    assert shifted_metrics["acc_ab_10"] == 0.0
    ev.reset()
    assert all(math.isnan(v) for k, v in ev.compute().items() if k != "skipped_gray")


def test_prediction_drawing_and_file(registry: TaskRegistry, tmp_path: Path) -> None:
    model = _model(registry, temperature=0.5).eval()
    images = _images()[:, :, :, :30]  # 32 x 30: the 1/4 grid is 8 x 8 (rounded up)
    pred = model.predict(_batch(images, ["a", "b"]))["colorization"]
    assert len(pred) == 2 and pred[0]["lab"].shape == (3, 32, 30) and pred[0]["lab"].dtype == torch.float32
    assert torch.allclose(pred[0]["lab"][0], _truth_lab(images)[0, 0])  # L is the input's own
    task = model.tasks["colorization"]
    image = images[0].permute(1, 2, 0).numpy()
    panel = task.visualize(image, pred[0], card=CARD, options=model.options["colorization"])
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[1] >= 3 * 30 and panel.shape[0] > 32
    # the third panel is the image itself, below a caption, at the top-left of the last column
    hits = [(y, x) for y in range(panel.shape[0] - 31) for x in range(2 * 30, panel.shape[1] - 29)
            if np.array_equal(panel[y:y + 32, x:x + 30], image)]
    assert hits and hits[0][0] > 0
    paths = task.save_prediction(pred[0], str(tmp_path / "img"), card=CARD,
                                 options=model.options["colorization"])
    assert paths == [str(tmp_path / "img_colorization.png")]
    saved = np.asarray(Image.open(paths[0]))
    expected = lab_to_rgb(pred[0]["lab"].double(), channels_first=True, clip=True).permute(1, 2, 0).numpy()
    assert saved.shape == (32, 30, 3) and np.abs(saved.astype(float) - expected * 255).max() <= 0.5 + 1e-6


def test_options_are_checked(registry: TaskRegistry) -> None:
    task = ColorizationTask()
    with pytest.raises(ConfigError, match=r"^model\.heads\.colorization\.bogus: Extra inputs"):
        task.parse_options({"bogus": 1})
    with pytest.raises(ConfigError, match=r"model\.heads\.colorization\.temperature: Input should be gre"):
        task.parse_options({"temperature": 0})
    with pytest.raises(ConfigError, match=r"model\.heads\.colorization\.loss"):
        task.parse_options({"loss": "l2"})
    opts = task.parse_options({})
    got = (opts.loss, opts.rebalance, opts.rebalance_lambda, opts.temperature, opts.output_stride, opts.grid)
    assert got == ("classification", True, 0.5, 0.38, 4, 10.0)
    assert task.describe()["input_view"] == "gray" and task.describe()["requires"] == []


@pytest.mark.slow
def test_the_prior_resumes_exactly_from_a_checkpoint(tiny_dataset: Path, tmp_path: Path,
                                                     registry: TaskRegistry) -> None:
    from pipeline.config import load_config
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.trainer import train
    from tests.conftest import tiny_overrides

    def run(out: Path, steps: int) -> torch.Tensor:
        cfg = load_config(None, tiny_overrides(
            tiny_dataset, out, None, model__tasks="[colorization]", model__fpn_channels=8,
            model__heads="{colorization: {conv_dims: 8}}", train__steps=steps, train__checkpoint_every=2,
            train__best_metric="colorization/auc", evaluate__batch_size=2,
            data__augment=False))  # (the loader re-seeds augmentation on resume; colour jitter moves ab)
        result = train(cfg, registry=registry)
        return load_checkpoint(result.last)["model"]["heads.colorization.prior.counts"]

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert int(straight.sum()) == 4 * 2 * 16 * 16  # 4 steps of 2 images, 16 x 16 targets each
    assert torch.equal(resumed, straight)
