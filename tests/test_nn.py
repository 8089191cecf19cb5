"""Backbones (+FPN) and the semantic FPN decoder: shapes, specs, local weights, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.errors import ConfigError
from pipeline.nn import (
    BACKBONES,
    FeatureLevel,
    SemanticFPNHead,
    build_backbone,
    register_backbone,
    upsample_to,
)
from pipeline.nn import backbones as backbones_module

LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
SIZES = [(128, 128), (97, 131)]


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet18", fpn_channels=32).eval()


def _check_outputs(backbone: torch.nn.Module, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, *size))
    assert list(out) == list(LEVELS)
    assert list(backbone.feature_spec) == list(out)
    for name, x in out.items():
        spec = backbone.feature_spec[name]
        assert spec.stride == LEVELS[name]
        expected = (
            1,
            spec.channels,
            math.ceil(size[0] / spec.stride),
            math.ceil(size[1] / spec.stride),
        )
        assert tuple(x.shape) == expected, name
    return out


def test_builtins_are_registered() -> None:
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v3_large"} <= set(BACKBONES)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "mobilenet_v3_large"])
def test_feature_spec_matches_outputs(name: str) -> None:
    backbone = build_backbone(name, fpn_channels=16).eval()
    assert all(
        spec == FeatureLevel(channels=16, stride=LEVELS[k])
        for k, spec in backbone.feature_spec.items()
    )
    for size in SIZES:
        _check_outputs(backbone, size)


def test_resnet50_builds_with_spec() -> None:
    backbone = build_backbone("resnet50")
    assert backbone.feature_spec == {
        k: FeatureLevel(channels=128, stride=s) for k, s in LEVELS.items()
    }
    assert backbone.fpn.inner_blocks[-1][0].in_channels == 2048


@pytest.mark.parametrize("norm", ["frozen_bn", "gn"])
def test_norm_options(norm: str) -> None:
    backbone = build_backbone("resnet18", fpn_channels=16, norm=norm)
    kind = torchvision.ops.FrozenBatchNorm2d if norm == "frozen_bn" else torch.nn.GroupNorm
    assert isinstance(backbone.body.bn1, kind)
    _check_outputs(backbone.eval(), (64, 64))


def test_backbone_and_head_train_step_odd_size() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", fpn_channels=32).train()
    head = SemanticFPNHead(backbone.feature_spec, num_outputs=5, conv_dims=16)
    image = torch.randn(2, 3, 65, 71)
    logits = head(backbone(image), output_size=image.shape[-2:])
    assert logits.shape == (2, 5, 65, 71)
    logits.mean().backward()
    assert backbone.body.conv1.weight.grad is not None


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 1)])
def test_semantic_head_output_size(resnet18: torch.nn.Module, size: tuple[int, int]) -> None:
    features = _check_outputs(resnet18, size)
    head = SemanticFPNHead(resnet18.feature_spec, num_outputs=7, conv_dims=16).eval()
    with torch.no_grad():
        assert head(features, output_size=size).shape == (1, 7, *size)
        low = head(features)  # no output_size: common stride 4
    assert low.shape == (1, 7, math.ceil(size[0] / 4), math.ceil(size[1] / 4))


def test_semantic_head_subset_of_levels(resnet18: torch.nn.Module) -> None:
    with torch.no_grad():
        features = resnet18(torch.randn(1, 3, 97, 131))
        head = SemanticFPNHead(
            resnet18.feature_spec,
            in_features=("p3", "p5"),
            num_outputs=3,
            conv_dims=8,
            common_stride=8,
            norm="",
        )
        assert head(features).shape == (1, 3, 13, 17)
        assert head(features, output_size=(97, 131)).shape == (1, 3, 97, 131)
    with pytest.raises(ValueError, match="p9"):
        SemanticFPNHead(resnet18.feature_spec, in_features=("p9",), num_outputs=1)


def test_upsample_to() -> None:
    x = torch.randn(1, 2, 5, 7)
    assert upsample_to(x, (5, 7)) is x
    assert upsample_to(x, (11, 13)).shape == (1, 2, 11, 13)


# ---------------------------------------------------------------------------------------------
# weights


def test_loads_torchvision_classification_state_dict(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-local.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("resnet18", weights=path, fpn_channels=16)
    assert torch.equal(backbone.body.conv1.weight, source.conv1.weight)
    assert torch.equal(backbone.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    frozen = build_backbone("resnet18", weights=path, fpn_channels=16, norm="frozen_bn")
    assert torch.equal(frozen.body.bn1.weight, source.bn1.weight)


def test_loads_mobilenet_classification_state_dict(tmp_path: Path) -> None:
    source = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("mobilenet_v3_large", weights=str(path), fpn_channels=16)
    assert torch.equal(backbone.body["16"][0].weight, source.features[16][0].weight)


def test_loads_densepipe_backbone_state_dict(tmp_path: Path, resnet18: torch.nn.Module) -> None:
    path = tmp_path / "backbone.pt"
    torch.save(resnet18.state_dict(), path)
    loaded = build_backbone("resnet18", weights=path, fpn_channels=32)
    for key, value in resnet18.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bad_weight_files_raise_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="not found") as info:
        build_backbone("resnet18", weights=missing)
    assert str(missing) in str(info.value)

    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    with pytest.raises(ConfigError, match=r"unexpected keys layer1\.2\.") as info:
        build_backbone("resnet18", weights=other)
    assert str(other) in str(info.value) and "\n" not in str(info.value)

    wrong_shape = tmp_path / "fpn64.pt"
    torch.save(build_backbone("resnet18", fpn_channels=64).state_dict(), wrong_shape)
    with pytest.raises(ConfigError, match="shape mismatch fpn") as info:
        build_backbone("resnet18", weights=wrong_shape, fpn_channels=32)
    assert str(wrong_shape) in str(info.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pth"):
        build_backbone("resnet18", weights=garbage)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ConfigError, match="not a state dict"):
        build_backbone("resnet18", weights=not_a_dict)


def test_unknown_names_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg'.*resnet18") as info:
        build_backbone("vgg")
    assert "mobilenet_v3_large" in str(info.value)
    with pytest.raises(ConfigError, match="norm"):
        build_backbone("resnet18", norm="syncbn")


def test_register_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones_module, "BACKBONES", dict(BACKBONES))

    @register_backbone("resnet18_again")
    def builder(*, fpn_channels: int, norm: str) -> torch.nn.Module:
        return backbones_module.resnet18_fpn(fpn_channels=fpn_channels, norm=norm)

    assert backbones_module.build_backbone("resnet18_again", fpn_channels=8).out_channels == 8
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18_again")(builder)
