"""Training, resume, evaluation, prediction and MLflow tracking on the tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.config import load_config
from pipeline.data import collate, open_dataset
from pipeline.data.card import DatasetCard
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.errors import CheckpointError, DataError
from pipeline.model import build_model
from tests.conftest import tiny_overrides


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_dataset: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, tiny_overrides(tiny_dataset, Path("unused"), None))
    ds = open_dataset(tiny_dataset, "train")
    batch = collate([ds[i] for i in range(4)])
    model = build_model(cfg, ds.card)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model.total_loss(model.losses(model(batch), batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_train_resume_evaluate_and_mlflow_run(tiny_dataset: Path, tmp_path: Path,
                                               mlflow_uri: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, mlflow_uri))
    summary = stages.train(cfg)
    assert summary["step"] == 4
    last = load_checkpoint(tmp_path / "train" / "last.pt")
    assert last["step"] == 4 and set(last) >= {"model", "optimizer", "scheduler", "rng", "config"}
    assert (tmp_path / "train" / "best.pt").exists()

    # resume: asking for more steps continues from step 4, in the same MLflow run
    cfg6 = load_config(None, tiny_overrides(tiny_dataset, tmp_path, mlflow_uri, train__steps=6))
    resumed = stages.train(cfg6)
    assert resumed["step"] == 6 and resumed["run_id"] == summary["run_id"]
    csv = (tmp_path / "train" / "train_log.csv").read_text().splitlines()
    assert csv[0].startswith("step,")  # the whole history, each step once
    assert [int(line.split(",")[0]) for line in csv[1:]] == [1, 2, 3, 4, 5, 6]

    metrics = stages.evaluate(cfg6)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    for key in ("semantic/mIoU", "semantic/pixel_acc", "semantic/mean_acc", "semantic/fwIoU"):
        assert 0.0 <= written[key] <= 1.0
    assert any(k.startswith("semantic/IoU/") for k in written)
    assert (tmp_path / "eval" / "vis_grid.png").exists()

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(summary["run_id"])
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["model.tasks"] == "['semantic']"
    assert run.data.tags.get("changed.train.steps") == "6"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history][-1] == 6
    assert run.data.metrics["semantic/mIoU"] == pytest.approx(metrics["semantic/mIoU"])
    assert {"config.yaml", "checkpoints"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.info.status == "FINISHED"
    evaluation, = client.search_runs([run.info.experiment_id],  # nested under the training run
                                     filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert evaluation.info.run_name == "evaluate" and evaluation.info.status == "FINISHED"
    assert {"metrics.json", "vis_grid.png", "plots"} <= {a.path for a in client.list_artifacts(
        evaluation.info.run_id)}
    assert not (tmp_path / "mlruns").exists() or any((tmp_path / "mlruns").iterdir())


def test_checkpoint_errors_name_the_problem(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, None, train__steps=1))
    stages.train(cfg)
    best = tmp_path / "train" / "best.pt"

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pt: not a readable checkpoint"):
        stages.evaluate(cfg, truncated)

    other = load_config(None, tiny_overrides(tiny_dataset, tmp_path, None,
                                             model__heads="{semantic: {conv_dims: 16}}"))
    with pytest.raises(CheckpointError, match=r"best.pt: checkpoint does not match the model "
                                              r"config \(shape mismatch .*heads.semantic"):
        stages.evaluate(other, best)


def test_predict_writes_visualisations_and_raw_outputs(tiny_dataset: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, None, train__steps=1))
    stages.train(cfg)
    image = next((tiny_dataset / "images" / "val").iterdir())
    files = stages.predict(cfg, [image], checkpoint=tmp_path / "train" / "best.pt",
                           out_dir=tmp_path / "pred")
    names = sorted(Path(f).relative_to(tmp_path / "pred").as_posix() for f in files)
    assert names == ["predict_manifest.json", f"semantic/{image.stem}_semantic.png",
                     f"vis/semantic/{image.stem}.png"]
    from PIL import Image

    raw = Image.open(tmp_path / "pred" / "semantic" / f"{image.stem}_semantic.png")
    assert raw.size == Image.open(image).size
    card = DatasetCard.load(tiny_dataset / "meta.json")
    assert int(np.asarray(raw).max()) < card.num_classes

    # a 16-bit grayscale PNG is read by its bit depth: the same outputs as its 8-bit version
    gray8 = np.asarray(Image.open(image).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    for name in ("gray8", "gray16"):
        stages.predict(cfg, [tmp_path / f"{name}.png"] * 2,  # the same file twice: predicted once
                       checkpoint=tmp_path / "train" / "best.pt", out_dir=tmp_path / name)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gray8" / "semantic" / "gray8_semantic.png")),
                          np.asarray(Image.open(tmp_path / "gray16" / "semantic" / "gray16_semantic.png")))

    # all or nothing: a bad input among good ones writes nothing, into a new or an existing folder
    (tmp_path / "notimage.png").write_text("not an image")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    for out in ("fresh", "mine"):
        with pytest.raises(DataError, match=r"notimage\.png: "):
            stages.predict(cfg, [image, tmp_path / "notimage.png"],
                           checkpoint=tmp_path / "train" / "best.pt", out_dir=tmp_path / out)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "mine").glob(".*"))
    # a failure while predicting (here: a plugin's writer) leaves no outputs and no staging folder
    from plugins.semantic.task import SemanticTask

    def broken(*args: object, **kwargs: object) -> list[str]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(SemanticTask, "save_prediction", broken)
    for out in ("fresh", "mine"):
        with pytest.raises(RuntimeError, match="disk full"):
            stages.predict(cfg, [image], checkpoint=tmp_path / "train" / "best.pt",
                           out_dir=tmp_path / out)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def test_prepare_renders_once_then_skips_identical(tmp_path: Path) -> None:
    over = [f"data.root={tmp_path / 'data'}", "data.synthetic.num_train=2",
            "data.synthetic.num_val=1", "data.synthetic.image_size=32", "data.synthetic.workers=1"]
    first = stages.prepare(load_config(None, over))
    assert first["rendered"] is True
    assert len(list((tmp_path / "data" / "images" / "train").iterdir())) == 2
    again = stages.prepare(load_config(None, over))
    assert again["rendered"] is False
    changed = stages.prepare(load_config(None, [*over, "data.synthetic.seed=1"]))
    assert changed["rendered"] is True


def test_unreachable_mlflow_server_fails_before_training(tiny_dataset: Path, tmp_path: Path) -> None:
    import socket
    import time

    from pipeline.errors import TrackingError

    with socket.socket() as s:  # a free loopback port: nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, uri))
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking.uri {uri}: MLflow server not reachable"):
        stages.train(cfg)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "train").exists()  # nothing trained, nothing written

    missing = f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match=r"folder .*no/such does not exist"):
        stages.train(load_config(None, tiny_overrides(tiny_dataset, tmp_path, missing)))
