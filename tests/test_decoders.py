"""Dense decoders (issue 8): every decoder at odd input sizes and any output count, the theory
behind them (context module receptive fields and identity initialisation, FCN's bilinear
upsampling and zero skips, SegNet's unpooling, ASPP rates, PSP bins), the registry, one-line
errors at model-build time, and the semantic task's decoder selection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.model import build_model
from pipeline.nn import backbones as backbones_module
from pipeline.nn import build_backbone
from pipeline.nn import decoders as decoders_module
from pipeline.nn.backbones import BackboneInfo, FeatureLevel
from pipeline.nn.decoders import (
    CONTEXT_DILATIONS,
    DECODERS,
    ContextModule,
    build_decoder,
    receptive_fields,
    register_decoder,
)
from pipeline.nn.dense_head import DenseHead
from pipeline.nn.fpn_heads import SemanticFPNHead
from pipeline.nn.upsample import MaxUnpool, TransposedConvUpsample, bilinear_kernel
from plugins.semantic.task import SemanticTask
from tests.conftest import tiny_overrides

BUILTINS = ("fcn32s", "fcn16s", "fcn8s", "unet", "segnet", "context_basic", "context_large", "aspp",
            "psp", "panoptic_fpn", "hypercolumns")
# small widths so that every decoder runs in milliseconds on one thread
SMALL = {
    "unet": {"widths": [16, 16, 8, 8]},
    "segnet": {"convs_per_stage": 1},
    "aspp": {"channels": 16},
    "psp": {"channels": 8, "conv_dims": 16},
    "panoptic_fpn": {"conv_dims": 16},
    "hypercolumns": {"channels": 16},
}
BACKBONE_OF = {"segnet": "vgg11_bn", "aspp": "resnet18_os8", "context_basic": "resnet18_os8",
               "context_large": "resnet18_os8"}
SIZES = [(33, 47), (17, 1)]


@pytest.fixture(scope="module")
def backbones() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet18": build_backbone("resnet18", fpn_channels=8).eval(),
        "resnet18_os8": build_backbone("resnet18", fpn_channels=8, output_stride=8).eval(),
        "vgg11_bn": build_backbone("vgg11_bn", fpn_channels=8).eval(),
    }


@pytest.fixture(scope="module")
def features(backbones: dict[str, nn.Module]) -> dict[tuple[str, tuple[int, int]], dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    with torch.no_grad():
        return {(name, size): b(torch.randn(2, 3, *size)) for name, b in backbones.items() for size in SIZES}


def test_builtins_are_registered() -> None:
    assert set(BUILTINS) <= set(DECODERS)


@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("name", BUILTINS)
def test_every_decoder_any_size_any_output_count(name: str, num_outputs: int, backbones: dict,
                                                  features: dict) -> None:
    backbone = BACKBONE_OF.get(name, "resnet18")
    torch.manual_seed(0)
    decoder = build_decoder(name, feature_spec=backbones[backbone].feature_spec, num_outputs=num_outputs,
                            **SMALL.get(name, {})).eval()
    with torch.no_grad():
        for size in SIZES:
            out = decoder(features[(backbone, size)], output_size=size)
            assert out.shape == (2, num_outputs, *size), (name, size)
            assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", BUILTINS)
def test_every_decoder_trains_end_to_end(name: str) -> None:
    """Gradients reach the backbone's first layer through every decoder (odd size, batch 2)."""
    backbone_name = BACKBONE_OF.get(name, "resnet18")
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name.removesuffix("_os8"), fpn_channels=8,
                              output_stride=8 if backbone_name.endswith("_os8") else 32).train()
    decoder = build_decoder(name, feature_spec=backbone.feature_spec, num_outputs=4, **SMALL.get(name, {}))
    image = torch.randn(2, 3, 35, 29)
    logits = decoder(backbone(image), output_size=(35, 29))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 35, 29))).backward()
    first = next(p for p in backbone.body.parameters() if p.dim() == 4)
    assert first.grad is not None and bool(first.grad.abs().sum() > 0), name


# ---------------------------------------------------------------------------------------------
# the context module


