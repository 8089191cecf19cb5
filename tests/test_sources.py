"""Several datasets, one model (``data.sources``, UberNet): two fixture datasets with disjoint
label kinds train one model; batches come from one source at a time by weight, resumably; each
source's metrics appear under its name; a task never takes loss from a source without its labels."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.engine.loaders import SourceMixSampler, loaded_kinds
from pipeline.errors import ConfigError
from tests.conftest import tiny_overrides


def _only(tiny: Path, root: Path, keep: set[str]) -> Path:
    """A copy of the tiny dataset with only the label kinds ``keep`` (of semantic, depth,
    normals, panoptic); instance boxes stay in the COCO JSON (which lists the images)."""
    shutil.copytree(tiny, root)
    for kind in {"semantic", "depth", "normals", "panoptic"} - keep:
        shutil.rmtree(root / kind)
        for split in ("train", "val"):
            (root / "annotations" / f"{kind}_{split}.json").unlink(missing_ok=True)
    return root


@pytest.fixture
def two_sources(tiny_dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    return (_only(tiny_dataset, tmp_path / "seg", {"semantic"}),
            _only(tiny_dataset, tmp_path / "geo", {"depth"}))


def _cfg(tmp_path: Path, seg: Path, geo: Path, *extra: str, weights: tuple[float, float] = (1, 1)):
    sources = (f"[{{name: seg, root: '{seg}', weight: {weights[0]}}}, "
               f"{{name: geo, root: '{geo}', weight: {weights[1]}}}]")
    over = tiny_overrides(seg, tmp_path / "runs", None, train__steps=6, model__tasks="[semantic, depth]")
    return load_config(None, [*over, f"data.sources={sources}", *extra])


def test_two_sources_with_disjoint_labels_train_one_model(two_sources, tmp_path: Path) -> None:
    from pipeline import stages
    from pipeline.engine.train_loop import HookBase

    seg, geo = two_sources
    cfg = _cfg(tmp_path, seg, geo, "train.eval_every=0")
    seen: list[tuple[dict[str, bool], dict[str, float]]] = []

    class Record(HookBase):
        def before_step(self, batch) -> None:  # type: ignore[override]
            self.has = {k: bool(v.any()) if hasattr(v, "any") else bool(v)
                        for k, v in batch["has"].items()}

        def after_step(self) -> None:
            losses: dict[str, float] = {}
            for key, value in self.trainer.row.items():
                if "/" in key and not key.startswith("weight/"):
                    task = key.split("/")[0]
                    losses[task] = losses.get(task, 0.0) + abs(value)
            seen.append((self.has, losses))

    from pipeline.engine.trainer import train

    result = train(cfg, trainer_hooks=[Record()])
    assert result.step == 6 and len(seen) == 6
    for has, losses in seen:  # a task takes loss only from batches holding its labels
        assert has["semantic"] != has["depth"], has  # one source per batch
        for task in ("semantic", "depth"):
            assert (losses.get(task, 0.0) > 0) == has[task], (task, has, losses)
    assert {has["semantic"] for has, _ in seen} == {True, False}  # both sources were drawn

    metrics = stages.evaluate(cfg)
    assert "semantic/mIoU@seg" in metrics and "depth/abs_rel@geo" in metrics
    assert not any(k.endswith("@geo") and k.startswith("semantic/") for k in metrics)
    assert not any(k.endswith("@seg") and k.startswith("depth/") for k in metrics)
    assert json.loads(Path(cfg.evaluate.metrics_file).read_text()) == pytest.approx(metrics)
    assert (Path(cfg.evaluate.out_dir) / "seg" / "vis_grid.png").exists()
    assert (Path(cfg.evaluate.out_dir) / "geo" / "vis_grid.png").exists()


def test_a_source_restricted_to_its_tasks_gives_no_other_labels(two_sources, tiny_dataset: Path,
                                                                tmp_path: Path) -> None:
    from pipeline.engine.loaders import train_dataset

    seg, _ = two_sources  # b has every label kind, but trains depth only
    sources = f"[{{name: a, root: '{seg}'}}, {{name: b, root: '{tiny_dataset}', tasks: [depth]}}]"
    over = tiny_overrides(seg, tmp_path / "runs", None, model__tasks="[semantic, depth]")
    ds = train_dataset(load_config(None, [*over, f"data.sources={sources}"]))
    b = ds.datasets[1]
    assert "semantic" in b.label_kinds and "semantic" not in loaded_kinds(b)  # on disk, not read
    assert "semantic" not in ds[ds.offsets[1]] and "depth" in ds[ds.offsets[1]]
    assert "semantic" in ds[0]


def test_sampler_draws_whole_batches_by_weight_and_resumes_exactly() -> None:
    sampler = SourceMixSampler([10, 30], [3.0, 1.0], seed=5, global_batch=4)
    stream = iter(sampler)
    batches = [[next(stream) for _ in range(4)] for _ in range(400)]
    sources = [{0 if i < 10 else 1 for i, _ in b} for b in batches]
    assert all(len(s) == 1 for s in sources)  # one source per global batch
    share = Counter(s.pop() for s in sources)[0] / 400
    assert 0.68 < share < 0.82  # weight 3:1
    positions = [p for b in batches for _, p in b]
    assert positions == list(range(1600))  # unique augmentation seeds
    resumed = iter(SourceMixSampler([10, 30], [3.0, 1.0], seed=5, global_batch=4, start_step=123))
    assert [next(resumed) for _ in range(40)] == [x for b in batches[123:133] for x in b]
    rank1 = iter(SourceMixSampler([10, 30], [3.0, 1.0], seed=5, global_batch=4, rank=1, world_size=2))
    assert [next(rank1) for _ in range(4)] == batches[0][2:] + batches[1][2:]


def test_sources_must_share_the_models_classes(tiny_dataset: Path, tmp_path: Path) -> None:
    from pipeline.engine.loaders import train_dataset

    other = _only(tiny_dataset, tmp_path / "other", {"semantic"})
    meta = json.loads((other / "meta.json").read_text())
    meta["classes"][1]["name"] = "renamed"
    (other / "meta.json").write_text(json.dumps(meta))
    sources = f"[{{name: main, root: '{tiny_dataset}'}}, {{name: other, root: '{other}'}}]"
    over = tiny_overrides(tiny_dataset, tmp_path / "runs", None)
    with pytest.raises(ConfigError, match=r"data.sources 'other': its .*semantic.* labels use other "
                                          r"classes than 'main' \(the model's\)"):
        train_dataset(load_config(None, [*over, f"data.sources={sources}"]))


@pytest.mark.parametrize(("extra", "message"), [
    (["data.sources=[{name: a, root: x, tasks: [normals]}]"],
     "data.sources[0] (a).tasks: 'normals' is not an enabled task"),
    (["data.sources=[{name: a, root: x}, {name: b, root: y}]", "train.best_metric=semantic/mIoU"],
     "train.best_metric 'semantic/mIoU': data.sources has several datasets; name one: "
     "semantic/mIoU@<a | b>"),
    (["train.best_metric=semantic/mIoU@a"], "@a names a source, but data.sources is empty"),
])
def test_source_config_errors_are_one_line(extra: list[str], message: str, tmp_path: Path) -> None:
    from pipeline.stages import check_config

    cfg = load_config(None, [*tiny_overrides(tmp_path, tmp_path / "runs", None), *extra])
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_auto_best_metric_names_the_first_source_training_it(tmp_path: Path) -> None:
    from pipeline.config import resolve_best_metric
    from pipeline.registry import default_registry

    cfg = load_config(None, ["model.tasks=[semantic, depth]",
                             "data.sources=[{name: geo, root: x, tasks: [depth]}, {name: seg, root: y}]"])
    tasks = default_registry().resolve(cfg.model.tasks)
    assert resolve_best_metric("auto", cfg.model.tasks, tasks, cfg.data.sources) == "semantic/mIoU@seg"
    assert resolve_best_metric("auto", cfg.model.tasks, tasks) == "semantic/mIoU"


def test_a_class_map_puts_a_sources_semantic_labels_into_the_models_classes(
        tiny_dataset: Path, tmp_path: Path) -> None:
    from pipeline.engine.loaders import train_dataset

    other = _only(tiny_dataset, tmp_path / "other", {"semantic"})
    meta = json.loads((other / "meta.json").read_text())
    names = [c["name"] for c in meta["classes"]]
    for c in meta["classes"]:
        c["name"] = "their " + c["name"]  # the same pixels, another dataset's class names
    (other / "meta.json").write_text(json.dumps(meta))
    mapping = {f"their {n}": n for n in names[1:]}  # their first class: not mapped, ignored
    (tmp_path / "map.yaml").write_text(json.dumps(mapping))
    over = [*tiny_overrides(tiny_dataset, tmp_path / "runs", None), "data.augment=false"]

    def dataset(class_map: str) -> object:
        sources = (f"[{{name: main, root: '{tiny_dataset}'}}, "
                   f"{{name: other, root: '{other}', class_map: {class_map}}}]")
        return train_dataset(load_config(None, [*over, f"data.sources={sources}"]))

    ds = dataset(f"'{tmp_path / 'map.yaml'}'")
    mine, theirs = ds[0]["semantic"], ds[ds.offsets[1]]["semantic"]  # the same image
    assert mine.shape == theirs.shape
    assert torch.equal(theirs[mine != 0], mine[mine != 0])  # mapped back onto the model's classes
    assert set(theirs[mine == 0].unique().tolist()) <= {255}  # the unmapped class: ignored
    with pytest.raises(ConfigError, match=r"data.sources 'other' class_map: 'nope' is not one of "
                                          r"its classes"):
        dataset("{nope: x}")
    with pytest.raises(ConfigError, match=r"-> 'road', which is not one of the model's classes"):
        dataset(f"{{'their {names[1]}': road}}")
