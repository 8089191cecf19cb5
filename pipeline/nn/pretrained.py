"""Pretrained backbone weights by name (``model.pretrained``), offline unless allowed to download.

Contract:

- torchvision backbones (``resnet18``, ``resnet50``, ``mobilenet_v3_large``, ``vgg16_bn`` ...):
  ``model.pretrained`` is ``"imagenet"`` (the weights enum's ``DEFAULT``) or a member of that
  backbone's weights enum, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``. The file is torchvision's
  own cache file, ``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>`` (e.g.
  ``~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth``; ``TORCH_HOME`` moves it). It is read
  with ``torch.load(weights_only=True)`` after checking that its sha256 starts with the hash
  in its name, and loaded into the body strictly (every body key, no other; the classifier
  ``fc.*`` / ``classifier.*`` is dropped); the FPN stays random.
- timm backbones (``timm:<model_name>``): ``model.pretrained`` is ``"imagenet"`` (timm's default
  tag for the model) or one of its pretrained tags (``"fb_in22k_ft_in1k"``). The file is the one
  timm itself would use: ``model.safetensors`` (else ``pytorch_model.bin``) of the model's Hugging
  Face repo in the Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME``), or, for the few models
  hosted elsewhere, the torch hub cache as above.
- Nothing downloads unless ``model.download: true`` or ``DENSEPIPE_ALLOW_DOWNLOAD=1``. A file
  not in the cache is otherwise one :class:`~pipeline.errors.ConfigError` line saying which
  file to put where.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.errors import ConfigError
from pipeline.nn.backbones import load_state_into_backbone

# Imports inside functions: timm and huggingface_hub come with the `timm` extra.

log = logging.getLogger(__name__)

ALLOW_DOWNLOAD_ENV = "DENSEPIPE_ALLOW_DOWNLOAD"
IMAGENET = "imagenet"
TIMM_PREFIX = "timm:"
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torchvision's / torch.hub's HASH_REGEX
_ENABLE_HINT = f"set model.download=true or {ALLOW_DOWNLOAD_ENV}=1 to let densepipe download it"


def download_allowed(download: bool) -> bool:
    """``model.download`` or the environment variable ``DENSEPIPE_ALLOW_DOWNLOAD=1``."""
    return download or os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# torchvision


def torchvision_weights(backbone: str, value: str) -> Any:
    """The torchvision ``WeightsEnum`` member ``value`` names for ``backbone``.

    ``value``: ``"imagenet"`` (the enum's ``DEFAULT``), ``"<Enum>.<MEMBER>"`` or ``"<MEMBER>"``.
    Raises ConfigError (one line listing what is allowed) for anything else."""
    try:
        enum = torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError):
        raise ConfigError(f"model.pretrained={value!r}: backbone {backbone!r} has no torchvision "
                          f"weights; use model.weights (a local file) or a timm:<model> backbone"
                          ) from None
    members = [m for m in enum.__members__ if m != "DEFAULT"]
    allowed = [IMAGENET, *(f"{enum.__name__}.{m}" for m in members)]
    if value == IMAGENET:
        return enum.DEFAULT
    member = value.removeprefix(f"{enum.__name__}.")
    if member in members:
        return enum[member]
    raise ConfigError(f"model.pretrained={value!r} is not a weight of backbone {backbone!r}; "
                      f"allowed: {', '.join(allowed)}")


def cache_file_for_url(url: str) -> Path:
    """Where torch.hub (and so torchvision) caches ``url``: ``<hub dir>/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash_in_name(path: Path, *, key: str) -> None:
    """Refuse (one ConfigError line) a file whose name carries a sha256 prefix its bytes lack."""
    match = HASH_IN_NAME.search(path.name)
    if match is None or not match.group(1):
        return
    prefix, actual = match.group(1), sha256_of(path)
    if not actual.startswith(prefix):
        raise ConfigError(f"{key}: {path} has sha256 {actual[:len(prefix)]}..., its name expects "
                          f"{prefix}...; delete it and download it again")


def cached_url_file(url: str, *, key: str, download: bool) -> Path:
    """The torch hub cache file for ``url``, hash-checked; downloaded only when allowed.

    ``key`` names the setting in messages (``model.pretrained ResNet50_Weights.IMAGENET1K_V2``).
    """
    path = cache_file_for_url(url)
    if not path.is_file():
        if not download_allowed(download):
            raise ConfigError(f"{key}: not in the cache; download {url} to {path} (or {_ENABLE_HINT})")
        path.parent.mkdir(parents=True, exist_ok=True)
        match = HASH_IN_NAME.search(path.name)
        log.info("%s: downloading %s to %s", key, url, path)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                       progress=False)
    check_hash_in_name(path, key=key)
    return path


def load_torchvision_pretrained(backbone: nn.Module, *, name: str, value: str, download: bool) -> str:
    """Load torchvision's ``value`` weights of ``name`` into ``backbone``'s body (strict about
    the body's keys, classifier dropped); returns the resolved source, e.g.
    ``"ResNet50_Weights.IMAGENET1K_V2 (resnet50-11ad3fa6.pth)"``."""
    weights = torchvision_weights(name, value)
    canonical = f"{type(weights).__name__}.{weights.name}"
    key = f"model.pretrained {canonical}"
    path = cached_url_file(weights.url, key=key, download=download)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file is a config problem
        raise ConfigError(f"{key}: cannot read {path}: {exc}".splitlines()[0]) from exc
    count = load_state_into_backbone(backbone, state, source=str(path), name=name, body_only=True)
    source = f"{canonical} ({path.name})"
    log.info("backbone %s: loaded %d tensors from %s", name, count, path)
    return source