def _empirical_receptive_field(layers: nn.Sequential, size: int = 71) -> int:
    """Extent of the input pixels the centre output depends on (positive weights, no truncation)."""
    probe = nn.Sequential(*[m for m in layers if isinstance(m, nn.Conv2d)]).double()
    with torch.no_grad():
        for m in probe:
            m.weight.fill_(1.0)
            m.bias.zero_()
    x = torch.zeros(1, probe[0].in_channels, size, size, dtype=torch.float64, requires_grad=True)
    probe(x)[0, :, size // 2, size // 2].sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1))
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("name", ["context_basic", "context_large"])
def test_context_module_receptive_fields(name: str, backbones: dict) -> None:
    decoder = build_decoder(name, feature_spec=backbones["resnet18_os8"].feature_spec, num_outputs=2)
    layers = decoder.context.layers
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert [m.dilation[0] for m in convs] == [*CONTEXT_DILATIONS, 1]
    assert [m.kernel_size[0] for m in convs] == [3] * 7 + [1]
    assert receptive_fields(layers) == [3, 5, 9, 17, 33, 65, 67, 67]
    # the same numbers from the gradient of the module's own layers, prefix by prefix
    ends = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert [_empirical_receptive_field(layers[:end]) for end in ends] == [3, 5, 9, 17, 33, 65, 67, 67]


def test_context_module_widths() -> None:
    basic = ContextModule(3)
    large = ContextModule(3, large=True)
    widths = [m.out_channels for m in basic.layers if isinstance(m, nn.Conv2d)]
    assert widths == [3] * 8
    widths = [m.out_channels for m in large.layers if isinstance(m, nn.Conv2d)]
    assert widths == [6, 6, 12, 24, 48, 96, 96, 3]


@pytest.mark.parametrize("large", [False, True])
def test_context_module_identity_initialisation(large: bool) -> None:
    torch.manual_seed(0)
    module = ContextModule(5, large=large, init_noise=0.0).double()
    x = torch.rand(2, 5, 23, 19, dtype=torch.float64)  # score maps after the front-end's ReLU
    with torch.no_grad():
        torch.testing.assert_close(module(x), x)
        y = torch.randn(2, 5, 23, 19, dtype=torch.float64)  # ReLUs truncate negative scores
        torch.testing.assert_close(module(y), y.clamp(min=0))


def test_context_large_default_noise_breaks_symmetry_but_stays_near_identity(backbones: dict) -> None:
    torch.manual_seed(0)
    decoder = build_decoder("context_large", feature_spec=backbones["resnet18_os8"].feature_spec,
                            num_outputs=4)
    first = decoder.context.layers[0].weight
    assert not torch.equal(first[0], first[1])  # two copies of score map 0 differ
    x = torch.rand(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(decoder.context(x), x, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# FCN, SegNet, ASPP, PSP, hypercolumns, U-Net


def test_fcn_learnable_bilinear_upsampling_and_zero_skips(backbones: dict, features: dict) -> None:
    spec = backbones["resnet18"].feature_spec
    decoder = build_decoder("fcn8s", feature_spec=spec, num_outputs=3)
    assert set(decoder.score) == {"c5", "c4", "c3"}
    for level in ("c4", "c3"):
        assert not decoder.score[level].weight.any()  # FCN: new score layers start at zero
        up = decoder.up[level]
        assert isinstance(up, TransposedConvUpsample) and up.factor == 2
        torch.testing.assert_close(up.conv.weight, bilinear_kernel(3, 2))
        assert up.conv.weight.requires_grad
    assert decoder.final_up.factor == 8
    # at init the skips add nothing: fcn8s equals the c5 score upsampled by the bilinear cascade
    with torch.no_grad():
        feats = features[("resnet18", (33, 47))]
        x = decoder.score["c5"](feats["c5"])
        for level in ("c4", "c3"):
            x = decoder.up[level](x)[..., : feats[level].shape[-2], : feats[level].shape[-1]]
        expected = decoder.final_up(x)[..., :33, :47]
        torch.testing.assert_close(decoder(feats, output_size=(33, 47)), expected)
    assert build_decoder("fcn32s", feature_spec=spec, num_outputs=3).final_up.factor == 32
    assert build_decoder("fcn16s", feature_spec=spec, num_outputs=3).final_up.factor == 16


def test_segnet_unpools_with_the_encoder_indices(backbones: dict, features: dict) -> None:
    decoder = build_decoder("segnet", feature_spec=backbones["vgg11_bn"].feature_spec, num_outputs=2,
                            convs_per_stage=1).eval()
    assert list(decoder.unpool) == [f"pool{k}_indices" for k in range(5, 0, -1)]
    assert all(isinstance(m, MaxUnpool) for m in decoder.unpool.values())
    feats = features[("vgg11_bn", (33, 47))]
    seen: list[torch.Tensor] = []
    handle = decoder.unpool["pool5_indices"].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        decoder(feats, output_size=(33, 47))
    handle.remove()
    unpooled = seen[0]
    assert unpooled.shape[-2:] == (3, 3)  # ceil(33 / 16) x ceil(47 / 16): pool5's input
    flat = unpooled.flatten(2)
    recovered = flat.gather(2, feats["pool5_indices"].flatten(2))
    torch.testing.assert_close(recovered, feats["c5"].flatten(2))  # values back at their argmax
    assert int((flat != 0).sum()) <= feats["c5"].numel()  # and zero everywhere else


def test_aspp_rates_follow_the_output_stride_and_are_configurable() -> None:
    for stride, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        backbone = build_backbone("resnet18", fpn_channels=8, output_stride=stride)
        decoder = build_decoder("aspp", feature_spec=backbone.feature_spec, num_outputs=2, channels=8)
        assert decoder.rates == rates
        dilations = [b[0].dilation[0] for b in decoder.aspp.branches]
        assert dilations == [1, *rates]  # the 1x1 branch, then one 3x3 per rate
        assert isinstance(decoder.aspp.image_pool[0], nn.AdaptiveAvgPool2d)
    decoder = build_decoder("aspp", feature_spec=backbone.feature_spec, num_outputs=2, channels=8,
                            rates=[2, 4])
    assert [b[0].dilation[0] for b in decoder.aspp.branches] == [1, 2, 4]


def test_psp_bins(backbones: dict) -> None:
    decoder = build_decoder("psp", feature_spec=backbones["resnet18"].feature_spec, num_outputs=2)
    assert [s[0].output_size for s in decoder.ppm.stages] == [1, 2, 3, 6]
    assert decoder.ppm.stages[0][1][0].out_channels == 512 // 4  # PSPNet: in / number of bins


def test_hypercolumns_and_unet_levels(backbones: dict) -> None:
    spec = backbones["resnet18"].feature_spec
    hyper = build_decoder("hypercolumns", feature_spec=spec, num_outputs=2)
    assert hyper.in_features == ("c2", "c3", "c4", "c5")
    assert hyper.hidden[0].in_channels == 64 + 128 + 256 + 512
    unet = build_decoder("unet", feature_spec=spec, num_outputs=2)
    assert unet.levels == ("c5", "c4", "c3", "c2", "c1")
    widths = [unet.up[k].out_channels for k in unet.levels[1:]]
    assert widths == [256, 128, 64, 64]  # symmetric: each stage as wide as its skip


def test_panoptic_fpn_is_the_semantic_fpn_head(backbones: dict) -> None:
    spec = backbones["resnet18"].feature_spec
    torch.manual_seed(0)
    decoder = build_decoder("panoptic_fpn", feature_spec=spec, num_outputs=3, conv_dims=16, norm="none")
    torch.manual_seed(0)
    reference = SemanticFPNHead(spec, num_outputs=3, conv_dims=16, norm="")
    assert type(decoder) is SemanticFPNHead
    for (k, a), (k2, b) in zip(decoder.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_panoptic_fpn_convex_upsampling(backbones: dict, features: dict) -> None:
    """``upsample: convex`` keeps every output size, starts within the bilinear floor of the
    bilinear head with the same weights, and reaches its weight predictor with gradients."""
    spec = backbones["resnet18"].feature_spec
    torch.manual_seed(0)
    convex = build_decoder("panoptic_fpn", feature_spec=spec, num_outputs=2, conv_dims=16, upsample="convex")
    torch.manual_seed(0)
    bilinear = build_decoder("panoptic_fpn", feature_spec=spec, num_outputs=2, conv_dims=16)
    bilinear.predictor.bias.data.normal_()
    convex.predictor.bias.data.copy_(bilinear.predictor.bias.data)
    convex.eval(), bilinear.eval()
    with torch.no_grad():
        for size in SIZES:
            out = convex(features[("resnet18", size)], output_size=size)
            assert out.shape == (2, 2, *size)
        feats = {k: torch.randn(2, 8, 32 // spec[k].stride, 32 // spec[k].stride)
                 for k in ("p2", "p3", "p4", "p5")}
        a, b = convex(feats, output_size=(32, 32)), bilinear(feats, output_size=(32, 32))
        assert (a - b).abs().max() < 0.01 * b.abs().max()
    convex.train()(feats, output_size=(32, 32)).square().mean().backward()
    assert convex.convex_upsample.weights.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"decoder 'panoptic_fpn': upsample must be one of bilinear, "
                                          r"convex; got 'bicubic'"):
        build_decoder("panoptic_fpn", feature_spec=spec, num_outputs=2, upsample="bicubic")


def test_receptive_fields_of_a_strided_stack() -> None:
    stack = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3, dilation=2))
    assert receptive_fields(stack) == [3, 7, 15]


# ---------------------------------------------------------------------------------------------
# errors and the registry


def test_unknown_decoder_lists_the_available_ones(backbones: dict) -> None:
    with pytest.raises(ConfigError, match=r"unknown decoder 'fcn4s'; allowed: aspp, context_basic") as info:
        build_decoder("fcn4s", feature_spec=backbones["resnet18"].feature_spec, num_outputs=2)
    assert all(name in str(info.value) for name in BUILTINS) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("aspp", {"rate": [1]}, r"decoder 'aspp' got unknown option 'rate'; allowed: channels, dropout, "
                                r"in_feature, norm, rates"),
        ("aspp", {"rates": [0, 6]}, r"decoder 'aspp': rates must be a list of positive integers"),
        ("psp", {"bins": "1236"}, r"decoder 'psp': bins must be a list of positive integers"),
        ("unet", {"norm": "LN"}, r"decoder 'unet': norm must be one of GN, BN, none; got 'LN'"),
        ("unet", {"widths": [8]}, r"decoder 'unet': widths needs 4 values"),
        ("fcn8s", {"head_channels": -1}, r"decoder 'fcn8s': head_channels must be an integer >= 0"),
        ("psp", {"in_feature": "c9"}, r"decoder 'psp' needs backbone levels c9, which backbone "
                                      r"'resnet18' does not provide"),
    ],
)
def test_bad_options_are_one_line_config_errors(name: str, options: dict, message: str) -> None:
    backbone = build_backbone("resnet18", fpn_channels=8, output_stride=8 if name == "aspp" else 32)
    with pytest.raises(ConfigError, match=message) as info:
        build_decoder(name, feature_spec=backbone.feature_spec, num_outputs=2, **options)
    assert "\n" not in str(info.value)


