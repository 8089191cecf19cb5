"""The instance (Mask R-CNN) and keypoints (Keypoint R-CNN) tasks on the shared backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data.card import DatasetCard
from pipeline.engine.loaders import eval_dataset, eval_loader, train_dataset
from pipeline.errors import ConfigError
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import default_registry
from plugins.rcnn.evaluator import CocoEvaluator
from plugins.rcnn.task import draw_detections

ALL = ["semantic", "instance", "keypoints"]


def _cfg(root: Path, tasks: list[str], **heads: dict) -> object:
    return config_from_dict({
        "data": {"root": str(root), "image_size": 64, "num_workers": 0, "augment": False},
        "model": {"backbone": "resnet18", "fpn_channels": 32, "tasks": tasks,
                  "heads": {"semantic": {"conv_dims": 32}, **heads}},
        "train": {"batch_size": 4, "channels_last": True},
    })


def _batch(root: Path, split: str = "train", n: int = 4) -> dict:
    cfg = _cfg(root, ALL)
    ds = train_dataset(cfg) if split == "train" else eval_dataset(cfg)  # type: ignore[arg-type]
    from pipeline.data.transforms import collate

    return collate([ds[i] for i in range(n)])


@pytest.fixture(scope="module")
def card(tiny_dataset: Path) -> DatasetCard:
    return DatasetCard.load(tiny_dataset / "meta.json")


def _model(root: Path, card: DatasetCard, tasks: list[str], **heads: dict) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(_cfg(root, tasks, **heads), card)  # type: ignore[arg-type]


def test_keypoints_share_the_instance_detector(tiny_dataset: Path, card: DatasetCard) -> None:
    # order in the config does not matter: instance runs first, keypoints reuses its detector
    model = _model(tiny_dataset, card, ["keypoints", "instance"])
    assert list(model.heads) == ["instance", "keypoints"]
    assert model.heads["keypoints"].detector is None
    own = _model(tiny_dataset, card, ["keypoints", "instance"], keypoints={"share_detector": False})
    assert own.heads["keypoints"].detector is not None
    alone = _model(tiny_dataset, card, ["keypoints"])
    # its own detector knows background + the keypointed class (figure) only
    assert alone.heads["keypoints"].detector.num_classes == 2
    shared_params = sum(p.numel() for p in model.parameters())
    assert shared_params < sum(p.numel() for p in own.parameters())


def test_presets_fill_settings_and_single_options_override(tiny_dataset: Path, card: DatasetCard) -> None:
    task = default_registry().get("instance")
    cpu = task.resolve_options(task.parse_options({}), card=card)
    gpu = task.resolve_options(task.parse_options({"preset": "gpu", "box_head_dim": 512}), card=card)
    assert (cpu.box_batch_size_per_image, cpu.mask_head_dims) == (64, (64, 64))
    assert cpu.anchor_sizes == (8, 16, 32, 64, 128)
    assert (gpu.box_batch_size_per_image, gpu.mask_head_dims) == (512, (256,) * 4)
    assert gpu.box_head_dim == 512 and gpu.anchor_sizes == (32, 64, 128, 256, 512)
    with pytest.raises(ConfigError, match=r"model.heads.instance.preset"):
        task.parse_options({"preset": "tpu"})


@pytest.mark.slow
def test_losses_go_down_when_fitting_a_batch(tiny_dataset: Path, card: DatasetCard) -> None:
    model = _model(tiny_dataset, card, ALL)
    model.use_channels_last(True)
    batch = _batch(tiny_dataset)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    history = []
    for _ in range(12):
        terms = model.losses(model(batch), batch)
        assert {"instance/rpn_objectness", "instance/cls", "instance/box_reg", "instance/mask",
                "keypoints/keypoint"} <= set(terms)
        assert not any(k.startswith("keypoints/rpn") for k in terms)  # shared detector: no second RPN
        history.append({k: float(v.detach()) for k, v in terms.items()})
        opt.zero_grad()
        model.total_loss(terms).backward()
        opt.step()
    first, last = history[0], history[-1]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    for term in ("instance/rpn_objectness", "instance/cls", "instance/mask", "keypoints/keypoint"):
        assert last[term] < first[term], (term, first[term], last[term])


def test_images_without_instance_labels_give_zero_connected_losses(tiny_dataset: Path,
                                                                   card: DatasetCard) -> None:
    model = _model(tiny_dataset, card, ["instance", "keypoints"])
    batch = _batch(tiny_dataset, n=2)
    batch["instances"] = [None, None]
    batch["has"]["instances"] = torch.tensor([False, False])
    model.train()
    terms = model.losses(model(batch), batch)
    total = model.total_loss(terms)
    assert float(total.detach()) == 0.0
    total.backward()  # the graph is connected: no error, gradients are zero
    grads = [p.grad for p in model.heads.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().sum()) == 0.0 for g in grads)


def test_predictions_have_the_documented_shapes(tiny_dataset: Path, card: DatasetCard) -> None:
    model = _model(tiny_dataset, card, ALL, instance={"score_thresh": 0.0})
    batch = _batch(tiny_dataset, "val", n=2)
    preds = model.predict(batch)
    things = set(card.thing_indices)
    figure = card.index_of_category(card.keypoints[0].category_id)
    for inst, kps in zip(preds["instance"], preds["keypoints"], strict=True):
        n = len(inst["scores"])
        assert n > 0  # score_thresh 0: an untrained model still outputs boxes
        assert inst["boxes"].shape == (n, 4) and inst["boxes"].dtype == torch.float32
        assert inst["masks"].shape == (n, 64, 64) and inst["masks"].dtype == torch.bool
        assert set(inst["labels"].tolist()) <= things
        assert bool((inst["scores"][:-1] >= inst["scores"][1:]).all())  # best first
        assert bool((inst["boxes"][:, 2:] >= inst["boxes"][:, :2]).all())
        assert bool((inst["boxes"] >= 0).all() and (inst["boxes"] <= 64).all())
        m = len(kps["scores"])
        assert kps["keypoints"].shape == (m, card.keypoints[0].num_keypoints, 3)
        assert set(kps["labels"].tolist()) <= {figure}
        # the keypoint detections are the instance detections of the keypointed class
        assert m == int((inst["labels"] == figure).sum())
        assert torch.equal(kps["boxes"], inst["boxes"][inst["labels"] == figure])


def test_keypoints_need_a_card_with_keypoints(tiny_dataset: Path, card: DatasetCard) -> None:
    bare = DatasetCard(card.name, card.classes)
    with pytest.raises(ConfigError, match="task keypoints: the dataset card of synthetic defines no keypoints"
                       ):
        build_model(_cfg(tiny_dataset, ["keypoints"]), bare)  # type: ignore[arg-type]


def test_ground_truth_as_predictions_scores_one(tiny_dataset: Path, card: DatasetCard) -> None:
    """The evaluator's path (batch -> COCO ground truth, predictions -> COCO results) is exact:
    a perfect model scores AP 1.0 for boxes, masks and keypoints."""
    cfg = _cfg(tiny_dataset, ALL)
    loader = eval_loader(cfg, eval_dataset(cfg), batch_size=2)  # type: ignore[arg-type]
    instance = CocoEvaluator(card, iou_types=("bbox", "segm"))
    keypoints = CocoEvaluator(card, iou_types=("keypoints",))
    num_kp = 0
    for batch in loader:
        preds = []
        for inst in batch["instances"]:
            keep = ~inst["iscrowd"]
            kp = inst["keypoints"][keep].clone()
            num_kp += int((kp[..., 2] > 0).sum())
            kp[..., 2] = 1.0  # predicted keypoints carry scores
            preds.append({"boxes": inst["boxes"][keep], "labels": inst["labels"][keep],
                          "scores": torch.ones(int(keep.sum())), "masks": inst["masks"][keep],
                          "keypoints": kp})
        instance.process(batch, preds)
        keypoints.process(batch, preds)
    assert num_kp > 0
    m = instance.compute()
    assert m["bbox_AP"] == pytest.approx(1.0) and m["segm_AP"] == pytest.approx(1.0)
    assert keypoints.compute()["AP"] == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in m.values())  # -1 ("not defined") is left out


def test_drawing_shows_boxes_names_and_skeleton(tiny_dataset: Path, card: DatasetCard) -> None:
    batch = _batch(tiny_dataset, "val", n=1)
    image = batch["image"][0].permute(1, 2, 0).numpy()
    inst = batch["instances"][0]
    n = len(inst["labels"])
    pred = {"boxes": inst["boxes"], "labels": inst["labels"], "scores": torch.full((n,), 0.9),
            "masks": inst["masks"], "keypoints": inst["keypoints"]}
    drawn = draw_detections(image, pred, card)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (drawn != image).any(axis=-1).mean() > 0.05
    low = dict(pred, scores=torch.full((n,), 0.1))
    assert np.array_equal(draw_detections(image, low, card), image)  # below min_score: nothing drawn


@pytest.mark.slow
def test_train_evaluate_writes_coco_files_that_coco_eval_scores_alike(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    """Train a few steps, evaluate: metrics.json has the COCO keys, the results and ground truth
    files are written (and logged to MLflow), and the standalone evaluator agrees with them."""
    import json
    import subprocess
    import sys

    from pipeline import stages
    from pipeline.config import load_config
    from tests.conftest import tiny_overrides

    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(tiny_dataset, tmp_path, mlflow_uri, train__steps=3,
                          model__tasks="[semantic,instance,keypoints]",
                          model__heads="{semantic: {conv_dims: 32}, instance: {score_thresh: 0.0}}")
    cfg = load_config(None, over)
    stages.train(cfg)
    metrics = stages.evaluate(cfg)
    for key in ("instance/bbox_AP", "instance/bbox_AP50", "instance/segm_AP", "instance/segm_AP75",
                "keypoints/AP", "keypoints/AP50", "semantic/mIoU"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert not any(v == -1 for v in metrics.values())
    assert "instance/bbox_APl" not in metrics  # no large objects in 64x64 images: not defined
    eval_dir = tmp_path / "eval"
    results = json.loads((eval_dir / "instance_coco_results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    kps = json.loads((eval_dir / "keypoints_coco_results.json").read_text())
    if kps:
        assert len(kps[0]["keypoints"]) == 3 * 14
    out = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "coco-eval", "--gt", str(eval_dir / "instance_coco_gt.json"),
         "--pred", str(eval_dir / "instance_coco_results.json"), "--type", "segm", "--json", str(out)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["AP"] == pytest.approx(metrics["instance/segm_AP"], abs=1e-12)
    image = next((tiny_dataset / "images" / "val").iterdir())
    files = stages.predict(cfg, [image], checkpoint=tmp_path / "train" / "best.pt", out_dir=tmp_path / "pred")
    names = {Path(f).relative_to(tmp_path / "pred").as_posix() for f in files}
    assert {f"instance/{image.stem}_instance.json", f"keypoints/{image.stem}_keypoints.json",
            f"vis/instance/{image.stem}.png", f"vis/keypoints/{image.stem}.png"} <= names
    detections = json.loads((tmp_path / "pred" / "instance" / f"{image.stem}_instance.json").read_text())
    assert detections and all(len(d["bbox"]) == 4 and "segmentation" in d for d in detections)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("densepipe").experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"instance_coco_results.json", "keypoints_coco_gt.json"} <= logged


def test_a_dilated_backbone_is_refused_by_the_rcnn_heads(tiny_dataset: Path, card: DatasetCard) -> None:
    from pipeline.config import config_from_dict

    cfg = config_from_dict({"data": {"root": str(tiny_dataset), "image_size": 64},
                            "model": {"backbone": "resnet18", "fpn_channels": 32, "output_stride": 8,
                                      "tasks": ["instance"]}})
    with pytest.raises(ConfigError, match=r"strides \[4, 8, 8, 8, 16\] \(backbone resnet18 at output "
                                          r"stride 8\); use model.output_stride=32"):
        build_model(cfg, card)  # type: ignore[arg-type]
