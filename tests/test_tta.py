"""Multi-scale and flip inference (``evaluate.scales``, ``evaluate.flip``; ``pipeline.nn.tta``): the
default is today's single prediction, dense maps are averaged after un-flipping, detections are
un-flipped (keypoints renumbered left/right) and merged by NMS, every task answers at the original
size, and a plugin that implements none of the hooks still predicts from the plain view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError, PluginError
from pipeline.model import MultiTaskModel, build_model
from pipeline.nn.inference_size import InferenceResize, paste_maps
from pipeline.nn.regression_losses import unit_channels
from pipeline.nn.tta import (
    TestViews,
    hflip_boxes,
    hflip_detections,
    hflip_keypoints,
    merge_detections,
    predict_views,
    scaled_rule,
    view_batch,
)
from pipeline.task import Batch, DenseTask, Task
from plugins.colorization.task import image_lab
from plugins.depth.task import to_depth
from plugins.normals.task import NormalsTask

TASKS = "[semantic,depth,normals,colorization,panoptic,keypoints]"  # + instance: all seven
PYRAMID = TestViews(scales=(0.75, 1.0, 1.25), flip=True)


def _config(tmp_path: Path, *sets: str) -> Any:
    return load_config(None, [f"model.tasks={TASKS}", "data.image_size=32", f"train.out_dir={tmp_path}",
                              "model.heads={instance: {score_thresh: 0.0}, panoptic: {score_threshold: 0.0}}",
                              *sets])


@pytest.fixture(scope="module")
def model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> MultiTaskModel:
    """The seven tasks on random weights (seeded), test size 32, in eval mode."""
    torch.manual_seed(0)
    card = DatasetCard.load(tiny_dataset / "meta.json")
    return build_model(_config(tmp_path_factory.mktemp("tta")), card).eval()


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, 45, 70), dtype=torch.uint8, generator=g)


# -- config -------------------------------------------------------------------------------------
def test_config_defaults_and_bad_scales_are_one_line_errors(tmp_path: Path) -> None:
    cfg = load_config(None, [])
    assert cfg.evaluate.scales == [1.0] and cfg.evaluate.flip is False
    for bad in ("[]", "[1.0,0]", "[-0.5]"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"evaluate.scales={bad}"])
        assert "evaluate.scales" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="evaluate.scales"):
        TestViews(scales=())


def test_build_model_takes_the_views_from_evaluate(tmp_path: Path, tiny_dataset: Path) -> None:
    card = DatasetCard.load(tiny_dataset / "meta.json")
    cfg = load_config(None, ["model.tasks=[semantic]", f"train.out_dir={tmp_path}",
                             "evaluate.scales=[0.5,1.0]", "evaluate.flip=true"])
    views = build_model(cfg, card).test_views
    assert views == TestViews(scales=(0.5, 1.0), flip=True)
    assert views.views == [(0.5, False), (0.5, True), (1.0, False), (1.0, True)] and not views.is_plain
    assert TestViews().is_plain and not TestViews(scales=(0.75,)).is_plain


def test_view_rules_scale_the_test_size_and_flip_before_padding() -> None:
    rule = InferenceResize(short=32, max_size=64, divisor=32)
    assert scaled_rule(rule, 1.0, (45, 70)) is rule
    assert scaled_rule(rule, 1.25, (45, 70)) == InferenceResize(short=40, max_size=80, divisor=32)
    assert scaled_rule(InferenceResize(short=0), 0.5, (45, 70)).short == 23  # its own side x 0.5
    image = torch.arange(45 * 70, dtype=torch.float32).view(1, 1, 45, 70).expand(1, 3, 45, 70)
    batch = view_batch({"image": image}, rule, 1.0, True)
    assert batch["valid_size"] == (32, 50) and batch["output_size"] == (45, 70)
    assert torch.equal(batch["original_image"], image.flip(-1))
    plain = rule.prepare({"image": image})
    # the mirrored image is resized like the plain one, and its padding stays at the right
    assert torch.allclose(batch["image"][..., :50].flip(-1), plain["image"][..., :50], atol=1e-3)
    assert torch.equal(batch["image"][..., 50:], plain["image"][..., 50:])


# -- the view loop on stub tasks (exact arithmetic) --------------------------------------------------
class Ramp(DenseTask[Any]):
    """Dense stub: the head output is the map itself (aligned = pasted back); decide returns it."""

    name = "ramp"

    def build_head(self, **kwargs: Any) -> None:
        return None

    def losses(self, output: Any, batch: Batch, *, options: Any) -> dict[str, torch.Tensor]:
        return {}

    def aligned(self, output: torch.Tensor, *, batch: Batch, options: Any) -> torch.Tensor:
        return paste_maps(output, batch)

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: Any) -> list[torch.Tensor]:
        return list(aligned)

    def evaluator(self, **kwargs: Any) -> Any:
        return None

    def visualize(self, image: Any, prediction: Any, **kwargs: Any) -> Any:
        return image


class Boxes(Task[Any]):
    """Detection stub: one box at a fixed place in the network's input, scored by the view."""

    name = "boxes"
    build_head = Ramp.build_head
    losses = Ramp.losses
    evaluator = Ramp.evaluator
    visualize = Ramp.visualize

    def postprocess(self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: Any) -> list[dict[str, torch.Tensor]]:
        return [dict(d) for d in output]

    def merge_views(self, per_view: list[list[Any]], flipped: list[bool], *, batch: Batch,
                    options: Any) -> list[Any]:
        return merge_detections(per_view, flipped, width=70, nms_threshold=0.5, max_detections=None)


