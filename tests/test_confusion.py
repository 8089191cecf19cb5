"""ConfusionMatrix scores (FCN definitions) and label-folder evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from pipeline.errors import DataError
from plugins.semantic.confusion import ConfusionMatrix
from plugins.semantic.files import evaluate_label_folders, format_semseg_table

# Hand-computed example, 3 classes, one ignored pixel (255):
#   gt   = 0 0 0 0 1 | 1 1 2 2 255
#   pred = 0 0 0 1 1 | 1 2 2 0 1
# hist (rows gt, cols pred):   [[3, 1, 0],      row sums 4, 3, 2   (9 pixels)
#                               [0, 2, 1],      col sums 4, 3, 2
#                               [1, 0, 1]]      diag     3, 2, 1
# pixel_acc = 6/9                                            = 2/3
# mean_acc  = (3/4 + 2/3 + 1/2) / 3                          = 23/36
# IoU       = 3/(4+4-3), 2/(3+3-2), 1/(2+2-1) = 3/5, 1/2, 1/3
# mIoU      = (3/5 + 1/2 + 1/3) / 3                          = 43/90
# fwIoU     = 4/9 * 3/5 + 3/9 * 1/2 + 2/9 * 1/3             = 137/270
GT = np.array([[0, 0, 0, 0, 1], [1, 1, 2, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 0, 0, 1, 1], [1, 2, 2, 0, 1]], dtype=np.uint8)
HIST = [[3, 1, 0], [0, 2, 1], [1, 0, 1]]
NAMES = ("sky", "road", "car")
EXPECTED = {
    "pixel_acc": 2 / 3,
    "mean_acc": 23 / 36,
    "mIoU": 43 / 90,
    "fwIoU": 137 / 270,
    "IoU/sky": 3 / 5,
    "IoU/road": 1 / 2,
    "IoU/car": 1 / 3,
}


def _assert_scores(got: dict[str, float], expected: dict[str, float]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(PRED), torch.from_numpy(GT))
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == HIST
    _assert_scores(cm.compute(class_names=NAMES), EXPECTED)


def test_numpy_and_torch_inputs_agree() -> None:
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED.astype(np.uint16), GT.astype(np.int32))
    b.update(torch.from_numpy(PRED).long(), torch.from_numpy(GT).long())
    assert torch.equal(a.matrix, b.matrix)
    assert a.compute()["IoU/0"] == pytest.approx(3 / 5)


def test_matches_fcn_reference_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    k = 6
    gt = rng.integers(0, k, size=(4, 33, 17))
    gt[gt == 5] = 255  # class 5 never in the ground truth, sometimes predicted
    pred = rng.integers(0, k, size=gt.shape)
    cm = ConfusionMatrix(k)
    for p, g in zip(pred, gt, strict=True):
        cm.update(p, g)

    # FCN score.py, verbatim in spirit
    valid = (gt >= 0) & (gt < k)
    hist = np.bincount(k * gt[valid] + pred[valid], minlength=k * k).reshape(k, k)
    diag = np.diag(hist)
    iu = diag / (hist.sum(1) + hist.sum(0) - diag)
    freq = hist.sum(1) / hist.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = {
            "pixel_acc": diag.sum() / hist.sum(),
            "mean_acc": np.nanmean(diag / hist.sum(1)),
            "mIoU": np.nanmean(iu),
            "fwIoU": (freq[freq > 0] * iu[freq > 0]).sum(),
        }
    got = cm.compute()
    np.testing.assert_array_equal(cm.matrix.numpy(), hist)
    for key, value in ref.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key
    assert got["IoU/5"] == 0.0


def test_ignore_in_target_is_skipped_whatever_the_prediction() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1, 255]), np.array([0, 255, 255, 255]))
    assert cm.matrix.tolist() == [[1, 0], [0, 0]]
    assert cm.num_pixels == 1
    # class 1: absent from the ground truth and never predicted on a counted pixel -> left out
    _assert_scores(
        cm.compute(),
        {"pixel_acc": 1.0, "mean_acc": 1.0, "mIoU": 1.0, "fwIoU": 1.0, "IoU/0": 1.0},
    )


def test_prediction_of_ignore_on_labelled_pixel_is_a_miss() -> None:
    # gt 0 0; pred 0 255 -> one hit, one pixel with no prediction
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 255]), np.array([0, 0]))
    assert cm.matrix.tolist() == [[1, 0], [0, 0]]
    assert cm.num_pixels == 2
    # acc 1/2; IoU0 = 1 / (2 + 1 - 1) = 1/2; fwIoU = 1 * 1/2
    _assert_scores(
        cm.compute(),
        {"pixel_acc": 0.5, "mean_acc": 0.5, "mIoU": 0.5, "fwIoU": 0.5, "IoU/0": 0.5},
    )


def test_predicted_but_absent_class_counts_zero_and_absent_class_is_omitted() -> None:
    # 4 classes; gt 0 0 1 1, pred 0 2 1 1. Class 2 predicted only (IoU 0), class 3 nowhere.
    # IoU0 = 1/(2+1-1) = 1/2, IoU1 = 2/2 = 1, IoU2 = 0/(0+1-0) = 0 -> mIoU = 1/2
    # mean_acc over gt classes 0, 1 = (1/2 + 1) / 2 = 3/4; fwIoU = 1/2 * 1/2 + 1/2 * 1 = 3/4
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]))
    _assert_scores(
        cm.compute(),
        {
            "pixel_acc": 0.75,
            "mean_acc": 0.75,
            "mIoU": 0.5,
            "fwIoU": 0.75,
            "IoU/0": 0.5,
            "IoU/1": 1.0,
            "IoU/2": 0.0,
        },
    )


def test_merge_and_reset() -> None:
    first, second = ConfusionMatrix(3), ConfusionMatrix(3)
    first.update(PRED[0], GT[0])
    second.update(PRED[1], GT[1])
    assert first.merge(second) is first
    assert first.matrix.tolist() == HIST
    _assert_scores(first.compute(class_names=NAMES), EXPECTED)
    with pytest.raises(ValueError, match="num_classes"):
        first.merge(ConfusionMatrix(4))
    first.reset()
    assert first.num_pixels == 0
    assert all(math.isnan(first.compute()[k]) for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"))


def test_bad_inputs_raise_value_error_naming_the_value() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target has value 7"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="pred has value -1"):
        cm.update(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="class_names"):
        cm.compute(class_names=["a"])
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    assert cm.num_pixels == 0  # nothing counted by the failed updates


# ---------------------------------------------------------------------------------------------
# label folders


def _write_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(path)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """The hand example split over two images: one 8-bit, one 16-bit."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    _write_png(gt_dir / "a.png", GT[:1])
    _write_png(pred_dir / "a.png", PRED[:1])
    _write_png(gt_dir / "b.png", GT[1:].astype(np.uint16))
    _write_png(pred_dir / "b.png", PRED[1:].astype(np.uint16))
    return gt_dir, pred_dir


