"""SemanticMIM vs the SimMIM-style (vanilla MIM) baseline at the same settings: training
FLOPs (the paper's Appendix C formula and FLOPs counted on the real implementation), inference
FLOPs, and training step time on this machine.

    python benchmarks/pretrain_flops.py [--steps 5] [--batch-size 64] [--threads 1]

Settings as in the paper: baseline = mask tokens inside the encoder, 1 CLS, 40% masking;
SemanticMIM = 8 proxies, 60% masking, MaskFeat (HOG) target for both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone
from soapvit.pretrain.masking import random_mask
from soapvit.pretrain.mim import SemanticMIM, SimMIM

from _record import Record


def paper_costs(d: int, l0: int, l1: int, l2: int, vanilla_tokens: int) -> tuple[float, float, float]:
    """Appendix C, multiply-accumulates per block (B=1): vanilla MIM over ``vanilla_tokens``;
    SemanticMIM as printed in the paper, and with the two terms the printed formula leaves out
    (the cross-attention output projection, L2·D², and the second of the proxies' K/V
    projections, L1·D²), which the implementation does compute."""
    vanilla = 12 * vanilla_tokens * d**2 + 2 * vanilla_tokens**2 * d
    printed = (12 * (l0 + l1) * d**2 + 2 * (l0 + l1) ** 2 * d
               + 11 * l2 * d**2 + l1 * d**2 + 2 * l1 * l2 * d + 2 * l2**2 * d)
    return vanilla, printed, printed + (l2 + l1) * d**2


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def models(cfg: ViTConfig):
    baseline = SimMIM(cfg, target="hog", masking="random", mask_ratio=0.4)
    semantic = SemanticMIM(ViTConfig(**{**cfg.__dict__, "num_prefix_tokens": 8}), target="hog", masking="random", mask_ratio=0.6)
    return baseline, semantic


def train_flops(model, cfg: ViTConfig, batch: int) -> int:
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    mask = random_mask(batch, (cfg.grid, cfg.grid), model.mask_ratio, torch.Generator().manual_seed(0))
    return counted_flops(lambda: model.predict_masked(pixels, mask).square().mean().backward())


def inference_flops(model, cfg: ViTConfig) -> int:
    backbone = VisionTransformerBackbone(model.encoder.config, network=model.encoder)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        return counted_flops(lambda: backbone.vit(pixels))


def step_times(cfg: ViTConfig, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    named = dict(zip(("SimMIM-style", "SemanticMIM"), models(cfg)))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in named.items()}
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    times = {k: [] for k in named}
    for step in range(steps + 1):  # interleaved, first step is warm-up
        for k, m in named.items():
            t0 = time.perf_counter()
            loss = m.loss(images, labels, torch.Generator().manual_seed(step))
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            if step:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waits on a shared CPU)")
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)

    vanilla, printed, complete = paper_costs(768, 78, 8, 118, vanilla_tokens=197)
    record.print(f"paper formula, ViT-B/16 224 (D=768, L0=78, L1=8, L2=118; vanilla 196 patches + CLS), per block: "
                 f"SemanticMIM/vanilla {printed / vanilla:.4f} ({(printed / vanilla - 1) * 100:+.1f}%) as printed, "
                 f"{complete / vanilla:.4f} ({(complete / vanilla - 1) * 100:+.1f}%) with the omitted projections")
    inf_v, inf_s = 12 * 197 * 768**2 + 2 * 197**2 * 768, 12 * 204 * 768**2 + 2 * 204**2 * 768
    record.print(f"paper formula, inference (196+1 vs 196+8 tokens): {(inf_s / inf_v - 1) * 100:+.1f}%")
    record.results["paper_formula"] = {"as_printed": printed / vanilla, "completed": complete / vanilla,
                                       "inference": inf_s / inf_v}

    for key, name, cfg, batch in (
        ("vit_b16", "ViT-B/16 224", ViTConfig(224, 16, 768, 12, 12), 1),
        ("zoo", "zoo ViT 64px/8 (D=64, depth 6)", ViTConfig(64, 8, 64, 6, 4), 8),
    ):
        torch.manual_seed(0)
        baseline, semantic_model = models(cfg)
        fb, fs = train_flops(baseline, cfg, batch), train_flops(semantic_model, cfg, batch)
        ib, is_ = inference_flops(baseline, cfg), inference_flops(semantic_model, cfg)
        record.print(f"{name}: counted training FLOPs (fwd+bwd, incl. heads) per image: SimMIM-style "
                     f"{fb / batch / 1e9:.3f} G, SemanticMIM {fs / batch / 1e9:.3f} G, ratio {fs / fb:.4f} "
                     f"({(fs / fb - 1) * 100:+.1f}%); inference encoder {ib / 1e9:.3f} G vs {is_ / 1e9:.3f} G "
                     f"({(is_ / ib - 1) * 100:+.1f}%)")
        record.results[key] = {"name": name, "train_gflops": {"SimMIM-style": fb / batch / 1e9,
                                                              "SemanticMIM": fs / batch / 1e9},
                               "train_ratio": fs / fb,
                               "inference_gflops": {"SimMIM-style": ib / 1e9, "SemanticMIM": is_ / 1e9},
                               "inference_ratio": is_ / ib}

    cfg = ViTConfig(64, 8, 64, 6, 4)
    times = step_times(cfg, args.batch_size, args.steps)
    base, sem = times["SimMIM-style"], times["SemanticMIM"]
    record.print(f"zoo ViT, batch {args.batch_size}, median of {args.steps} interleaved steps on "
                 f"{torch.get_num_threads()} CPU threads: SimMIM-style {base:.3f} s, SemanticMIM {sem:.3f} s, "
                 f"ratio {sem / base:.3f}")
    record.results["zoo_step_s"] = {"SimMIM-style": base, "SemanticMIM": sem, "ratio": sem / base}
    record.write()


if __name__ == "__main__":
    main()