class Plain(Task[Any]):
    """A plugin that knows nothing of views: it reports the input width its output came from."""

    name = "plain"
    build_head = Ramp.build_head
    losses = Ramp.losses
    evaluator = Ramp.evaluator
    visualize = Ramp.visualize

    def postprocess(self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: Any) -> list[Any]:
        return [output] * int(batch["image"].shape[0])


class Combined(Plain):
    """Depends on ``ramp`` and ``plain``: sees their combined predictions."""

    name = "combined"
    depends_on = ("ramp", "plain")

    def postprocess(self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: Any) -> list[Any]:
        assert output is None
        return [(r.mean().item(), p) for r, p in zip(predictions["ramp"], predictions["plain"], strict=True)]


class StubModel:
    """``predict_views``' view of a model: ``ramp`` outputs each input column's index (in the
    network's input, so a mirrored view sees the same ramp), ``boxes`` one box per view."""

    def __init__(self, rule: InferenceResize) -> None:
        self.tasks = {t.name: t for t in (Ramp(), Boxes(), Plain(), Combined())}
        self.options: dict[str, Any] = dict.fromkeys(self.tasks)
        self.heads = {"ramp": nn.Identity(), "boxes": nn.Identity(), "plain": nn.Identity()}
        self.inference_resize = rule
        self.calls: list[tuple[int, int]] = []

    def __call__(self, batch: Batch) -> dict[str, Any]:
        n, _, h, w = batch["image"].shape
        self.calls.append((h, w))
        ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        box = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([w / 100]),
               "labels": torch.tensor([1])}
        return {"ramp": ramp.clone(), "boxes": [box] * n, "plain": int(batch.get("valid_size", (h, w))[1])}


def test_flip_averages_the_unflipped_maps_and_merges_detections() -> None:
    rule = InferenceResize(short=0, divisor=1)  # 45x70 as given: no resizing, no padding
    model = StubModel(rule)
    preds = predict_views(model, {"image": _image()}, TestViews(flip=True))
    assert model.calls == [(45, 70), (45, 70)]
    # mean of the ramp x and of the flipped view's ramp mirrored back (69 - x): 34.5 everywhere
    assert torch.equal(preds["ramp"][0], torch.full((1, 45, 70), 34.5))
    boxes = preds["boxes"][0]
    # the flipped view's box at x 10..30 is x 40..60 in the image: distinct, both kept, best first
    assert torch.equal(boxes["boxes"], torch.tensor([[10.0, 5.0, 30.0, 25.0], [40.0, 5.0, 60.0, 25.0]]))
    assert preds["plain"] == [70] and preds["combined"] == [(34.5, 70)]


def test_scales_without_one_run_the_plain_view_for_single_view_tasks() -> None:
    model = StubModel(InferenceResize(short=32, divisor=32))
    preds = predict_views(model, {"image": _image()}, TestViews(scales=(0.75, 1.25)))
    # 24x37 -> padded 32x64, 40x62 -> 64x64, then the plain view 32x50 -> 32x64 for ``plain``
    assert model.calls == [(32, 64), (64, 64), (32, 64)]
    assert preds["plain"] == [50]
    assert preds["ramp"][0].shape == (1, 45, 70)
    # the stub's box lies at the same place in both views: NMS keeps the better-scored one (the
    # 1.25 view's, 64 wide)
    assert len(preds["boxes"][0]["boxes"]) == 1
    assert float(preds["boxes"][0]["scores"][0]) == pytest.approx(0.64)


def test_a_task_averaged_without_decide_or_with_a_wrong_map_is_named() -> None:
    class NoDecide(Plain):
        def aligned(self, output: Any, *, batch: Batch, options: Any) -> torch.Tensor:
            return output

    with pytest.raises(PluginError, match="task plain: implements aligned but not decide"):
        NoDecide().view_combination()

    class WrongSize(Ramp):
        def aligned(self, output: torch.Tensor, *, batch: Batch, options: Any) -> torch.Tensor:
            return output  # not pasted back

    model = StubModel(InferenceResize(short=32, divisor=32))
    model.tasks["ramp"] = WrongSize()
    with pytest.raises(PluginError, match=r"task ramp: aligned returned \(1, 1, 32, 64\), "
                                          r"expected N x C x 45 x 70"):
        predict_views(model, {"image": _image()}, TestViews(flip=True))