def test_incompatible_backbones_are_named_with_the_fix(backbones: dict) -> None:
    with pytest.raises(ConfigError, match=r"decoder 'segnet' needs an encoder that returns its max-pooling "
                                          r"indices; backbone 'resnet18' does not \(use model.backbone="
                                          r"vgg11_bn or vgg16_bn\)"):
        build_decoder("segnet", feature_spec=backbones["resnet18"].feature_spec, num_outputs=2)
    with pytest.raises(ConfigError, match=r"decoder 'aspp' needs a dilated backbone .* backbone 'resnet18' "
                                          r"has c5 at stride 32: set model.output_stride=16 or 8"):
        build_decoder("aspp", feature_spec=backbones["resnet18"].feature_spec, num_outputs=2)
    with pytest.raises(ConfigError, match=r"backbone 'vgg11_bn' has c5 at stride 32: it cannot dilate; "
                                          r"use a dilatable backbone \(mobilenet_v3_large, resnet18"):
        build_decoder("aspp", feature_spec=backbones["vgg11_bn"].feature_spec, num_outputs=2)
    fpn_only = {f"p{k}": FeatureLevel(8, 2**k) for k in range(2, 7)}  # a third-party FPN-only backbone
    with pytest.raises(ConfigError, match=r"decoder 'fcn8s' needs backbone levels c5, c4, c3"):
        build_decoder("fcn8s", feature_spec=fpn_only, num_outputs=2)
    with pytest.raises(ConfigError, match=r"backbone 'mine' does not \(use"):
        build_decoder("segnet", feature_spec=fpn_only, num_outputs=2, backbone=BackboneInfo(name="mine"))
    with pytest.raises(ConfigError, match="num_outputs must be an integer >= 1"):
        build_decoder("fcn8s", feature_spec=backbones["resnet18"].feature_spec, num_outputs=0)


