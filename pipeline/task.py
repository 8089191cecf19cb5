"""The Task contract every task plugin fulfils.

A ``Task`` is a stateless description of one prediction task: which labels it needs, on which
input view its head runs, how to build that head from the backbone's feature spec, its losses,
postprocessing, evaluator and visualisation. Per-task options come from ``model.heads.<name>`` in
the config and are validated by the task's ``Options`` model; the validated options reach
``build_head``, ``losses``, ``postprocess`` and ``evaluator`` (a task object itself holds no
per-model state, so one registry serves any number of models).

Data flow in ``MultiTaskModel``::

    features = backbone(view(images))                 # once per distinct input view
    output   = head(features, image_size=(H, W))      # raw head output, any structure
    losses   = task.losses(output, batch, options=opts)   # {"<term>": scalar tensor}
    preds    = task.postprocess(output, batch=batch, predictions=deps, options=opts)

A task with ``shares_with`` reuses the head output of those tasks when they are enabled too (it
does not enable them): its ``build_head`` gets ``shared_with`` (the enabled ones), its head runs
after theirs and its ``forward`` gets ``upstream={name: raw output}``. ``keypoints`` uses this to
run on the ``instance`` detector's RoIs.

A task with ``depends_on`` may have no head (``build_head`` returns ``None``): its
``postprocess`` combines the predictions of the tasks it depends on (``predictions``).

Options. ``Task`` is generic in the options type its methods receive: a plugin declares
``class MyTask(Task[MyOptions])`` with ``Options = MyOptions`` (the parse model) and types every
``options`` parameter ``MyOptions``. ``resolve_options`` turns the parsed options into that type
(a task whose resolved options are a subclass of its parse model, like panoptic's
``ResolvedPanopticOptions``, is parametrized by the resolved type). Every method below gets them:
``build_head``, ``losses``, ``postprocess``, ``evaluator``, ``export_forward``, and also
``visualize`` and ``save_prediction`` (e.g. a score threshold for drawing and saving).

The batch (``Batch``: a dict; what ``pipeline.data.transforms.collate`` builds from samples,
``pipeline.data.sample``)::

    image       uint8 B x 3 x H x W, RGB 0..255 (the model normalises it for the backbone)
    semantic    int64 B x H x W, dataset-card class indices, 255 = ignore
    depth       float32 B x H x W, metres, 0 = unknown
    normals     float32 B x 3 x H x W, camera-frame unit vectors (OpenCV axes), 0 = unknown
    <kind>      a plugin's dense label kind (``pipeline.data.label_kinds``): its dtype,
                B x H x W or B x C x H x W, its ``unknown`` value where unknown
    instances   list of B dicts (``boxes`` float32 N x 4 x1y1x2y2 pixels, ``labels`` int64 N,
                ``masks`` bool N x H x W, ``iscrowd`` bool N, ``ids`` int64 N, optional
                ``keypoints`` float32 N x K x 3), ``None`` for a sample without them
    panoptic    list of B dicts (``ids`` int64 H x W segment ids, 0 = void; ``segments``),
                ``None`` for a sample without them
    has         {kind: bool tensor B}: which samples have which labels
    image_ids   list of B ints (COCO image ids)
    file_names  list of B str
    meta        list of B dicts (``{"orig_size": (H, W)}``)

A dense map is a key only when some sample of the batch has it (the others are filled with the
kind's unknown value); ``instances`` / ``panoptic`` likewise. ``has`` always holds the built-in
dense kinds, ``instances``, ``panoptic`` and ``keypoints``, but a plugin's dense kind only when some
sample has it: read it with ``batch["has"].get(kind)``. Mask a loss with ``has``, not by looking
for the key.

At prediction time (``densepipe predict``, ``pipeline.predict``) the batch holds only ``image``,
``image_ids``, ``file_names``, ``meta`` (empty dicts) and ``has`` (empty: ``{}``); in serving
(``pipeline.serving``) only ``image`` (B = 1), ``image_ids`` and ``has`` (``{}``). So
``postprocess`` and a head's ``forward`` in eval mode must work from ``image`` alone (evaluation
batches carry labels, these do not).

Evaluation, predict and serving go through ``MultiTaskModel.predict``, which applies the test-size
rule (``pipeline.nn.inference_size``): when it resized or padded the images, the batch the head
and ``postprocess`` see also holds ``valid_size`` (rh, rw: the resized image inside the padded
``image``), ``output_size`` (H, W: the original size) and ``original_image`` (the untouched uint8
images); otherwise none of these keys exist. ``postprocess`` must return predictions at
``output_size`` (the input's size when absent): crop and resize dense maps with
``pipeline.nn.inference_size.paste_maps(maps, batch)`` and scale boxes / keypoints by
``box_scale(batch)``; both are no-ops for a batch that was not resized.

Multi-scale and flip inference (``evaluate.scales``, ``evaluate.flip``; ``pipeline.nn.tta``).
With more than the plain view (scale 1.0, unflipped), ``predict`` runs the model once per view
(the test size times each scale, each also mirrored left-right when ``flip``) and combines the
views per task by the optional methods the task implements (``view_combination``):

- dense maps, ``average``: ``aligned(output, *, batch, options)`` gives the view's
  ``N x C x H x W`` float maps at the original size, before any decision (semantic: logits;
  depth: metres; normals: unnormalised vectors; colorization: a*b*); ``unflip(aligned, *,
  options)`` maps a mirrored view's back (default: mirror; normals also negate x); the mean
  over the views goes to ``decide(mean, *, batch, predictions, options)``, which returns what
  ``postprocess`` returns (argmax, renormalise, ...). ``postprocess`` must equal
  ``decide(aligned(output))``: subclass ``DenseTask`` to get exactly that.
- detections, ``merge``: ``merge_views(per_view, flipped, *, batch, options)`` gets every view's
  ``postprocess`` predictions (at the original size, still mirrored for a flipped view) and
  returns one list (``pipeline.nn.tta.merge_detections``: un-flip, class-wise NMS, top k).
- ``single``: a task that implements neither, or that has ``depends_on``, is predicted by
  ``postprocess`` once, from the plain view's output (run in addition when 1.0 is not among the
  scales), with its dependencies' combined predictions (panoptic fuses the averaged semantic map
  and the merged instances). So a plugin that knows nothing of this keeps working, single-view.

In every combined call ``batch`` is the plain view's batch (``output_size``, ``original_image``
as above); ``aligned`` and a merged task's ``postprocess`` get their own view's batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from pipeline.config import validated_options
from pipeline.data.card import DatasetCard
from pipeline.data.label_kinds import LABEL_KINDS as _LABEL_KINDS
from pipeline.errors import PluginError
from pipeline.nn.backbones import FeatureLevel

Batch = dict[str, Any]
FeatureSpec = dict[str, FeatureLevel]
VIEWS = ("rgb", "gray")
LABEL_KINDS = _LABEL_KINDS  # a view of the registry: built-ins + plugins' dense kinds
OptionsT = TypeVar("OptionsT", bound=BaseModel)
"""The options type a ``Task``'s methods receive (what ``resolve_options`` returns)."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Evaluator(Protocol):
    """detectron2's DatasetEvaluator protocol: reset, process batches, compute once.

    Distributed evaluation (optional for third-party evaluators, every built-in one has it): each
    rank processes its own shard, the evaluators are gathered to rank 0 (pickled, e.g. by
    ``torch.distributed.all_gather_object``, so the state must pickle after ``process``) and merged
    there with::

        def merge(self, other: Self) -> None:
            \"\"\"Add ``other``'s accumulated results (another rank's shard, same class and options)
            into this evaluator. After merging every shard, ``compute()`` equals one pass over all
            the data (bit for bit where the metric is a sum or a concatenation).\"\"\"

    ``merge`` leaves ``other`` unchanged and raises a one-line ``TypeError`` naming both classes
    when ``other`` is of another class (``pipeline.metrics.merge.check_mergeable``)."""

    def reset(self) -> None: ...

    def process(self, batch: Batch, predictions: list[Any]) -> None: ...

    def compute(self) -> dict[str, float]:
        """Metric name (without the task prefix) -> float; ratios in [0, 1]."""
        ...