def test_view_combination_of_the_built_in_tasks(model: MultiTaskModel) -> None:
    modes = {name: task.view_combination() for name, task in model.tasks.items()}
    assert modes == {"semantic": "average", "instance": "merge", "keypoints": "merge",
                     "panoptic": "single", "depth": "average", "normals": "average",
                     "colorization": "average"}


# -- un-flipping ------------------------------------------------------------------------------------
def test_normals_unflip_mirrors_and_negates_x_only() -> None:
    vectors = torch.randn(2, 3, 4, 5)
    back = NormalsTask().unflip(vectors, options=None)
    assert torch.equal(back[:, 0], -vectors[:, 0].flip(-1))
    assert torch.equal(back[:, 1:], vectors[:, 1:].flip(-1))
    assert torch.equal(Ramp().unflip(vectors, options=None), vectors.flip(-1))  # the default


def test_keypoints_swap_left_and_right_when_unflipped() -> None:
    kps = torch.tensor([[[10.0, 1.0, 0.9], [20.0, 2.0, 0.8], [30.0, 3.0, 0.7]]])
    back = hflip_keypoints(kps, torch.tensor([4]), 100, {4: (0, 2, 1)})  # 1 <-> 2 swap, 0 stays
    assert torch.equal(back, torch.tensor([[[90.0, 1.0, 0.9], [70.0, 3.0, 0.7], [80.0, 2.0, 0.8]]]))
    other = hflip_keypoints(kps, torch.tensor([5]), 100, {4: (0, 2, 1)})  # no map: mirrored only
    assert other[0, :, 0].tolist() == [90.0, 80.0, 70.0] and other[0, :, 1].tolist() == [1.0, 2.0, 3.0]
    assert hflip_boxes(torch.tensor([[10.0, 1.0, 30.0, 9.0]]), 100).tolist() == [[70.0, 1.0, 90.0, 9.0]]


def test_keypoint_task_merges_a_flipped_duplicate_back_onto_the_original(model: MultiTaskModel) -> None:
    task, options = model.tasks["keypoints"], model.options["keypoints"]
    perms = dict(options.flip_permutations)
    assert perms and all(sorted(p) == list(range(len(p))) and list(p) != sorted(p) for p in perms.values())
    label = next(iter(perms))
    k = len(perms[label])
    kps = torch.stack([torch.arange(k) * 3.0 + 1, torch.arange(k) + 5.0, torch.linspace(0.1, 0.9, k)], -1)
    truth = {"boxes": torch.tensor([[2.0, 3.0, 40.0, 30.0], [50.0, 3.0, 60.0, 30.0]]),
             "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([label, label]),
             "keypoints": torch.stack([kps, kps + 1])}
    mirrored = hflip_detections(truth, 70, perms)  # what a perfect network says on the flipped image
    mirrored["scores"] = torch.tensor([0.95, 0.5])
    merged = task.merge_views([[truth], [mirrored]], [False, True], batch={"image": _image()},
                              options=options)[0]
    # each duplicate pair collapses to its better-scored member, back in the image's frame with
    # every keypoint under its own name again
    assert merged["scores"].tolist() == pytest.approx([0.95, 0.6])
    assert torch.allclose(merged["boxes"], truth["boxes"])
    assert torch.allclose(merged["keypoints"][:, :, :2], truth["keypoints"][:, :, :2])
    assert torch.allclose(merged["keypoints"][0, :, 2], kps[:, 2])


def test_instance_merge_removes_duplicates_keeps_distinct_and_caps_the_count(model: MultiTaskModel) -> None:
    task, options = model.tasks["instance"], model.options["instance"]
    masks = torch.zeros((3, 45, 70), dtype=torch.bool)
    masks[0, 5:20, 5:20] = masks[1, 5:20, 50:65] = masks[2, 30:40, 30:40] = True
    boxes = [[5.0, 5.0, 20.0, 20.0], [50.0, 5.0, 65.0, 20.0], [30.0, 30.0, 40.0, 40.0]]
    view = {"boxes": torch.tensor(boxes),
            "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([1, 1, 2]), "masks": masks}
    flipped = hflip_detections(view, 70)
    flipped["labels"] = torch.tensor([1, 1, 3])  # the third box: another class, so not a duplicate
    merged = task.merge_views([[view], [flipped]], [False, True], batch={"image": _image()},
                              options=options)[0]
    assert merged["labels"].tolist() == [1, 1, 2, 3] and merged["masks"].shape == (4, 45, 70)
    assert torch.equal(merged["masks"][3], masks[2])  # mirrored back onto the same pixels
    capped = task.merge_views([[view], [flipped]], [False, True], batch={"image": _image()},
                              options=options.model_copy(update={"detections_per_image": 2}))[0]
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.8])


