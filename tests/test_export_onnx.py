"""ONNX export (``pipeline.export``, ``densepipe export``): the dense tasks of a tiny model run in
onnxruntime and give PyTorch's values at other batch sizes and image sizes; the sidecar describes
the graph; R-CNN tasks, sizes off the stride and a missing onnx are refused in one line.

Tolerance: every output within ``atol=1e-4`` + ``rtol=1e-4`` of PyTorch eager (float32 on CPU;
measured max abs differences are printed, run with ``-s``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.synthetic.spec import synthetic_card
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.errors import ExportError
from pipeline.export import DenseExportModule, ExportReport, export_onnx
from pipeline.model import PIXEL_MEAN, PIXEL_STD, MultiTaskModel, build_model
from pipeline.registry import default_registry

pytestmark = pytest.mark.slow  # a module fixture exports a model (about 17 s)

DENSE = ("semantic", "depth", "normals", "colorization")
OUTPUT_NAMES = ["semantic_logits", "depth", "normals", "colorization_lab"]
SIZE = 64
TOL = {"atol": 1e-4, "rtol": 1e-4}
LAB_TOL = {"atol": 1e-3, "rtol": 1e-4}
"""CIE Lab spans about 0..100 (L) and +-100 (a, b): float32 rounding in another summation order
reaches 2e-4 there; 1e-3 is a thousandth of a just-noticeable colour difference (Delta E 1)."""
CARD = synthetic_card(SIZE)


def _config(tasks: tuple[str, ...]):
    heads = "{" + ", ".join(f"{t}: {{conv_dims: 8, norm: BN}}" for t in tasks if t in DENSE) + "}"
    return load_config(None, [f"model.tasks=[{','.join(tasks)}]", "model.backbone=resnet18",
                              "model.fpn_channels=8", f"model.heads={heads}", f"data.image_size={SIZE}",
                              # the graph takes the image as given: predict matches it with the
                              # test-size rule at the original size (inputs are multiples of 32)
                              "data.test_size=0", "tracking.enabled=false"])


@pytest.fixture(scope="module")
def model() -> MultiTaskModel:
    """The four dense tasks on a small ResNet-18 FPN; each head's last convolution re-drawn with
    std 0.1 so that outputs vary like a trained model's (a fresh head predicts near-constants)."""
    torch.manual_seed(0)
    m = build_model(_config(DENSE), CARD, default_registry())
    with torch.no_grad():
        for head in m.heads.values():
            last = [c for c in head.modules() if isinstance(c, nn.Conv2d)][-1]
            nn.init.normal_(last.weight, std=0.1)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: MultiTaskModel) -> tuple[Path, str]:
    """A densepipe checkpoint of ``model`` and its sha256."""
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    digest = save_checkpoint(path, {"step": 3, "model": model.state_dict(), "card": CARD.to_json(),
                                    "config": _config(DENSE).model_dump(mode="json")})
    return path, digest


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint: tuple[Path, str]) -> ExportReport:
    """``densepipe export`` of the checkpoint (the command's function; the one export of the file)."""
    from pipeline.cli_export import export_command

    out = tmp_path_factory.mktemp("onnx") / "dense.onnx"
    return export_command(params=None, set_=None, checkpoint=checkpoint[0], model_uri=None, out=out,
                          format="onnx", tasks=None, opset=18, image_size=str(SIZE))