def test_register_decoder(monkeypatch: pytest.MonkeyPatch, backbones: dict) -> None:
    monkeypatch.setattr(decoders_module, "DECODERS", DECODERS.copy())

    @register_decoder("one_by_one")
    def builder(feature_spec: dict, *, num_outputs: int, backbone: BackboneInfo,
                level: str = "p2") -> nn.Module:
        return decoders_module.HypercolumnDecoder(feature_spec, in_features=[level], num_outputs=num_outputs,
                                                  channels=4, norm="none")

    decoder = decoders_module.build_decoder("one_by_one", feature_spec=backbones["resnet18"].feature_spec,
                                            num_outputs=2, level="p3")
    assert decoder.in_features == ("p3",)
    with pytest.raises(ConfigError, match="got unknown option 'levels'; allowed: level"):
        decoders_module.build_decoder("one_by_one", feature_spec={}, num_outputs=2, levels=[])
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("one_by_one")(builder)


# ---------------------------------------------------------------------------------------------
# the semantic task: decoder selection at model-build time


@pytest.fixture(scope="module")
def card(tiny_dataset: Path) -> DatasetCard:
    return DatasetCard.load(tiny_dataset / "meta.json")


def test_default_semantic_head_is_unchanged(backbones: dict, card: DatasetCard) -> None:
    """The default decoder builds exactly the head of earlier versions (names, init, values), but
    for the predictor's weights, which semantic's ``output_init: xavier`` draws from Glorot uniform."""
    task = SemanticTask()
    spec = backbones["resnet18"].feature_spec
    options = task.parse_options({"conv_dims": 16, "norm": "BN"})
    assert options.decoder == "panoptic_fpn" and options.decoder_options == {}
    torch.manual_seed(0)
    head = task.build_head(feature_spec=spec, card=card, options=options)
    torch.manual_seed(0)
    before = DenseHead(SemanticFPNHead(spec, in_features=("p2", "p3", "p4", "p5"),
                                          num_outputs=card.num_classes, conv_dims=16, norm="BN"))
    nn.init.xavier_uniform_(before.decoder.predictor.weight)  # semantic's output_init (peers.json)
    assert list(head.state_dict()) == list(before.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), before.state_dict().values(),
                                                  strict=True))


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, ["model.tasks=[semantic]", "model.fpn_channels=8", "tracking.enabled=false",
                              f"train.out_dir={tmp_path / 'train'}", *overrides])