# ---------------------------------------------------------------------------------------------
# timm


def timm_pretrained(model_name: str, value: str, *, download: bool) -> tuple[str, dict[str, Any]]:
    """``(name with tag, timm.create_model keyword args)`` that load ``value`` weights offline.

    ``value``: ``"imagenet"`` (timm's default tag) or a pretrained tag of ``model_name``. The
    keyword args point timm at the cached file (``pretrained_cfg_overlay={"file": ...}``), or,
    when download is allowed and nothing is cached, let timm fetch it (``pretrained=True``)."""
    import timm

    tags = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{model_name}.*") if "." in n)
    if not tags:
        raise ConfigError(f"model.pretrained={value!r}: timm model {model_name!r} has no pretrained "
                          f"weights")
    if value == IMAGENET:
        cfg = timm.models.get_pretrained_cfg(model_name)  # the default tag
        tag = cfg.tag if cfg is not None and cfg.tag in tags else tags[0]
    elif value.removeprefix(TIMM_PREFIX) in tags:
        tag = value.removeprefix(TIMM_PREFIX)
    else:
        raise ConfigError(f"model.pretrained={value!r} is not a pretrained tag of timm model "
                          f"{model_name!r}; allowed: {', '.join([IMAGENET, *tags])}")
    full = f"{model_name}.{tag}"
    cfg = timm.models.get_pretrained_cfg(full)
    key = f"model.pretrained {full}"
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        cached = _hf_cached_file(hub_id)
        if cached is not None:
            return full, {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cached)}}
        if download_allowed(download):
            log.info("%s: downloading from the Hugging Face hub (%s)", key, hub_id)
            return full, {"pretrained": True}
        from huggingface_hub import constants

        raise ConfigError(f"{key}: not in the Hugging Face cache {constants.HF_HUB_CACHE}; download "
                          f"model.safetensors of https://huggingface.co/{hub_id} into it (`hf download "
                          f"{hub_id} model.safetensors`) (or {_ENABLE_HINT})")
    url = getattr(cfg, "url", None)
    if not url:
        raise ConfigError(f"{key}: timm knows no file for these weights")
    path = cached_url_file(url, key=key, download=download)
    return full, {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def _hf_cached_file(repo_id: str) -> Path | None:
    """The cached ``model.safetensors`` (else ``pytorch_model.bin``) of ``repo_id``, never online."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------
# frozen batch norm and frozen stages (detectron2's FrozenBatchNorm2d and FREEZE_AT)


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by ``torchvision.ops.FrozenBatchNorm2d``
    with the same statistics and affine (timm's ``BatchNormAct2d`` by timm's frozen version, so
    its activation stays), in place; returns how many were replaced."""
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            frozen = _frozen_copy(child)
            if frozen is not None:
                setattr(parent, child_name, frozen)
                count += 1
    return count


def _frozen_copy(bn: nn.Module) -> nn.Module | None:
    if type(bn) is nn.BatchNorm2d:
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen
    if isinstance(bn, nn.BatchNorm2d):  # timm's BatchNormAct2d and friends
        try:
            from timm.layers import freeze_batch_norm_2d
        except ImportError:
            return None
        frozen = freeze_batch_norm_2d(bn)
        return None if frozen is bn else frozen
    return None


def body_stages(body: nn.Module, levels: list[str]) -> Iterator[tuple[str, list[nn.Module]]]:
    """``(level, modules computing it from the previous level)`` in order, for a body that is an
    ordered module dict with ``return_layers`` (torchvision's IntermediateLayerGetter, timm's
    feature nets) or a :class:`~pipeline.nn.backbones.VGGEncoder` (stages end at each pooling)."""
    features = getattr(body, "features", None)
    if isinstance(features, nn.Sequential) and not hasattr(body, "return_layers"):
        modules: list[nn.Module] = []
        k = 0
        for layer in features:
            modules.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                k += 1
                yield f"c{k}", modules
                modules = []
        return
    returns: dict[str, str] = dict(getattr(body, "return_layers", {}))
    container = getattr(body, "net", body)  # TimmBody wraps timm's feature net
    modules = []
    for name, layer in container.named_children():
        modules.append(layer)
        if name in returns and returns[name] in levels:
            yield returns[name], modules
            modules = []


def freeze_stages(backbone: nn.Module, freeze_at: int) -> list[str]:
    """Stop gradients of the body's levels ``c1``..``c{freeze_at}`` (detectron2's FREEZE_AT:
    1 = the stem, 2 = stem and res2); returns the frozen levels."""
    if freeze_at <= 0:
        return []
    body = backbone.body
    levels = [f"c{k}" for k in range(1, 6)]
    frozen: list[str] = []
    for level, modules in body_stages(body, levels):
        if int(level[1:]) > freeze_at:
            break
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)
        frozen.append(level)
    return frozen


__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "IMAGENET",
    "TIMM_PREFIX",
    "body_stages",
    "cache_file_for_url",
    "cached_url_file",
    "check_hash_in_name",
    "download_allowed",
    "freeze_batchnorm",
    "freeze_stages",
    "load_torchvision_pretrained",
    "timm_pretrained",
    "torchvision_weights",
]
