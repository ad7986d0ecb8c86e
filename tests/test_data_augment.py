"""Tensor augmentations: neutral settings are the identity, seeded views are reproducible, and
the uint8 probe views keep size and dtype."""

import torch

from soapvit.data.augment import color_jitter, mix_labels, random_resized_crop, random_resized_flip


def test_full_crop_without_flip_is_identity_and_flip_mirrors():
    images = torch.rand(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    same = random_resized_crop(images, 8, gen, scale=(1, 1), ratio=(1, 1), flip=False)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    flipped = random_resized_crop(images, 8, gen, scale=(1, 1), ratio=(1, 1), flip=True)
    for a, b in zip(flipped, images):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)


def test_colour_jitter_neutral_settings_and_brightness():
    # seeded and away from 0: the brightness ratio of near-black pixels is numerically unstable
    images = 0.1 + 0.4 * torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(color_jitter(images, gen, 0, 0, 0, 0, p=1.0), images, atol=1e-5, rtol=0)
    bright = color_jitter(images, gen, 0.5, 0, 0, 0, p=1.0)
    ratio = bright / images
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-4)  # one factor per image


def test_mix_labels_targets_match_the_mixed_area():
    images = torch.zeros(4, 3, 8, 8)
    images[2:] = 1.0
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(6):
        mixed, targets = mix_labels(images, labels, 4, torch.Generator().manual_seed(seed), smoothing=0.0)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # image 0's partner is image 3 (ones): the share of ones equals the weight of label 3
        torch.testing.assert_close(mixed[0].mean(), targets[0, 3], atol=1e-6, rtol=0)


def test_uint8_views_keep_size_and_dtype_and_follow_the_seed():
    images = torch.randint(0, 256, (3, 3, 12, 20), dtype=torch.uint8)
    views = random_resized_flip(images, torch.Generator().manual_seed(5))
    assert views.dtype == torch.uint8 and views.shape == images.shape
    assert torch.equal(views, random_resized_flip(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(views, random_resized_flip(images, torch.Generator().manual_seed(6)))
    whole = random_resized_flip(images, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    for a, b in zip(whole, images):  # the full image, mirrored or not
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