@pytest.mark.parametrize(
    ("overrides", "decoder_type"),
    [
        (["model.backbone=vgg11_bn", "model.heads={semantic: {decoder: segnet, "
                                      "decoder_options: {convs_per_stage: 1}}}"], "SegNetDecoder"),
        (["model.output_stride=8", "model.heads={semantic: {decoder: aspp, decoder_options: "
                                   "{channels: 8, rates: [3, 6]}, norm: BN}}"], "ASPPDecoder"),
    ],
)
def test_semantic_task_selects_its_decoder_in_config(tmp_path: Path, card: DatasetCard, overrides: list[str],
                                                     decoder_type: str) -> None:
    model = build_model(_config(tmp_path, *overrides), card)
    branch = model.heads["semantic"].decoder
    assert type(branch).__name__ == decoder_type
    if decoder_type == "ASPPDecoder":  # norm of the semantic options reaches every decoder that has one
        assert branch.rates == (3, 6) and isinstance(branch.conv[1], nn.BatchNorm2d)
    model.train()
    batch = {"image": torch.randint(0, 255, (2, 3, 35, 29), dtype=torch.uint8),
             "semantic": torch.randint(0, card.num_classes, (2, 35, 29))}
    outputs = model(batch)
    assert outputs["semantic"].shape == (2, card.num_classes, 35, 29)
    model.total_loss(model.losses(outputs, batch)).backward()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.heads={semantic: {decoder: deeplab}}"],
         r"^model.heads.semantic.decoder=deeplab: unknown decoder 'deeplab'; allowed: aspp, "),
        (["model.heads={semantic: {decoder: segnet}}"],
         r"decoder=segnet: decoder 'segnet' needs an encoder .* backbone 'resnet18' does not"),
        (["model.heads={semantic: {decoder: aspp}}"], r"set model.output_stride=16 or 8"),
        (["model.backbone=vgg11_bn", "model.output_stride=8"], r"not supported by backbone 'vgg11_bn'"),
        (["model.heads={semantic: {decoder: psp, decoder_options: {bin: [1]}}}"],
         r"decoder 'psp' got unknown option 'bin'; allowed: bins, channels, conv_dims"),
    ],
)
def test_bad_decoder_config_fails_when_the_model_is_built(tmp_path: Path, card: DatasetCard,
                                                          overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_model(_config(tmp_path, *overrides), card)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_densepipe_train_with_an_incompatible_decoder_fails_before_training(tiny_dataset: Path,
                                                                            tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_dataset, tmp_path, None, model__tasks="[semantic]",
                               model__heads="{semantic: {decoder: segnet}}")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.heads.semantic.decoder=segnet: "), lines
    assert "vgg11_bn" in lines[0]
    assert not (tmp_path / "train" / "last.pt").exists()


def test_output_stride_is_checked_against_the_registry() -> None:
    assert backbones_module.BACKBONE_OUTPUT_STRIDES["resnet18"] == (8, 16, 32)
    assert backbones_module.BACKBONE_OUTPUT_STRIDES["vgg16_bn"] == (32,)
    with pytest.raises(ConfigError, match="model.output_stride"):
        load_config(None, ["model.output_stride=4"])


@pytest.mark.parametrize("decoder", ["panoptic_fpn", "fcn8s"])
def test_output_init_semantic_logits_start_at_unit_scale_regression_heads_stay_small(decoder):
    """Semantic's output layers start from Glorot uniform (std sqrt(2 / (fan_in + fan_out))),
    depth's keep the decoder's near-zero normal; ``output_init=small`` restores it for semantic."""
    from pipeline.data.synthetic import synthetic_card
    from pipeline.nn.dense_head import output_layers

    card = synthetic_card()

    def layers(*overrides: str) -> tuple[list[nn.Conv2d], list[nn.Conv2d]]:
        cfg = load_config(None, ["model.tasks=[semantic,depth]", "model.backbone=resnet18",
                                 "model.fpn_channels=32", f"model.heads.semantic.decoder={decoder}",
                                 *overrides])
        model = build_model(cfg, card)
        return (output_layers(model.heads["semantic"].decoder, card.num_classes),
                output_layers(model.heads["depth"].decoder, 1))

    semantic, depth = layers()
    assert len(semantic) == (3 if decoder == "fcn8s" else 1)  # fcn8s scores c5, c4 and c3
    for conv in semantic:
        fan_in, fan_out = conv.in_channels, conv.out_channels
        glorot = (2.0 / (fan_in + fan_out)) ** 0.5
        assert float(conv.weight.std()) == pytest.approx(glorot, rel=0.3)
        assert float(conv.bias.abs().max()) == 0.0
    assert len(depth) == 1 and float(depth[0].weight.std()) < 0.02
    small, _ = layers("model.heads.semantic.output_init=small")
    assert all(float(conv.weight.std()) < 0.02 for conv in small)
