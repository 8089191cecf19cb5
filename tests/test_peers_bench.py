"""benchmarks/peers.py and gpu_peers.py run end to end at toy sizes and write what the docs'
benchmark page renders: each part's ratios, metrics in range, the step's parts summing to one."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

pytest.importorskip("segmentation_models_pytorch", reason="the bench extra (pip install -e '.[bench]')")
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu_peers  # noqa: E402
import peers  # noqa: E402


@pytest.mark.slow
def test_peers_smoke_writes_each_part_and_keeps_the_others(tmp_path):
    out = tmp_path / "peers.json"
    out.write_text(json.dumps({"multitask": {"cost_ratio": 0.49, "meets_target": True}}))
    report = peers.main(["--smoke", "--parts", "semantic,instance,cost_split", "--out", str(out),
                         "--data", str(tmp_path / "data")])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["multitask"]["cost_ratio"] == 0.49  # a part not rerun is kept

    semantic = written["semantic"]["runs"]["64px_seed0"]
    for side in ("densepipe", "smp"):
        assert semantic[side]["steps"] >= 1 and semantic[side]["images_per_s"] > 0
        assert 0.0 <= semantic[side]["mIoU"] <= 1.0
    assert semantic["speed_ratio"] == pytest.approx(
        semantic["densepipe"]["images_per_s"] / semantic["smp"]["images_per_s"], rel=1e-2)
    assert written["semantic"]["ratios"]["64px_seed0"]["miou_ratio"] == semantic["miou_ratio"]
    assert [p["seconds"] for p in semantic["curve"]] == [1.0, 2.0]  # after each 1 s slice
    assert semantic["curve"][-1]["densepipe"] == semantic["densepipe"]["mIoU"]

    instance = written["instance"]["runs"]["64px_seed0"]
    assert instance["speed_ratio"] > 0 and instance["steps"] == 2 and instance["seed"] == 0
    assert set(written["instance"]["ap_ratio_over_seeds"]) == set(instance["ap_ratio"])
    trace = instance["loss_trace"]  # same weights, batch and sampling: the same first loss
    assert len(trace["densepipe"]) == len(trace["torchvision"]) == 4
    assert trace["densepipe"][0] == pytest.approx(trace["torchvision"][0], rel=1e-4)
    for side in ("densepipe", "torchvision", "torchvision_with_densepipe_weights"):
        assert set(instance["ap"][side]) >= {"bbox_AP", "segm_AP"}
        assert all(-1e-9 <= v <= 1.0 for v in instance["ap"][side].values())

    split = written["cost_split"]
    assert sum(split["share"].values()) == pytest.approx(1.0, abs=1e-3)
    for part in ("load a batch", "backbone forward", "semantic head forward + loss",
                 "instance head backward", "optimizer step"):
        assert split["seconds"][part] >= 0.0, part
    assert split["largest"] == max(split["seconds"], key=split["seconds"].get)
    assert written["semantic"]["device"].startswith("cpu (")


def test_peers_refuses_an_unknown_part(capsys):
    with pytest.raises(SystemExit) as exc:
        peers.main(["--parts", "semantic,speed"])
    assert exc.value.code == 2
    expected = "--parts: unknown speed; expected some of semantic, instance, multitask, cost_split, ablation"
    assert expected in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_peers_runs_its_code_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu_peers.main(["--device", "cpu", "--size", "64", "--batch", "2", "--steps", "1",
                             "--warmup", "1", "--models", "semantic,smp_fpn", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    names = [r["model"] for r in report["results"]]
    assert names == ["semantic", "smp_fpn"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["step_tflops"] > 0
        assert r["mfu"] is None and r["peak_memory_mib"] is None  # no GPU peak to divide by
    assert report["ratios"]["semantic / smp_fpn images/s"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peers_on_cuda_reports_memory_and_mfu(tmp_path):
    report = gpu_peers.main(["--size", "128", "--batch", "2", "--steps", "2", "--warmup", "1",
                             "--out", str(tmp_path / "gpu.json")])
    assert [r["model"] for r in report["results"]] == list(gpu_peers.MODELS)
    for r in report["results"]:
        assert r["peak_memory_mib"] > 0 and r["images_per_s"] > 0
        if gpu_peers.peak_flops(torch.device("cuda")) is not None:
            assert 0 < r["mfu"] < 1
