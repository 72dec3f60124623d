"""The prepared GPU benchmark (benchmarks/gpu) stays runnable: its smoke mode, and its FLOP count.

``run.sh --smoke`` runs every stage of the driver at ``tiny`` size on the CPU, exactly as the GPU call
would run it (same script, same stages, same JSON), so a change that breaks the benchmark fails here
rather than in the few minutes a GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cellsam_core.configs import ModelConfig
from cellsam_core.masks import predict_single_masks
from cellsam_core.registry import MODEL_CONFIGS, build_from_config

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))
import flops  # noqa: E402 - benchmarks/gpu/flops.py is a script beside the driver, not a package


def test_smoke_run_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(GPU / "run.sh"), str(out), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    assert set(results["stages"]) == {
        "environment",
        "setup",
        "encoder",
        "detect",
        "decode",
        "agreement",
        "end_to_end",
    }
    assert results["skipped"] == {"compile": "smoke run"}
    assert results["service_modules_imported"] == []  # the model core needs no Ray, ZeroMQ or Zarr
    stages = results["stages"]
    assert stages["setup"]["boxes_on_frame_0"] == results["cells_target"]
    for arm in ("fp32", "fp32+sdpa", "bf16+sdpa"):
        assert stages["encoder"][f"{arm}/b2"]["frames_per_s"] > 0
    for n in results["boxes"]:
        row = stages["decode"][str(n)]
        assert row["speedup_loop_over_best"] > 0
        # fp32 batched decoding composes the same labels as the one-box loop.
        assert row["batched fp32 chunk64"]["vs_loop"]["pixel_agreement"] > 0.999
    assert stages["agreement"]["per_box_mask_iou"]["mean"] >= 0.98
    assert stages["end_to_end"]["gpu path bf16+sdpa"]["boxes_per_frame"] == results["cells_target"]
    table = (out / "table.txt").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())  # the table is printed last
    assert "encoder frames/s" in table and "mask decoding s/frame" in table
    assert (out / "log.txt").exists()


def test_run_sh_needs_an_output_folder() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(GPU / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize(
    "cfg", [MODEL_CONFIGS["tiny"], ModelConfig(image_size=128)], ids=["tiny", "vit_b_128"]
)
def test_flop_count_matches_torch_flop_counter(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_from_config(cfg).requires_grad_(False)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)

    def counted(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
        return float(counter.get_total_flops())

    assert counted(lambda: model.sam.image_encoder(x)) == pytest.approx(
        sum(flops.vit_flops(cfg, neck=True).values()), rel=1e-9
    )
    head = model.cellfinder.decode_head
    assert counted(lambda: head.backbone(x)) == pytest.approx(sum(flops.vit_flops(cfg, neck=False).values()))
    with torch.inference_mode():
        memory = head.encode(x)
    transformer = flops.cellfinder_transformer_flops(cfg)
    # torch's counter does not see the attention products of nn.MultiheadAttention on a CPU (fused
    # SDPA): 2 x 2 Q^2 d per decoder layer, added here.
    q, e = cfg.cellfinder_num_query_position, cfg.cellfinder_d_model
    unseen = cfg.cellfinder_dec_layers * 2.0 * 2 * q * q * e
    expected = transformer["encoder"] + transformer["decoder"] + transformer["positions_and_heads"] - unseen
    assert counted(lambda: head.transformer(memory)) == pytest.approx(expected, rel=1e-3)
    sam = model.sam
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(
            points=None, boxes=torch.tensor([[[4.0, 8.0, 40.0, 50.0]]]), masks=None
        )
        embedding = sam.image_encoder(x)
    pe = sam.prompt_encoder.get_dense_pe()
    # The prompt encoder's Fourier features (two corners) are outside the decoder's count: 0.5 % at most.
    assert counted(
        lambda: sam.mask_decoder(embedding, pe, sparse, dense, multimask_output=False)
    ) == pytest.approx(sum(flops.mask_decoder_flops(cfg, single_mask=False).values()), rel=5e-3)
    assert counted(
        lambda: predict_single_masks(sam.mask_decoder, embedding + dense, pe, sparse)
    ) == pytest.approx(sum(flops.mask_decoder_flops(cfg).values()), rel=5e-3)


def test_official_frame_count_and_floor() -> None:
    cfg = MODEL_CONFIGS["cellsam_vit_b"]
    counts = flops.frame_flops(cfg, 200)
    assert 0.95e12 < counts["sam_image_encoder"] < 1.0e12  # "≈ 1 TFLOP" per SAM ViT-B pass at 1024²
    assert counts["total"] == pytest.approx(2.92e12, rel=0.01)
    assert flops.floor_frames_per_s(cfg, 200) == pytest.approx(270, rel=0.01)
