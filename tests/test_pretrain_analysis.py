"""Attention distance against hand-computed cases and a brute-force loop."""

import math

import torch

from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone
from soapvit.pretrain.analysis import attention_distance, mean_attention_distance, patch_distances, query_attention


def test_self_attention_has_zero_distance_and_uniform_matches_hand_value():
    eye = torch.eye(1 + 4).expand(1, 2, 5, 5)  # 1 prefix token, 2x2 grid
    assert torch.allclose(attention_distance(eye, 1, (2, 2), 8), torch.zeros(2))
    uniform = torch.full((1, 1, 5, 5), 0.2)
    # every patch: distances 0, 8, 8, 8·√2 to the four patches, uniform weights
    expect = (0 + 8 + 8 + 8 * math.sqrt(2)) / 4
    assert torch.allclose(attention_distance(uniform, 1, (2, 2), 8), torch.tensor([expect]))


def test_distance_matches_a_loop_on_random_attention():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 2 + 6, 2 + 6, generator=g), -1)
    grid = (2, 3)
    got = attention_distance(attn, 2, grid, 4)
    for head in range(3):
        values = []
        for b in range(2):
            for q in range(6):
                row = attn[b, head, 2 + q, 2:]
                row = row / row.sum()
                qy, qx = divmod(q, 3)
                values.append(sum(float(row[k]) * 4 * math.hypot(qy - k // 3, qx - k % 3) for k in range(6)))
        assert abs(got[head] - sum(values) / len(values)) < 1e-5
    assert patch_distances(grid, 4)[0, 5] == 4 * math.hypot(1, 2)


def test_backbone_level_analyses_have_the_right_shapes():
    torch.manual_seed(0)
    bb = VisionTransformerBackbone(ViTConfig(16, 4, 16, 2, 2, num_prefix_tokens=3))
    pixels = torch.randn(3, 3, 16, 16)
    dist = mean_attention_distance(bb, pixels, batch_size=2)
    assert dist.shape == (2, 2) and (dist > 0).all() and (dist < 4 * math.hypot(3, 3)).all()
    amap = query_attention(bb, pixels, 1, (1, 2))
    assert amap.shape == (2, 4, 4) and torch.allclose(amap.sum((1, 2)), torch.ones(2))
