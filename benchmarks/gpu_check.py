"""GPU check (issue 5, item 6): merge and evaluation throughput of one LCSC trial on one GPU.

Runs the merge engine (``lcsc_ops.math.merge.StackedMerger``, torch only) and an FID
evaluation (torchmetrics) on a ~35.7M-parameter DDPM-CIFAR-10 U-Net at 32x32 with random
weights, and prints one table: merge bandwidth vs the device's copy bandwidth, samples/s
and features/s vs the plain forward passes they are made of, and trials/min at 5k
samples per trial. Needs torch, torchmetrics and safetensors only; under 5 minutes on one
H100/H200. ``--quick`` shrinks everything so that it runs on a CPU in a minute.

The feature extractor is a stand-in (the real InceptionV3 needs weights this script does
not assume): a strided conv net on 299x299 inputs returning 2048-d features, ~4 GFLOPs
per image against InceptionV3's ~5.7, so features/s is indicative, not Inception's.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats  # noqa: E402  (torch + torchmetrics)
from lcsc_ops.evaluation.precision import PRECISIONS, precision_context  # noqa: E402  (torch only)
from lcsc_ops.math.merge import StackedMerger  # noqa: E402  (imports torch only)
from lcsc_ops.models.diffusion import DDIMSampler  # noqa: E402


# -- the model: DDPM's CIFAR-10 U-Net (Ho et al. 2020): ch 128, mults 1-2-2-2, 2 blocks, attention at 16x16 --
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(32, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    def __init__(self, ch: int = 128, mults: tuple[int, ...] = (1, 2, 2, 2), blocks: int = 2,
                 attn_res: tuple[int, ...] = (16,), res: int = 32, in_ch: int = 3) -> None:
        super().__init__()
        temb, self.ch = 4 * ch, ch
        self.time = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, cur = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(cur, ch * m, temb))
                cur = ch * m
                if res in attn_res:
                    self.down.append(Attention(cur))
                skips.append(cur)
            if i + 1 < len(mults):
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb), Attention(cur), ResBlock(cur, cur, temb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * m, temb))
                cur = ch * m
                if res in attn_res:
                    self.up.append(Attention(cur))
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(32, cur), nn.SiLU(), nn.Conv2d(cur, in_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.ch // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([args.cos(), args.sin()], dim=1))
        h, hs = self.inp(x), []
        hs.append(h)
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
            if not isinstance(layer, Attention):
                hs.append(h)
            else:
                hs[-1] = h
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h) if not isinstance(layer, Attention) else layer(h, emb)
        return self.out(h)


class FeatureStandIn(nn.Module):
    """2048-d features of images in [-1, 1], resized to 299x299 as Inception does (~4 GFLOPs/image)."""

    def __init__(self, width: int = 64, size: int = 299, num_features: int = 2048) -> None:
        super().__init__()
        self.size, self.num_features, layers, cin = size, num_features, [], 3
        for cout in (width, 2 * width, 4 * width, 8 * width, 16 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
            cin = cout
        self.body = nn.Sequential(*layers, nn.Conv2d(cin, self.num_features, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.body(x)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` (synchronising the device around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_seconds(nbytes: int, device: torch.device) -> float:
    """Median seconds of a plain device copy of ``nbytes`` bytes."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), device, reps=10)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="LCSC per-trial throughput on one GPU (issue 5).")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="sampling and features, as `lcsc-ops optimize --search-precision`: fp32, TF32 (default "
                        "on CUDA), bf16 autocast")
    p.add_argument("--channels-last", action="store_true",
                   help="sample with a channels_last copy of the merged weights (refreshed after each merge)")
    p.add_argument("--k", type=int, default=32, help="checkpoints in the window")
    p.add_argument("--samples", type=int, default=5000, help="samples per trial")
    p.add_argument("--nfe", type=int, default=10, help="DDIM steps")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    precision = a.precision or ("tf32" if device.type == "cuda" else "fp32")
    if a.quick:
        a.k, a.samples, a.batch, a.nfe = min(a.k, 4), min(a.samples, 64), min(a.batch, 32), min(a.nfe, 2)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    def evaluating():  # the product's evaluation context at this precision (TF32 flags, autocast)
        return precision_context(precision, device)
    torch.manual_seed(0)
    model = (UNet(ch=32, mults=(1, 2), blocks=1) if a.quick else UNet()).to(device)
    params = sum(p.numel() for p in model.parameters())
    extractor = (FeatureStandIn(width=8, size=75, num_features=64) if a.quick else FeatureStandIn()).to(device).eval()
    rows: list[tuple[str, str, str, str]] = []
    fig: dict[str, float] = {"params": params, "k": a.k, "samples": a.samples, "nfe": a.nfe}

    # 1. Merge: K checkpoints along a random walk, stacked once; one merge per trial.
    base = {n: t.detach() for n, t in model.state_dict().items()}
    sds = [{n: (t + 1e-3 * i * torch.randn_like(t)) if t.is_floating_point() else t for n, t in base.items()}
           for i in range(a.k)]
    coeffs = [1.0 / a.k] * a.k
    for dtype in (torch.bfloat16, torch.float32):
        merger = StackedMerger(sds, device=device, dtype=dtype)
        t_merge = timed(lambda: merger.merge(coeffs), device, reps=10)
        size = merger.num_parameters * dtype.itemsize
        moved = merger.nbytes + size * (2 if dtype.itemsize < 4 else 1)  # stack (+ reference) read, merge written
        t_copy = copy_seconds(merger.nbytes, device)
        merge_bw, copy_bw = moved / t_merge / 1e9, 2 * merger.nbytes / t_copy / 1e9
        name = "fp32" if dtype == torch.float32 else "bf16"
        fig[f"merge_{name}_ms"], fig[f"merge_{name}_gb_s"], fig["copy_gb_s"] = 1e3 * t_merge, merge_bw, copy_bw
        rows.append((f"merge K={a.k} {name} (stack {merger.nbytes / 1e9:.2f} GB)",
                     f"{merge_bw:,.0f} GB/s ({1e3 * t_merge:.2f} ms)", f"device copy {copy_bw:,.0f} GB/s",
                     f"{merge_bw / copy_bw:.2f}"))
    del sds, base
    merger.bind(model)  # the fp32 stack: every trial below merges into the model's own weights
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. The plain forward passes the evaluation is made of. A bound model's weights are views
    # of the merge buffer (contiguous), so channels_last samples with a copy refreshed per merge.
    model.eval()
    net = copy.deepcopy(model).to(memory_format=fmt) if a.channels_last else model
    extractor.to(memory_format=fmt)
    x = torch.randn(a.batch, 3, 32, 32, device=device).to(memory_format=fmt)
    t = torch.full((a.batch,), 500, device=device, dtype=torch.long)
    with torch.inference_mode(), evaluating():
        fwd = a.batch / timed(lambda: net(x, t), device, reps=5, warmup=2)
        feat_fwd = a.batch / timed(lambda: extractor(x.clamp(-1, 1)), device, reps=5, warmup=2)

    # 3. One trial through the product's own evaluation layer: merge, FIDScorer.sample (DDIMSampler
    # from fixed noise), features of the fake side against cached real statistics, Frechet distance.
    reference = torch.rand(64 if a.quick else 2000, 3, 32, 32) * 2 - 1  # stand-in real images
    stats = compute_reference_stats(reference, extractor, batch_size=a.batch, device=device)  # once per run
    scorer = FIDScorer(DDIMSampler(steps=a.nfe), extractor, stats, image_shape=(3, 32, 32), batch_size=a.batch,
                       device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample() -> torch.Tensor:
        with evaluating():
            return scorer.sample(net, a.samples, seed=0).float()

    def features(images: torch.Tensor) -> None:  # the fake-side feature pass alone (no Frechet distance)
        scorer.metric.reset()
        with torch.inference_mode(), evaluating():
            for batch in images.split(a.batch):
                scorer.metric.update(batch, real=False)

    def trial() -> float:
        merger.merge(coeffs)
        if net is not model:
            with torch.no_grad():
                for dst_p, src_p in zip(net.parameters(), model.parameters()):
                    dst_p.copy_(src_p)
        images = sample()
        with evaluating():
            return scorer.score_images(images)

    trial()  # warm-up (cuDNN autotuning, allocator)
    images = sample()
    t_sampling = timed(sample, device, reps=2)  # each measured alone, outside any trial
    t_features = timed(lambda: features(images), device, reps=2)
    t0 = time.perf_counter()
    with evaluating():
        scorer.score_images(images)
    sync()
    t_distance = time.perf_counter() - t0 - t_features  # score_images = features + Frechet distance
    t_trial = timed(trial, device, reps=2, warmup=0)
    alone = t_sampling + t_features
    samples_s, features_s = a.samples / t_sampling, a.samples / t_features
    fig.update(forward_img_s=fwd, extractor_img_s=feat_fwd, samples_s=samples_s, features_s=features_s,
               frechet_s=max(t_distance, 0.0), trial_s=t_trial, trials_per_min=60 / t_trial,
               floor_trials_per_min=60 / alone, trial_over_alone=t_trial / alone)
    rows += [
        (f"sampling, DDIM {a.nfe} steps (alone)", f"{samples_s:,.0f} samples/s",
         f"forward {fwd:,.0f} img/s / {a.nfe} = {fwd / a.nfe:,.0f}", f"{samples_s * a.nfe / fwd:.2f}"),
        ("features, torchmetrics FID update (alone)", f"{features_s:,.0f} img/s",
         f"extractor forward {feat_fwd:,.0f} img/s", f"{features_s / feat_fwd:.2f}"),
        (f"Frechet distance, {extractor.num_features}-d float64", f"{max(t_distance, 0.0):.2f} s", "", ""),
        (f"trial at {a.samples} samples (merge+sample+features+FID)", f"{t_trial:.2f} s = {60 / t_trial:.1f} trials/min",
         f"sampling + features alone: {alone:.2f} s = {60 / alone:.1f} trials/min", f"{t_trial / alone:.2f}"),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU check: {name}, torch {torch.__version__}, {precision}{', channels_last' if a.channels_last else ''}, U-Net {params / 1e6:.1f}M params at 32x32, "
          f"batch {a.batch}{' (QUICK: tiny sizes)' if a.quick else ''}")
    head = ("what", "measured", "against", "ratio")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if a.json:
        a.json.write_text(json.dumps({"device": name, "precision": precision, **fig}, indent=2) + "\n")
    return fig


if __name__ == "__main__":
    main()
