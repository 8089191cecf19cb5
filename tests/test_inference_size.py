"""The test-size rule (``pipeline.nn.inference_size``): resize the shorter side, pad to the stride,
paste every task's predictions back at the original resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import PluginError
from pipeline.model import build_model
from pipeline.nn.inference_size import PAD_PIXEL, InferenceResize, box_scale, paste_maps


def test_input_size_follows_detectron2s_resize_shortest_edge() -> None:
    rule = InferenceResize(short=128, max_size=None, divisor=32)
    assert rule.input_size(375, 500) == (128, 171)  # 500 * 128 / 375 = 170.67
    assert rule.input_size(500, 375) == (171, 128)
    assert rule.input_size(128, 128) == (128, 128)
    assert rule.padded_size(128, 171) == (128, 192)
    capped = InferenceResize(short=800, max_size=1333, divisor=32)
    assert capped.input_size(1024, 2048) == (667, 1333)  # the long side caps the scale
    native = InferenceResize(short=0, divisor=32)
    assert native.input_size(375, 500) == (375, 500)
    assert native.padded_size(375, 500) == (384, 512)


def test_prepare_resizes_pads_with_the_mean_and_records_sizes() -> None:
    rule = InferenceResize(short=32, divisor=32)
    image = torch.full((2, 3, 60, 90), 200, dtype=torch.uint8)
    batch = {"image": image, "image_ids": [1, 2]}
    out = rule.prepare(batch)
    assert out["image"].shape == (2, 3, 32, 64) and out["image"].dtype == torch.uint8
    assert out["valid_size"] == (32, 48) and out["output_size"] == (60, 90)
    assert out["original_image"] is image and out["image_ids"] == [1, 2]
    assert (out["image"][:, :, :, :48] == 200).all()
    assert out["image"][0, :, 0, 60].tolist() == list(PAD_PIXEL)
    assert box_scale(out) == (90 / 48, 60 / 32)
    # already the resized, padded size: the batch itself, no keys added
    square = {"image": torch.zeros((1, 3, 32, 32), dtype=torch.uint8)}
    assert rule.prepare(square) is square and box_scale(square) == (1.0, 1.0)


def test_paste_maps_crops_the_padding_and_returns_the_original_size() -> None:
    rule = InferenceResize(short=32, divisor=32)
    batch = rule.prepare({"image": torch.zeros((1, 3, 60, 90), dtype=torch.uint8)})
    logits = torch.zeros((1, 2, 32, 64))
    logits[:, 1, :, :24] = 1.0  # class 1 on the left half of the valid 32x48 region
    logits[:, 1, :, 48:] = 5.0  # the padding: must not reach the result
    labels = paste_maps(logits, batch).argmax(1)
    assert labels.shape == (1, 60, 90)
    assert (labels[0, :, :44] == 1).all() and (labels[0, :, 46:] == 0).all()
    # maps at a fraction of the input resolution (a stride-4 head) are cropped proportionally
    quarter = paste_maps(logits[..., ::4, ::4], batch)
    assert quarter.shape == (1, 2, 60, 90)
    assert paste_maps(logits, {"image": logits}) is logits


def _config(tmp_path: Path, **data: Any) -> Any:
    sets = ["model.tasks=[semantic,depth,normals,colorization,panoptic,keypoints]",
            "model.heads={instance: {score_thresh: 0.0}, panoptic: {score_threshold: 0.0}}",
            "data.image_size=32", f"train.out_dir={tmp_path}"]
    sets += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, sets)


def test_every_task_predicts_at_the_original_resolution(tmp_path: Path,
                                                        tiny_dataset: Path) -> None:
    """A 45x70 image evaluated at test size 32 (input 32x50, padded to 32x64): every map comes
    back 45x70, boxes and keypoints lie in the original image."""
    card = DatasetCard.load(tiny_dataset / "meta.json")
    torch.manual_seed(0)
    model = build_model(_config(tmp_path), card).eval()
    assert model.inference_resize == InferenceResize(short=32, max_size=None, divisor=32)
    image = torch.randint(0, 256, (1, 3, 45, 70), dtype=torch.uint8)
    preds = model.predict({"image": image, "image_ids": [1]})
    assert preds["semantic"][0].shape == (45, 70)
    assert preds["depth"][0].shape == (45, 70)
    assert preds["normals"][0].shape == (3, 45, 70)
    lab = preds["colorization"][0]["lab"]
    assert lab.shape == (3, 45, 70)
    from plugins.colorization.task import image_lab

    assert torch.allclose(lab[0], image_lab(image)[0, 0], atol=1e-4)  # L* of the original image
    assert preds["panoptic"][0]["ids"].shape == (45, 70)
    inst = preds["instance"][0]
    assert len(inst["boxes"]) > 0 and inst["masks"].shape[1:] == (45, 70)
    assert float(inst["boxes"][:, 2].max()) <= 70 + 1e-3 and float(inst["boxes"][:, 3].max()) <= 45 + 1e-3
    kps = preds["keypoints"][0]["keypoints"]
    assert kps.shape[0] == 0 or float(kps[..., 0].max()) <= 70 + 1e-3


def test_a_plugin_ignoring_output_size_is_named(tmp_path: Path, tiny_dataset: Path) -> None:
    card = DatasetCard.load(tiny_dataset / "meta.json")
    model = build_model(_config(tmp_path), card).eval()
    semantic = model.tasks["semantic"]

    class Careless(type(semantic)):  # type: ignore[misc]
        def postprocess(self, output: Any, **kwargs: Any) -> list[torch.Tensor]:
            return list(output.argmax(1))

    model.tasks["semantic"] = Careless()
    with pytest.raises(PluginError, match=r"task semantic: postprocess returned a 32x64 map, "
                                          r"expected the original image size 45x70"):
        model.predict({"image": torch.zeros((1, 3, 45, 70), dtype=torch.uint8), "image_ids": [1]})