@pytest.fixture(scope="module")
def session(exported: ExportReport):
    import onnxruntime as ort

    return ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _check_against_pytorch(session, model: MultiTaskModel, images: torch.Tensor) -> dict[str, float]:
    """ONNX outputs vs the eager export module and vs ``model.predict`` (what ``densepipe predict``
    gives); returns the max abs difference per output."""
    names = [o.name for o in session.get_outputs()]
    got = {k: torch.from_numpy(v) for k, v in zip(names, session.run(None, {"image": images.float().numpy()}),
                                                  strict=True)}
    with torch.no_grad():
        eager = dict(zip(OUTPUT_NAMES, DenseExportModule(model, tasks=DENSE)(images.float()), strict=True))
        preds = model.predict({"image": images, "has": {}})
    diffs = {k: float((got[k] - eager[k]).abs().max()) for k in OUTPUT_NAMES}
    print(f"\nbatch {images.shape[0]}, {images.shape[-2]}x{images.shape[-1]}: max abs diff onnxruntime vs "
          "pytorch " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for k in OUTPUT_NAMES:
        assert got[k].shape == eager[k].shape, k
        tol = LAB_TOL if k == "colorization_lab" else TOL
        torch.testing.assert_close(got[k], eager[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(got["depth"][:, 0], torch.stack(preds["depth"]), **TOL)
    torch.testing.assert_close(got["normals"], torch.stack(preds["normals"]), **TOL)
    lab = torch.stack([p["lab"] for p in preds["colorization"]])
    torch.testing.assert_close(got["colorization_lab"], lab, **LAB_TOL)
    top2 = got["semantic_logits"].topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-3  # near-ties may flip within the tolerance
    assert decided.float().mean() > 0.99
    labels = got["semantic_logits"].argmax(dim=1)
    assert torch.equal(labels[decided], torch.stack(preds["semantic"])[decided])
    return diffs


def test_onnxruntime_matches_pytorch_at_two_batch_sizes(session, model: MultiTaskModel) -> None:
    for n in (1, 3):
        _check_against_pytorch(session, model, _images(n, SIZE, SIZE, seed=n))


def test_onnxruntime_matches_pytorch_at_another_image_size(session, model: MultiTaskModel,
                                                           exported: ExportReport) -> None:
    """H and W are dynamic (multiples of 32): 96x128 on a graph traced at 64x64."""
    assert exported.fixed_size_reason is None
    _check_against_pytorch(session, model, _images(2, 96, 128))


def test_sidecar_describes_the_graph(exported: ExportReport, checkpoint: tuple[Path, str]) -> None:
    from importlib.metadata import version

    import onnx

    side = json.loads(exported.sidecar.read_text())
    assert exported.sidecar == exported.path.with_suffix(".json")
    graph = onnx.load(str(exported.path)).graph
    assert [i["name"] for i in side["inputs"]] == [i.name for i in graph.input] == ["image"]
    assert [o["name"] for o in side["outputs"]] == [o.name for o in graph.output] == OUTPUT_NAMES
    image = side["inputs"][0]
    assert image["dtype"] == "float32" and image["shape"][:2] == ["N", 3]
    if not exported.fixed_size_reason:
        assert image["shape"][2:] == ["32*h", "32*w"]
        assert set(side["dynamic_axes"]) == {"N", "32*h", "32*w"}
    shapes = {o["name"]: o["shape"] for o in side["outputs"]}
    h, w = image["shape"][2:]
    assert shapes == {"semantic_logits": ["N", CARD.num_classes, h, w], "depth": ["N", 1, h, w],
                      "normals": ["N", 3, h, w], "colorization_lab": ["N", 3, h, w]}
    units = {o["name"]: o["units"] for o in side["outputs"]}
    assert units["depth"] == "metres" and units["colorization_lab"] == "CIE L*a*b* (D65)"
    assert side["outputs"][0]["classes"] == side["dataset"]["classes"] == CARD.class_names
    assert side["normalisation"]["inside_graph"] is True
    norm = side["normalisation"]
    assert norm["mean"] == list(PIXEL_MEAN) and norm["std"] == list(PIXEL_STD)
    assert side["stride"] == 32 and side["opset"] == 18
    assert side["tasks"] == list(DENSE)
    assert side["densepipe_version"] == version("densepipe")
    assert side["source"] == {"model": str(checkpoint[0]), "sha256": checkpoint[1]}


def test_rcnn_tasks_are_refused_in_one_line_naming_what_works(tmp_path: Path) -> None:
    tasks = ("semantic", "instance", "keypoints", "panoptic", "depth")
    model = build_model(_config(tasks), CARD, default_registry()).eval()
    out = tmp_path / "all.onnx"
    with pytest.raises(ExportError) as e:
        export_onnx(model, out, image_size=SIZE)
    assert str(e.value) == (
        "cannot export instance, keypoints, panoptic to ONNX (instance, keypoints: the R-CNN "
        "detector's score filter and NMS keep a data-dependent number of boxes, which torch.export "
        "cannot trace; panoptic: semantic and instance predictions are fused in Python, no graph of "
        "its own); export the others with --tasks semantic,depth")
    assert not out.exists()


def test_image_size_off_the_stride_is_refused(model: MultiTaskModel, tmp_path: Path) -> None:
    out = tmp_path / "odd.onnx"
    with pytest.raises(ExportError) as e:
        export_onnx(model, out, image_size=(100, 64))
    assert str(e.value) == ("image size 100x64: height and width must be multiples of the backbone "
                            "stride 32 (e.g. 128x64); pad or resize the images")
    assert not out.exists()


def test_unknown_task_and_format_are_refused(model: MultiTaskModel, tmp_path: Path,
                                            checkpoint: tuple[Path, str]) -> None:
    from pipeline.cli_export import export_command

    with pytest.raises(ExportError) as e:
        export_onnx(model, tmp_path / "x.onnx", tasks=["depth", "sky"], image_size=SIZE)
    assert str(e.value) == "tasks: sky not in this model (it has semantic, depth, normals, colorization)"
    with pytest.raises(ExportError) as e:
        export_command(params=None, set_=None, checkpoint=checkpoint[0], model_uri=None,
                       out=tmp_path / "x.onnx", format="tflite")
    assert str(e.value) == "--format tflite: expected one of onnx"


def test_without_onnx_the_command_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    checkpoint: tuple[Path, str]) -> None:
    import importlib.util

    from pipeline.cli_export import export_command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ExportError) as e:
        export_command(params=None, set_=None, checkpoint=checkpoint[0], model_uri=None,
                       out=tmp_path / "x.onnx")
    assert str(e.value) == "ONNX export needs onnx: pip install 'densepipe[export]'"
    assert not (tmp_path / "x.onnx").exists()


def test_the_graph_normalises_raw_pixels(session, model: MultiTaskModel) -> None:
    """Feeding ImageNet-normalised pixels instead of 0..255 levels changes every output: the graph
    expects raw levels."""
    images = _images(1, SIZE, SIZE).float()
    raw = session.run(["depth"], {"image": images.numpy()})[0]
    mean, std = np.array(PIXEL_MEAN).reshape(1, 3, 1, 1), np.array(PIXEL_STD).reshape(1, 3, 1, 1)
    normalised = ((images.numpy() - mean) / std).astype(np.float32)
    assert np.abs(session.run(["depth"], {"image": normalised})[0] - raw).max() > 1e-3


def test_export_command_names_a_task_the_model_lacks_in_one_error_line(
        checkpoint: tuple[Path, str], tmp_path: Path, monkeypatch, capsys) -> None:
    import sys

    from pipeline.cli import main

    out = tmp_path / "model.onnx"
    monkeypatch.setattr(sys, "argv", ["densepipe", "export", "--checkpoint", str(checkpoint[0]),
                                      "--tasks", "semantic,instance", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err == "error: tasks: instance not in this model (it has semantic, depth, normals, colorization)\n"
    assert not out.exists()
