"""Pretrained backbones by name (``model.pretrained``): torchvision's cache, the offline one-line
rule, the sha256 check, frozen BatchNorm for detection, timm ``features_only`` backbones.

Nothing downloads here: every test runs with torch.hub's and Hugging Face's downloads replaced by
a failure, on caches pre-seeded in a temporary folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.model import build_model
from pipeline.nn.backbones import build_backbone
from tests.conftest import tiny_overrides

RESNET18 = "ResNet18_Weights.IMAGENET1K_V1"


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"something tried to download: {args} {kwargs}")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub dir (and Hugging Face cache) in ``tmp_path``; downloads fail loudly."""
    monkeypatch.delenv("DENSEPIPE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        import huggingface_hub
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
        import timm.models._hub as timm_hub

        monkeypatch.setattr(timm_hub, "hf_hub_download", _no_download)
    except ImportError:
        pass
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _seed_resnet18(hub: Path, monkeypatch: pytest.MonkeyPatch, *, name: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """Save a random resnet18's state dict in the hub cache; point the weights' URL at a file
    name carrying its true sha256 prefix (or save it under ``name``)."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in state.items():  # distinguishable from any fresh initialisation
        if v.is_floating_point():
            state[k] = torch.randn_like(v)
    folder = hub / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    if name is None:
        prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
        name = f"resnet18-{prefix}.pth"
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{name}")
    tmp.rename(folder / name)
    return state


def test_torchvision_weights_load_from_the_cache(hub: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    state = _seed_resnet18(hub, monkeypatch)
    with caplog.at_level("INFO", logger="pipeline.nn.pretrained"):
        backbone = build_backbone("resnet18", pretrained=RESNET18, fpn_channels=16)
    body = backbone.body.state_dict()
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert set(trunk) == set(body)
    for key, value in trunk.items():
        assert torch.equal(body[key], value), key
    assert backbone.pretrained_source.startswith(f"{RESNET18} (resnet18-")
    assert f"loaded {len(trunk)} tensors" in caplog.text
    # "imagenet" is the enum's DEFAULT; the member's short name is accepted too
    again = build_backbone("resnet18", pretrained="imagenet", fpn_channels=16)
    assert torch.equal(again.body.state_dict()["conv1.weight"], state["conv1.weight"])


def test_missing_file_is_one_line_naming_url_and_path(hub: Path) -> None:
    path = hub / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet18", pretrained=RESNET18, fpn_channels=16)
    assert str(err.value) == (
        f"model.pretrained {RESNET18}: not in the cache; download "
        f"https://download.pytorch.org/models/resnet18-f37072fd.pth to {path} (or set "
        f"model.download=true or DENSEPIPE_ALLOW_DOWNLOAD=1 to let densepipe download it)")


def test_download_only_when_allowed(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst))
        raise RuntimeError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setenv("DENSEPIPE_ALLOW_DOWNLOAD", "1")
    with pytest.raises(RuntimeError, match="offline"):
        build_backbone("resnet18", pretrained=RESNET18, fpn_channels=16)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                      str(hub / "checkpoints" / "resnet18-f37072fd.pth"))]


def test_wrong_hash_is_refused(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed_resnet18(hub, monkeypatch, name="resnet18-f37072fd.pth")  # bytes of another file
    with pytest.raises(ConfigError, match=r"^model.pretrained ResNet18_Weights.IMAGENET1K_V1: .*"
                                          r"resnet18-f37072fd.pth has sha256 [0-9a-f]{8}\.\.\., its "
                                          r"name expects f37072fd\.\.\.; delete it"):
        build_backbone("resnet18", pretrained=RESNET18, fpn_channels=16)


def test_unknown_name_lists_the_backbones_weights(hub: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet50", pretrained=RESNET18, fpn_channels=16)
    assert str(err.value) == (
        "model.pretrained='ResNet18_Weights.IMAGENET1K_V1' is not a weight of backbone 'resnet50'; "
        "allowed: imagenet, ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ConfigError, match="exclusive"):
        build_backbone("resnet18", pretrained=RESNET18, weights="x.pth")


def _cfg(tmp_path: Path, data: Path, *extra: str):
    return load_config(None, [*tiny_overrides(data, tmp_path, None), *extra])


def test_frozen_bn_for_detection_from_pretrained(hub: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, tiny_dataset: Path) -> None:
    state = _seed_resnet18(hub, monkeypatch)
    card = DatasetCard.load(tiny_dataset / "meta.json")
    det = build_model(_cfg(tmp_path, tiny_dataset, f"model.pretrained={RESNET18}",
                           "model.tasks=[instance]", "model.heads={}", "model.freeze_at=2"), card)
    body = det.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 20
    assert not any(p.requires_grad for n, p in body.named_parameters()
                   if n.startswith(("conv1.", "layer1.")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer2."))
    # frozen statistics and affine are the loaded ones
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    assert torch.equal(body.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])
    # dense tasks from pretrained weights and detection from scratch keep trainable BatchNorm
    for extra in ([f"model.pretrained={RESNET18}"], ["model.tasks=[instance]", "model.heads={}"]):
        model = build_model(_cfg(tmp_path, tiny_dataset, *extra), card)
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())


def test_timm_features_only_backbone_trains(hub: Path, tmp_path: Path, tiny_dataset: Path) -> None:
    pytest.importorskip("timm")
    from pipeline.engine.trainer import train

    backbone = build_backbone("timm:test_resnet", fpn_channels=16)
    spec = backbone.feature_spec
    assert [(k, spec[k].stride) for k in ("p2", "p3", "p4", "p5", "p6")] == [
        ("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32), ("p6", 64)]
    out = backbone(torch.randn(1, 3, 65, 63))
    assert out["p2"].shape == (1, 16, 17, 16) and out["c5"].shape[1] == spec["c5"].channels
    cfg = _cfg(tmp_path, tiny_dataset, "model.backbone=timm:test_resnet", "train.steps=1",
               "train.checkpoint_every=1", "train.channels_last=false")
    result = train(cfg)  # the trainer itself: stages.check_config does not know timm names yet
    assert result.step == 1 and len(result.losses) == 1
    assert (tmp_path / "train" / "last.pt").is_file()


def test_timm_pretrained_from_the_hugging_face_cache(hub: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    with pytest.raises(ConfigError, match=r"^model.pretrained test_resnet.r160_in1k: not in the "
                                          r"Hugging Face cache .*hf; download model.safetensors of "
                                          r"https://huggingface.co/timm/test_resnet.r160_in1k"):
        build_backbone("timm:test_resnet", pretrained="imagenet", fpn_channels=16)
    with pytest.raises(ConfigError, match=r"not a pretrained tag of timm model 'test_resnet'; "
                                          r"allowed: imagenet, r160_in1k"):
        build_backbone("timm:test_resnet", pretrained="in22k", fpn_channels=16)

    torch.manual_seed(2)
    state = timm.create_model("test_resnet").state_dict()
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                                str(snapshot / "model.safetensors"))
    backbone = build_backbone("timm:test_resnet", pretrained="imagenet", fpn_channels=16,
                              freeze_bn=True, freeze_at=2)
    loaded = backbone.body.net.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], state["conv1.0.weight"])
    assert backbone.pretrained_source == "test_resnet.r160_in1k"
    assert not any(type(m) is nn.BatchNorm2d for m in backbone.body.modules())
    assert not any(p.requires_grad for n, p in backbone.body.net.named_parameters()
                   if n.startswith(("conv1.", "layer1.")))