@dataclass(frozen=True)
class PredictedImage:
    """One predicted image, as ``Task.write_dataset_predictions`` receives it."""

    name: str
    """The input's path relative to the folder it was found in, POSIX (``sub/000001.png``); a
    file given by itself: its file name. Unique within a run, also without its extension."""
    image_id: int
    """Its COCO image id: from ``densepipe predict --coco-gt`` (matched by file name), else 1..N
    in input order."""
    height: int
    width: int
    """The image's size: the prediction is at this, its original resolution."""
    prediction: Any
    """This task's prediction for the image, as ``postprocess`` returned it (read only: the same
    object is drawn and saved by other writers meanwhile)."""


@dataclass(frozen=True)
class ExportOutput:
    """One named output of a task's ONNX graph (``densepipe export``, ``pipeline.export``)."""

    name: str
    """The graph output's name (unique across tasks, e.g. ``depth``)."""
    units: str
    meaning: str
    """What the values are, for the sidecar a deployer reads (shape, range, how to decode)."""
    per_class: bool = False
    """Channel ``i`` belongs to the dataset card's class ``i`` (the sidecar lists the classes)."""


class Task(ABC, Generic[OptionsT]):
    """One prediction task. Subclasses set the class attributes and implement the methods;
    ``OptionsT`` is the type of the options every method receives (module doc)."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    """Label kinds a sample needs for this task's loss and metrics (``LABEL_KINDS``)."""
    depends_on: ClassVar[tuple[str, ...]] = ()
    """Tasks whose predictions this one combines; enabling it enables them."""
    shares_with: ClassVar[tuple[str, ...]] = ()
    """Tasks whose head outputs this task's head reuses when they are enabled (see module doc)."""
    input_view: ClassVar[str] = "rgb"
    """Which view of the image the head sees (``VIEWS``)."""
    Options: ClassVar[type[BaseModel]] = NoOptions
    """Pydantic model of ``model.heads.<name>`` (extra keys forbidden): the parse model, usually
    ``OptionsT`` itself (``resolve_options`` maps it to ``OptionsT``)."""
    main_metric: ClassVar[str | None] = None
    """The metric (name without the task prefix) that sums the task up: the multi-task delta
    and the default model selection use it (``train.best_metric: auto`` takes the first enabled
    task's, in ``model.tasks`` order; ``None``: the task is never picked)."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """Names (without the task prefix) that the evaluator's ``compute`` reports; ``fnmatch``
    patterns for families (``IoU/*`` for per-class values). Empty: not declared, so a
    ``train.best_metric`` / ``train.early_stopping.metric`` of this task has only its task prefix
    checked; declared, the name must match one (``pipeline.config.check_metric``)."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    """Metrics (names without the task prefix) where smaller is better (errors); every other
    metric is maximised (``metric_goal``)."""
    export_outputs: ClassVar[tuple[ExportOutput, ...]] = ()
    """What ``export_forward`` returns, in order. Empty: the task is not exported to ONNX."""
    export_refusal: ClassVar[str] = "it defines no ONNX outputs (Task.export_outputs)"
    """Why the task cannot be exported when ``export_outputs`` is empty: one clause, for the error."""

    def parse_options(self, raw: dict[str, Any] | None) -> BaseModel:
        """``model.heads.<name>`` validated; a bad key or value is one ``ConfigError`` line."""
        return validated_options(self.Options, raw, key=f"model.heads.{self.name}",
                                 owner=f"options of {self.name}")

    def resolve_options(self, options: OptionsT, *, card: DatasetCard) -> OptionsT:
        """Fill in options that depend on the dataset (e.g. class weights from the card's class
        frequencies); the result is what every other method receives. ``options`` is what
        ``parse_options`` returned (an override may widen the parameter to the parse model when
        that is a base of ``OptionsT``). Default: unchanged."""
        return options

    @abstractmethod
    def build_head(
        self, *, feature_spec: FeatureSpec, card: DatasetCard, options: OptionsT
    ) -> nn.Module | None:
        """The head module. Its ``forward(features, *, image_size, batch)`` sees the FPN levels
        of this task's input view, the (H, W) of the input and the batch (labels for heads that
        need targets in training, like an RPN)."""

    @abstractmethod
    def losses(self, output: Any, batch: Batch, *, options: OptionsT) -> dict[str, torch.Tensor]:
        """Loss terms (scalar tensors, names without the task prefix). Samples lacking this
        task's labels (``batch["has"][kind]`` false) contribute nothing; with none in the batch,
        return zero-valued terms that keep the graph connected (``output.sum() * 0``)."""

    @abstractmethod
    def postprocess(
        self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]], options: OptionsT
    ) -> list[Any]:
        """One prediction per image at the input resolution. ``predictions`` holds those of the
        tasks in ``depends_on``."""

    # -- multi-scale and flip inference (optional; module doc, pipeline.nn.tta) -------------------
    def aligned(self, output: Any, *, batch: Batch, options: OptionsT) -> torch.Tensor:
        """Dense tasks, with ``decide``: the head ``output`` for ``batch`` (one view) as float
        ``N x C x H x W`` maps at the original image size (``output_size``; ``paste_maps``), in
        the units that are averaged over the views, before any decision. Not implemented: the
        task is not averaged over views."""
        raise NotImplementedError(f"{self.name}: aligned is not implemented")

    def unflip(self, aligned: torch.Tensor, *, options: OptionsT) -> torch.Tensor:
        """``aligned`` maps of a view whose image was mirrored left-right, in the unmirrored
        image's frame. Default: mirrored back (``flip(-1)``); override when the values change
        with a flip too (normals: negate x; a left/right class pair: swap the channels)."""
        return aligned.flip(-1)

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: OptionsT) -> list[Any]:
        """Dense tasks, with ``aligned``: the per-image predictions (what ``postprocess``
        returns) from ``aligned`` maps, one view's or their mean over the views. ``batch``: the
        plain view's; ``predictions``: those of ``depends_on``, combined."""
        raise NotImplementedError(f"{self.name}: decide is not implemented")

    def merge_views(self, per_view: list[list[Any]], flipped: list[bool], *, batch: Batch,
                    options: OptionsT) -> list[Any]:
        """Structured tasks (detections): one prediction per image from every view's.
        ``per_view[v]``: view ``v``'s ``postprocess`` predictions, at the original image size, in
        the mirrored frame where ``flipped[v]``; ``batch``: the plain view's. Un-flip, combine
        (e.g. ``pipeline.nn.tta.merge_detections``). Not implemented: single-view (module doc);
        not called for a task with ``depends_on``."""
        raise NotImplementedError(f"{self.name}: merge_views is not implemented")

    def view_combination(self) -> Literal["average", "merge", "single"]:
        """How ``predict`` combines several test views for this task (module doc): ``average``
        when ``aligned`` is implemented, else ``merge`` when ``merge_views`` is and the task has
        no ``depends_on``, else ``single``."""
        cls = type(self)
        if cls.aligned is not Task.aligned:
            if cls.decide is Task.decide:
                raise PluginError(f"task {self.name}: implements aligned but not decide; a task "
                                  "averaged over views needs both (pipeline.task)")
            return "average"
        if cls.merge_views is not Task.merge_views and not self.depends_on:
            return "merge"
        return "single"

    @abstractmethod
    def evaluator(self, *, card: DatasetCard, options: OptionsT) -> Evaluator:
        """A fresh evaluator for this task."""

    @abstractmethod
    def visualize(self, image: np.ndarray, prediction: Any, *, card: DatasetCard,
                  options: OptionsT) -> np.ndarray:
        """Draw ``prediction`` for an HxWx3 uint8 image (at the prediction's size); returns HxWx3
        uint8. ``options``: the model's resolved options for this task (e.g. a score threshold)."""

    def save_prediction(self, prediction: Any, path_stem: str, *, card: DatasetCard,
                        options: OptionsT) -> list[str]:
        """Write the raw prediction next to ``path_stem`` (``densepipe predict``, serving);
        return the paths. ``options``: as for ``visualize``."""
        return []

    def write_dataset_predictions(self, items: Iterable[PredictedImage], out_dir: str, *,
                                  card: DatasetCard) -> list[str]:
        """Write one run's predictions as the dataset-level files this task's standalone
        evaluator reads (``densepipe predict --eval-files``); return the paths of the files.

        Contract:

        - ``items`` yields every predicted image once, in processing order, while the images are
          being predicted (``densepipe predict`` feeds it from another thread): iterate it once,
          to the end, and keep only what the output format needs (e.g. COCO results, not the
          masks), so a run of any size fits in memory;
        - write only under ``out_dir``, into names that start with the task's name
          (``<name>_....json``, ``<name>_pred/``, ``<name>.json``), in the format of the task's
          evaluator, at the original resolution. Per-image files keep the item's folders and
          stem (``<name>_pred/sub/000001.png``) so they pair with ground truth named like the
          images; image ids in JSON files are the items' ``image_id``;
        - write atomically (``pipeline.io``); the folder is published only when the whole run
          succeeded, so a half-written set never shows;
        - raise a one-line ``DensepipeError`` naming the file for bad data.

        Default: writes nothing (a task whose ``save_prediction`` files are already what its
        metric reads needs nothing more)."""
        return []

    def export_forward(self, head: nn.Module, features: dict[str, torch.Tensor], *,
                       image: torch.Tensor, options: OptionsT) -> dict[str, torch.Tensor]:
        """The ``export_outputs`` tensors, by name, for the ONNX graph: what ``postprocess``
        computes, at the input resolution, in a form ``torch.export`` can trace (tensor ops only:
        no Python ``int()`` of sizes, no data-dependent branches). ``features``: the backbone
        levels of this task's input view; ``image``: float32 ``N x 3 x H x W`` sRGB levels 0..255.
        Only called when ``export_outputs`` is not empty."""
        raise NotImplementedError(f"{self.name}: export_outputs is set but export_forward is not")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requires": list(self.requires),
            "depends_on": list(self.depends_on),
            "shares_with": list(self.shares_with),
            "input_view": self.input_view,
            "main_metric": self.main_metric,
        }


class DenseTask(Task[OptionsT]):
    """A task whose prediction is decided from dense maps: implement ``aligned`` and ``decide``
    (and ``unflip`` when a flip changes the values); ``postprocess`` is
    ``decide(aligned(output))``, so one view and the mean of several go through the same
    decision (module doc: multi-scale and flip inference)."""

    @abstractmethod
    def aligned(self, output: Any, *, batch: Batch, options: OptionsT) -> torch.Tensor: ...

    @abstractmethod
    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: OptionsT) -> list[Any]: ...

    def postprocess(self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: OptionsT) -> list[Any]:
        """``decide(aligned(output))``: per-image predictions at the original image size."""
        return self.decide(self.aligned(output, batch=batch, options=options), batch=batch,
                           predictions=predictions, options=options)