def test_label_folders_match_hand_computed_scores(folders: tuple[Path, Path]) -> None:
    got = evaluate_label_folders(*folders, num_classes=3, class_names=NAMES)
    _assert_scores(got, {f"semantic/{k}": v for k, v in EXPECTED.items()})

    console = Console(record=True, width=80)
    console.print(format_semseg_table(got))
    text = console.export_text()
    for needle in ("mIoU", "47.78", "pixel_acc", "66.67", "IoU/car", "33.33"):
        assert needle in text


def test_unpaired_files_raise_data_error(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    _write_png(gt_dir / "c.png", GT[:1])
    with pytest.raises(DataError, match=r"c\.png.*1 ground-truth file"):
        evaluate_label_folders(gt_dir, pred_dir, num_classes=3)
    (gt_dir / "c.png").unlink()
    _write_png(pred_dir / "z.png", PRED[:1])
    with pytest.raises(DataError, match=r"z\.png.*1 prediction file"):
        evaluate_label_folders(gt_dir, pred_dir, num_classes=3)


def test_label_out_of_range_raises_data_error(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    bad = GT[:1].copy()
    bad[0, 2] = 5
    _write_png(gt_dir / "a.png", bad)
    with pytest.raises(DataError, match=r"a\.png.*label 5.*\[0, 2\]") as info:
        evaluate_label_folders(gt_dir, pred_dir, num_classes=3)
    assert str(gt_dir / "a.png") in str(info.value)


def test_size_mismatch_and_rgb_raise_data_error(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    _write_png(pred_dir / "a.png", np.zeros((2, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"a\.png"):
        evaluate_label_folders(gt_dir, pred_dir, num_classes=3)
    _write_png(pred_dir / "a.png", np.zeros((1, 5, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="single-channel"):
        evaluate_label_folders(gt_dir, pred_dir, num_classes=3)
