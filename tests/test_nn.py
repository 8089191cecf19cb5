"""Backbones (+FPN) and the semantic FPN decoder: shapes, specs, body levels, dilation, the VGG
encoder with pooling indices, local weights, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.errors import ConfigError
from pipeline.nn import (
    BACKBONES,
    BackboneInfo,
    BackboneSpec,
    FeatureLevel,
    SemanticFPNHead,
    build_backbone,
    register_backbone,
    upsample_to,
)
from pipeline.nn import backbones as backbones_module

LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
BODY = {"c1": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}
BODY_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "mobilenet_v3_large": (16, 24, 40, 112, 960),
    "vgg11_bn": (64, 128, 256, 512, 512),
}
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


def _check_outputs(backbone: torch.nn.Module, size: tuple[int, int],
                   strides: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """FPN levels first, then the body levels; every output as feature_spec says (ceil sizes)."""
    strides = {**LEVELS, **BODY} if strides is None else strides
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, *size))
    assert list(out)[: len(LEVELS)] == list(LEVELS)
    assert list(backbone.feature_spec) == list(out)
    for name, x in out.items():
        spec = backbone.feature_spec[name]
        if name in strides:
            assert spec.stride == strides[name], name
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
    expected = {k: FeatureLevel(channels=16, stride=s) for k, s in LEVELS.items()}
    expected.update((k, FeatureLevel(c, BODY[k])) for k, c in zip(BODY, BODY_CHANNELS[name], strict=True))
    assert backbone.feature_spec == expected
    assert backbone.output_stride == 32 and backbone.pool_indices == ()
    assert backbone.info.name == name and backbone.feature_spec.info is backbone.info
    for size in SIZES:
        _check_outputs(backbone, size)


def test_resnet50_builds_with_spec() -> None:
    backbone = build_backbone("resnet50")
    assert {k: v for k, v in backbone.feature_spec.items() if k in LEVELS} == {
        k: FeatureLevel(channels=128, stride=s) for k, s in LEVELS.items()
    }
    assert [backbone.feature_spec[k].channels for k in BODY] == list(BODY_CHANNELS["resnet50"])
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
    monkeypatch.setattr(backbones_module, "BACKBONES", BACKBONES.copy())

    @register_backbone("resnet18_again")
    def builder(*, fpn_channels: int, norm: str) -> torch.nn.Module:
        return backbones_module.resnet18_fpn(fpn_channels=fpn_channels, norm=norm)

    assert backbones_module.build_backbone("resnet18_again", fpn_channels=8).out_channels == 8
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18_again")(builder)


# ---------------------------------------------------------------------------------------------
# output stride (dilation), the VGG encoder with pooling indices, capabilities


@pytest.mark.parametrize("output_stride", [16, 8])
def test_resnet_output_stride_reports_true_strides(output_stride: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", fpn_channels=8, output_stride=output_stride).eval()
    body = {k: min(s, output_stride) for k, s in BODY.items()}
    fpn = {f"p{k}": body[f"c{k}"] for k in range(2, 6)}
    fpn["p6"] = 2 * fpn["p5"]
    assert backbone.output_stride == output_stride
    assert backbone.info == BackboneInfo(name="resnet18", output_stride=output_stride,
                                         output_strides=(8, 16, 32), pool_indices=())
    for size in [(33, 47), (64, 64)]:
        _check_outputs(backbone, size, {**fpn, **body})
    # dilation changes no parameter: weights of the undilated network load unchanged
    plain = build_backbone("resnet18", fpn_channels=8)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in backbone.state_dict().items()}


def test_resnet50_dilation_matches_torchvision() -> None:
    """Our in-place dilation equals torchvision's replace_stride_with_dilation on bottlenecks."""
    torch.manual_seed(0)
    ours = build_backbone("resnet50", fpn_channels=8, output_stride=8).eval()
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    ref.load_state_dict({k: v for k, v in ours.body.state_dict().items()}, strict=False)
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        c5 = ours(x)["c5"]
        stem = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(stem))))
    torch.testing.assert_close(c5, expected)


def test_mobilenet_output_stride_16() -> None:
    backbone = build_backbone("mobilenet_v3_large", fpn_channels=8, output_stride=16).eval()
    assert backbone.feature_spec["c5"] == FeatureLevel(960, 16)
    _check_outputs(backbone, (33, 47), {**BODY, "c5": 16, "p5": 16, "p6": 32})
    with pytest.raises(ConfigError, match=r"output_stride=8 is not supported by backbone "
                                          r"'mobilenet_v3_large' \(supported: 16, 32\)"):
        build_backbone("mobilenet_v3_large", output_stride=8)


def test_backbones_that_cannot_dilate_refuse_an_output_stride() -> None:
    with pytest.raises(ConfigError, match=r"'vgg11_bn' \(it cannot dilate; dilatable backbones: "
                                          r"mobilenet_v3_large, resnet18"):
        build_backbone("vgg11_bn", output_stride=16)


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (1, 5)])
def test_vgg_encoder_returns_pooling_indices(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vgg11_bn", fpn_channels=8).eval()
    pools = tuple(f"pool{k}_indices" for k in range(1, 6))
    assert backbone.pool_indices == pools and backbone.output_stride == 32
    out = _check_outputs(backbone, size)
    assert list(out)[-5:] == list(pools)
    for k, name in enumerate(pools, start=1):
        idx = out[name]
        assert idx.dtype == torch.int64 and idx.shape == out[f"c{k}"].shape
        pre = (math.ceil(size[0] / 2 ** (k - 1)), math.ceil(size[1] / 2 ** (k - 1)))
        assert int(idx.max()) < pre[0] * pre[1]
        # the documented pre-pooling size is what MaxUnpool2d needs for odd sizes
        unpooled = torch.nn.functional.max_unpool2d(out[f"c{k}"], idx, 2, 2, output_size=pre)
        assert unpooled.shape[-2:] == pre


def test_vgg_loads_torchvision_features(tmp_path: Path) -> None:
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"], batch_norm=True)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the classifier is ignored
    path = tmp_path / "vgg11_bn-local.pth"
    torch.save(state, path)
    backbone = build_backbone("vgg11_bn", weights=path, fpn_channels=8)
    torch.testing.assert_close(backbone.body.features[0].weight, features[0].weight)


def test_backbone_spec_keeps_info_through_copy_and_pickle() -> None:
    import copy
    import pickle

    spec = build_backbone("vgg11_bn", fpn_channels=8).feature_spec
    assert isinstance(spec, BackboneSpec) and isinstance(spec, dict)
    for clone in (copy.deepcopy(spec), pickle.loads(pickle.dumps(spec)), copy.copy(spec)):
        assert clone == spec and clone.info == spec.info


def test_registered_backbone_without_output_strides_cannot_dilate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones_module, "BACKBONES", BACKBONES.copy())
    strides = dict(backbones_module.BACKBONE_OUTPUT_STRIDES)
    monkeypatch.setattr(backbones_module, "BACKBONE_OUTPUT_STRIDES", strides)

    @register_backbone("plain_again")
    def builder(*, fpn_channels: int, norm: str) -> torch.nn.Module:
        return backbones_module.resnet18_fpn(fpn_channels=fpn_channels, norm=norm)

    assert backbones_module.build_backbone("plain_again", fpn_channels=8).info.output_strides == (32,)
    with pytest.raises(ConfigError, match="'plain_again' \\(it cannot dilate"):
        backbones_module.build_backbone("plain_again", output_stride=8)
    with pytest.raises(ValueError, match="output_strides must include 32"):
        register_backbone("bad", output_strides=(8,))
