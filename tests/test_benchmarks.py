"""The benchmark helpers that the GPU figures will rest on (FLOP counting, MFU, options), checked on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusion_pref_trainers import DiffusionDPOTrainer
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the scripts import each other by file name
import common  # noqa: E402
import kits  # noqa: E402
import levers  # noqa: E402
import step_time  # noqa: E402


def test_summarize_drops_warmup_and_takes_the_median() -> None:
    row = common.summarize([9.0, 0.5, 0.2, 0.4, 0.3], warmup=1, pairs=4)  # kept: 0.5 0.2 0.4 0.3 -> median 0.35
    assert row["ms_per_step"] == 350.0 and row["pairs_per_s"] == round(4 / 0.35, 2) and row["steps_timed"] == 4


def test_summarize_reports_the_cuda_peak_on_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20 + 2**19)  # 3.5 MiB
    assert common.summarize([0.2, 0.4], warmup=0, pairs=1)["peak_cuda_mib"] == 3.5


def test_cpu_attention_is_counted_with_the_matmul_formulas() -> None:
    batch, heads, queries, keys, dim = 2, 3, 5, 7, 4
    q = torch.randn(batch, heads, queries, dim, requires_grad=True)
    k, v = torch.randn(batch, heads, keys, dim), torch.randn(batch, heads, keys, dim)
    counter = FlopCounterMode(display=False, custom_mapping=common.cpu_attention_flop_formulas())
    with counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    matmul = 2 * batch * heads * queries * keys * dim  # one (L x D) @ (D x S) product per head
    # forward: QK^T and PV; backward (torch's formula): the scores recomputed, then dV, dP, dQ and dK
    assert counter.get_total_flops() == 2 * matmul + 5 * matmul


def test_step_flops_are_linear_in_rows_and_leave_no_gradients(pairs, make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(cache_latents=True, center_crop=True), pairs)
    one, two = common.training_step_flops(trainer, 1), common.training_step_flops(trainer, 2)
    assert one > 0 and two == 2 * one
    assert all(p.grad is None for p in trainer.family.denoiser.parameters())


def test_mfu_divides_achieved_flops_by_the_gpu_peak(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA H100 PCIe", None), ("NVIDIA GeForce RTX 4090", None)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert common.peak_bf16_flops()[0] == peak, name
    rows = [{"case": "a", "ms_per_step": 500.0}, {"case": "b", "skipped": "no GPU"}]
    levers.add_throughput(rows, step_flops=10**12, peak=989e12)  # 1 TFLOP in 0.5 s: 2 TFLOP/s
    assert rows[0]["achieved_gflops_per_s"] == 2000.0 and rows[0]["mfu"] == round(2e12 / 989e12, 4)
    assert rows[1] == {"case": "b", "skipped": "no GPU"}


def test_no_mfu_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.peak_bf16_flops()[0] is None


def test_sd15_shaped_kit_spends_on_the_vae_what_sd15_does() -> None:
    full, kit = kits.sd15_flop_shares(1, 512), kits.sd15_flop_shares(8, 128)
    assert 0.2 < full["vae_encode_share"] < 0.3  # SD1.5 at 512 px: VAE encode ~1.1 TFLOP, UNet forward ~0.8
    assert abs(kit["vae_encode_share"] - full["vae_encode_share"]) < 0.02
    unet = kits.sd15_shaped_pipeline(8).unet
    assert unet.config.layers_per_block == 2 and len(unet.down_blocks) == 4


def test_pooled_runs_take_the_median_of_all_steps_and_the_largest_memory() -> None:
    runs = [
        {"case": "dpo", "step_ms": [100.0, 300.0], "peak_rss_mib": 600.0, "model_step_mib": 90.0},
        {"case": "dpo", "step_ms": [200.0, 400.0, 250.0], "peak_rss_mib": 610.0, "model_step_mib": 80.0},
    ]
    row = common.pool(runs, pairs=2)  # steps 100 200 250 300 400: median 250 ms -> 8 pairs/s
    assert (row["ms_per_step"], row["pairs_per_s"], row["min_ms_per_step"]) == (250.0, 8.0, 100.0)
    assert (row["steps_timed"], row["runs"], row["peak_rss_mib"], row["model_step_mib"]) == (5, 2, 610.0, 90.0)


def test_full_size_kits_have_the_published_parameter_counts() -> None:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    unet, vae, text_encoder = kits.sd15_shaped_models(1, "meta")
    assert (count(unet), count(vae), count(text_encoder)) == (859_520_964, 83_653_863, 123_060_480)
    unet, vae, text_encoder, text_encoder_2 = kits.sdxl_shaped_models(1, "meta")
    assert (count(unet), count(text_encoder_2)) == (2_567_463_684, 694_659_840)  # SDXL base 1.0's UNet, OpenCLIP bigG
    assert count(vae) == 83_653_863 and vae.config.scaling_factor == 0.13025 and count(text_encoder) == 123_060_480


def test_sdxl_shaped_kit_trains_with_the_sdxl_family(make_config) -> None:
    pipe = kits.sdxl_shaped_pipeline(8)
    config = make_config(resolution=64, per_device_train_batch_size=2, max_steps=2)
    trainer = DiffusionDPOTrainer(pipe, config, make_preference_dataset(4, size=64))
    assert trainer.family.name == "stable-diffusion-xl"
    trainer.train()
    lora_b = [p for name, p in pipe.unet.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the steps changed it


def test_baseline_step_runs_with_bf16_autocast() -> None:
    times = step_time._baseline_times("tiny", pairs=2, steps=2, resolution=32, precision="bf16")
    assert len(times) == 2 and all(t > 0 for t in times)


def test_results_go_to_the_ignored_runs_folder_unless_out_is_given() -> None:
    root = Path(__file__).parents[1]
    out = Path(common.default_out("suite", quick=True))
    assert out.parent == root / "benchmarks" / "runs" and out.name.startswith("suite_")
    assert "/benchmarks/runs/" in (root / ".gitignore").read_text().splitlines()
    assert common.base_parser(__doc__, "quick").parse_args(["--out", "x.json"]).out == "x.json"
