"""MIM pieces: masks, targets (HOG against a numpy loop), and the three encoders; the
SemanticMIM layer pair against one joint sequence with explicit attention masks."""

import math

import numpy as np
import pytest
import torch

from soapvit.backbones.vit import ViTConfig
from soapvit.pretrain.masking import block_mask, masked_count, random_mask
from soapvit.pretrain.mim import MAE, SemanticMIM, SimMIM
from soapvit.pretrain.targets import hog_targets, patchify, pixel_targets

CFG = ViTConfig(image_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_prefix_tokens=3)


# -- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("maker", [random_mask, block_mask])
@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.6, 0.75])
def test_masks_have_exact_counts(maker, ratio):
    mask = maker(5, (8, 8), ratio, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (5, 64)
    assert (mask.sum(1) == masked_count(64, ratio)).all()
    again = maker(5, (8, 8), ratio, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


def test_block_masks_are_spatially_clustered():
    gen = torch.Generator().manual_seed(0)

    def neighbours(mask):  # masked 4-neighbour pairs
        m = mask.reshape(-1, 8, 8).float()
        return ((m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item()

    assert neighbours(block_mask(20, (8, 8), 0.4, gen)) > 1.5 * neighbours(random_mask(20, (8, 8), 0.4, gen))


# -- targets ----------------------------------------------------------------------------------
def test_pixel_targets_standardise_each_patch():
    images = torch.randn(2, 3, 8, 8)
    t = pixel_targets(images, 4)
    manual = images[1, :, 4:8, 0:4].permute(1, 2, 0).reshape(-1)  # patch (row 1, col 0) = index 2
    expect = (manual - manual.mean()) / torch.sqrt(manual.var() + 1e-6)
    torch.testing.assert_close(t[1, 2], expect)
    assert patchify(images, 4).shape == (2, 4, 48)


def numpy_hog(image, patch, cell=4, bins=9):
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((h // patch, w // patch, c, patch // cell, patch // cell, bins))
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                gx = padded[ch, y + 1, x + 2] - padded[ch, y + 1, x]
                gy = padded[ch, y + 2, x + 1] - padded[ch, y, x + 1]
                angle = math.atan2(gy, gx) % math.pi
                b = min(int(angle / math.pi * bins), bins - 1)
                out[y // patch, x // patch, ch, (y % patch) // cell, (x % patch) // cell, b] += math.hypot(gx, gy)
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    out = out / np.maximum(norm, 1e-12)
    return out.reshape((h // patch) * (w // patch), -1)


def test_hog_matches_numpy_loop():
    image = torch.randn(1, 3, 16, 8, dtype=torch.float64)
    np.testing.assert_allclose(hog_targets(image, 8)[0].numpy(), numpy_hog(image[0].numpy(), 8), atol=1e-10)


# -- encoders ---------------------------------------------------------------------------------
def _attend(q_in, kv_in, attn, allowed):
    """Explicit multi-head attention of rows ``q_in`` over ``kv_in`` with a boolean mask."""
    d = q_in.shape[-1]
    w, b = attn.qkv.weight, attn.qkv.bias
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d : 2 * d].T + b[d : 2 * d]
    v = kv_in @ w[2 * d :].T + b[2 * d :]
    heads, hd = attn.num_heads, d // attn.num_heads
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(-2, -1) / math.sqrt(hd)
        logits = logits.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(logits, -1) @ v[..., sl])
    return torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias


def _joint_layer(block, seq, allowed):
    """Pre-norm block applied to the joint sequence with an explicit attention mask."""
    x = seq + _attend(block.norm1(seq), block.norm1(seq), block.attn, allowed)
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def test_semanticmim_equals_joint_sequence_with_explicit_masks():
    torch.manual_seed(0)
    model = SemanticMIM(CFG, target="hog", masking="random", mask_ratio=0.5).double()
    for p in model.parameters():  # non-trivial norms/biases
        p.add_(torch.randn_like(p) * 0.1)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    mask = random_mask(2, (4, 4), 0.5, torch.Generator().manual_seed(3))
    # reference: one sequence [IMG visible, PROXY, MASK]; layer i = compression block with
    # IMG/PROXY rows seeing only IMG/PROXY, then reconstruction block with MASK rows seeing
    # [PROXY (already updated; final-norm in the last layer), MASK]; other rows are carried
    # unchanged through that block.
    x, m = model.initial_tokens(pixels, mask)
    p = CFG.num_prefix_tokens
    img, proxy = x[:, p:], x[:, :p]
    n_img, n_mask = img.shape[1], m.shape[1]
    seq = torch.cat([img, proxy, m], dim=1)
    n = seq.shape[1]
    kind = torch.tensor([0] * n_img + [1] * p + [2] * n_mask)
    compress = (kind[:, None] < 2) & (kind[None, :] < 2) | torch.eye(n, dtype=torch.bool)
    reconstruct = (kind[:, None] == 2) & (kind[None, :] >= 1) | torch.eye(n, dtype=torch.bool)
    for layer, (comp, recon) in enumerate(zip(model.encoder.blocks, model.reconstruction)):
        after = _joint_layer(comp, seq, compress)
        seq = torch.cat([after[:, : n_img + p], seq[:, n_img + p :]], 1)
        if layer == CFG.depth - 1:  # the last reconstruction reads the final-norm proxies
            seq = torch.cat([seq[:, :n_img], model.encoder.norm(seq[:, n_img : n_img + p]), seq[:, n_img + p :]], 1)
        after = _joint_layer(recon, seq, reconstruct)
        seq = torch.cat([seq[:, : n_img + p], after[:, n_img + p :]], 1)
    expect = model.head(model.decoder_norm(seq[:, n_img + p :]))
    torch.testing.assert_close(model.predict_masked(pixels, mask), expect, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mae_equals_simmim_free_encoder_on_visible_tokens():
    """MAE's encoder output for the visible tokens equals running the ViT on the visible
    patches alone (attention is permutation-equivariant, so dropping tokens = not seeing them)."""
    torch.manual_seed(0)
    model = MAE(CFG, target="pixels", masking="random", mask_ratio=0.5, decoder_dim=12, decoder_depth=1, decoder_heads=2)
    pixels = torch.randn(2, 3, 16, 16)
    mask = random_mask(2, (4, 4), 0.5, torch.Generator().manual_seed(0))
    pred = model.predict_masked(pixels, mask)
    assert pred.shape == (2, 8, 48)
    # decoder input for image 0: rebuild by hand
    vit = model.encoder
    tokens = vit.embed_patches(pixels[:1])[0]
    x = torch.cat([vit.prefix_tokens[0], tokens[~mask[0]]])[None]
    for blk in vit.blocks:
        x = blk(x)
    d = model.decoder_embed(vit.norm(x))[0]
    full = model.decoder_mask_token.expand(16, -1).clone()
    full[~mask[0]] = d[3:]
    seq = torch.cat([d[:3], full + model.decoder_pos[0]])[None]
    for blk in model.decoder_blocks:
        seq = blk(seq)
    expect = model.head(model.decoder_norm(seq)[0, 3:][mask[0]])
    torch.testing.assert_close(pred[0], expect, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_simmim_replaces_masked_embeddings_before_position():
    torch.manual_seed(0)
    model = SimMIM(CFG, target="hog", masking="block", mask_ratio=0.5)
    pixels = torch.randn(1, 3, 16, 16)
    mask = block_mask(1, (4, 4), 0.5, torch.Generator().manual_seed(0))
    emb = model.encoder.embed_patches(pixels, mask, model.mask_token)
    torch.testing.assert_close(emb[0, mask[0]], (model.mask_token + model.encoder.pos_embed[0, mask[0]]))
    # masked pixel content does not influence the predictions
    changed = pixels.clone()
    grid_mask = mask[0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    changed[:, :, grid_mask] += 3.0
    torch.testing.assert_close(model.predict_masked(pixels, mask), model.predict_masked(changed, mask))
