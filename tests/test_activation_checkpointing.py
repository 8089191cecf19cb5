"""``train.activation_checkpointing``: the backbone recomputes its activations in the backward
pass; outputs and gradients are those of the plain forward (GroupNorm: no running statistics)."""

from __future__ import annotations

import pytest
import torch

from pipeline.nn.backbones import build_backbone


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_checkpointed_backbone_gives_the_same_outputs_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, fpn_channels=16, norm="gn").train()
    x = torch.randn(2, 3, 64, 64)

    def run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        backbone.zero_grad()
        backbone.activation_checkpointing = checkpointing
        out = backbone(x)
        sum(v.float().pow(2).mean() for k, v in out.items() if not k.startswith("pool")).backward()
        return ({k: v.detach() for k, v in out.items()},
                [p.grad.clone() for p in backbone.parameters() if p.grad is not None])

    plain, plain_grads = run(False)
    kept, kept_grads = run(True)
    assert plain.keys() == kept.keys()
    for key in plain:
        torch.testing.assert_close(kept[key], plain[key])
    assert len(kept_grads) == len(plain_grads) > 0
    for a, b in zip(kept_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointing_is_off_in_eval_and_without_gradients() -> None:
    backbone = build_backbone("resnet18", fpn_channels=16, norm="gn")
    backbone.activation_checkpointing = True
    calls = []
    backbone._checkpointed_body = lambda x: calls.append(1)  # type: ignore[method-assign]
    with torch.no_grad():
        backbone.train()(torch.randn(1, 3, 32, 32))
    backbone.eval()(torch.randn(1, 3, 32, 32))
    assert calls == []