# -- the real model -------------------------------------------------------------------------------
def test_default_views_predict_exactly_what_postprocess_did(model: MultiTaskModel) -> None:
    """Default views: today's path, and each dense task's decide(aligned) is the postprocess it
    replaced (its formula, bit for bit); the view loop with only the plain view agrees."""
    image = _image()
    batch = {"image": image, "image_ids": [1]}
    preds = model.predict(batch)
    prepared = model.inference_resize.prepare(batch)
    out = model(prepared)
    assert torch.equal(preds["semantic"][0], paste_maps(out["semantic"], prepared).argmax(1)[0])
    assert torch.equal(preds["depth"][0], paste_maps(to_depth(out["depth"], "log"), prepared)[0, 0])
    assert torch.equal(preds["normals"][0], unit_channels(paste_maps(out["normals"].float(), prepared))[0])
    ab = torch.nn.functional.interpolate(_ab(model, out), size=tuple(prepared["image"].shape[-2:]),
                                         mode="bilinear", align_corners=False)
    lab = torch.cat([image_lab(image)[:, :1], paste_maps(ab, prepared)], 1)[0]
    assert torch.equal(preds["colorization"][0]["lab"], lab)
    looped = predict_views(model, batch, TestViews())
    for name in ("semantic", "depth", "normals"):
        assert torch.equal(looped[name][0], preds[name][0])
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(looped["instance"][0][key], preds["instance"][0][key])
    assert torch.equal(looped["panoptic"][0]["ids"], preds["panoptic"][0]["ids"])


def _ab(model: MultiTaskModel, out: dict[str, Any]) -> torch.Tensor:
    from plugins.colorization.task import predicted_ab

    return predicted_ab(out["colorization"], model.options["colorization"])


def test_flip_on_the_real_model_is_the_hand_computed_mean(model: MultiTaskModel) -> None:
    image = _image(1)
    rule = model.inference_resize
    plain = rule.prepare({"image": image})
    mirrored = rule.prepare({"image": image.flip(-1)})
    a, b = model(plain), model(mirrored)
    model.test_views = TestViews(flip=True)
    try:
        preds = model.predict({"image": image, "image_ids": [1]})
    finally:
        model.test_views = TestViews()
    logits = (paste_maps(a["semantic"], plain) + paste_maps(b["semantic"], mirrored).flip(-1)) / 2
    assert torch.equal(preds["semantic"][0], logits.argmax(1)[0])
    na, nb = paste_maps(a["normals"], plain), paste_maps(b["normals"], mirrored).flip(-1)
    nb[:, 0] = -nb[:, 0]
    assert torch.allclose(preds["normals"][0], unit_channels((na + nb) / 2)[0], atol=1e-6)
    depth = (paste_maps(to_depth(a["depth"], "log"), plain)
             + paste_maps(to_depth(b["depth"], "log"), mirrored).flip(-1)) / 2
    assert torch.allclose(preds["depth"][0], depth[0, 0], rtol=1e-6)


def test_every_task_answers_at_the_original_size_over_the_pyramid(model: MultiTaskModel) -> None:
    image = _image(2)
    model.test_views = PYRAMID
    try:
        preds = model.predict({"image": image, "image_ids": [1]})
    finally:
        model.test_views = TestViews()
    assert preds["semantic"][0].shape == (45, 70) and preds["semantic"][0].dtype == torch.int64
    assert preds["depth"][0].shape == (45, 70) and bool((preds["depth"][0] > 0).all())
    assert preds["normals"][0].shape == (3, 45, 70)
    assert torch.allclose(preds["normals"][0].norm(dim=0), torch.ones(45, 70), atol=1e-5)
    lab = preds["colorization"][0]["lab"]
    assert lab.shape == (3, 45, 70) and torch.allclose(lab[0], image_lab(image)[0, 0], atol=1e-4)
    assert preds["panoptic"][0]["ids"].shape == (45, 70)
    inst = preds["instance"][0]
    cap = model.options["instance"].detections_per_image
    assert 0 < len(inst["boxes"]) <= cap and inst["masks"].shape[1:] == (45, 70)
    assert float(inst["boxes"][:, 2].max()) <= 70 + 1e-3 and float(inst["boxes"][:, 0].min()) >= -1e-3
    assert bool((inst["scores"][:-1] >= inst["scores"][1:]).all())
    kps = preds["keypoints"][0]["keypoints"]
    assert kps.shape[0] == len(preds["keypoints"][0]["boxes"])
    assert kps.shape[0] == 0 or float(kps[..., 0].max()) <= 70 + 1e-3
