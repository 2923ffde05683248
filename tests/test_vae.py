"""Continuous tokenizer (tokenizers_vis.vae): latent grid, latent scaling, the scaling-factor recipe, a tiny
overfit, save/load and bad input."""

import math
from functools import partial

import pytest
import torch
from diffusers import AutoencoderKL

import tiny
from tokenizers_vis.vae import (decode_latents, encode_latents, estimate_scaling_factor, latent_channels, make_vae,
                                vae_grid, vae_last_layer, vae_training_forward)


def disk_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a flat background color with one soft-edged colored disk."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        bg, fg = torch.rand(2, 3, 1, 1, generator=g) * 1.6 - 0.8
        cx, cy = torch.rand(2, generator=g) * 1.0 - 0.5
        r = 0.3 + 0.3 * torch.rand(1, generator=g)
        mask = torch.sigmoid((r - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()) * 20)
        out.append(bg * (1 - mask) + fg * mask)
    return torch.stack(out).clamp(-1, 1)


tiny_vae = partial(tiny.tiny_vae, image_size=32, block_out_channels=(8, 16, 16))  # 8x8 latents


@pytest.fixture(scope="module")
def images():
    return disk_images()


def test_default_grid_matches_vqgan():
    vae = make_vae()
    assert vae_grid(vae) == (8, 8) and latent_channels(vae) == 4
    z = encode_latents(vae, torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 4, 8, 8)


def test_shapes_and_grid(images):
    vae = tiny_vae()
    assert vae_grid(vae) == (8, 8) and latent_channels(vae) == 4
    with torch.no_grad():
        z = encode_latents(vae, images)
        x = decode_latents(vae, z)
    assert z.shape == (8, 4, 8, 8) and x.shape == (8, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        s1 = encode_latents(vae, images, sample=True, generator=g1)
        s2 = encode_latents(vae, images, sample=True, generator=g2)
    assert torch.equal(s1, s2) and not torch.allclose(s1, z)


def test_scaling_round_trip_with_shift(images):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.37, shift_factor=0.2)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        z = encode_latents(vae, images)
        torch.testing.assert_close(z, (mean - 0.2) * 0.37)
        torch.testing.assert_close(decode_latents(vae, z), vae.decode(mean).sample.clamp(-1, 1),
                                   atol=1e-5, rtol=1e-5)


def test_estimate_scaling_factor_gives_unit_std(images):
    vae = tiny_vae()
    sf = estimate_scaling_factor(vae, images, batch_size=3)  # batches of 3 exercise the concatenation
    assert not math.isclose(sf, 1.0, rel_tol=0.05)  # the unscaled latents are not already unit std
    vae.register_to_config(scaling_factor=sf)
    with torch.no_grad():
        z = encode_latents(vae, images)
    assert abs(z.std().item() - 1.0) < 1e-4


def test_tiny_vae_overfits(images):
    torch.set_num_threads(1)
    vae = tiny_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        recon, kl = vae_training_forward(vae, images, generator=g)
        rec = (recon - images).pow(2).mean()
        loss = rec + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(rec.item())
    assert kl.shape == () and kl.item() > 0  # the posterior never equals the prior
    assert recon.shape == images.shape
    assert vae_last_layer(vae).grad is not None and vae_last_layer(vae).shape[0] == 3
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)


def test_save_load_bit_identical(tmp_path, images):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.61)
    vae.save_pretrained(tmp_path)
    again = AutoencoderKL.from_pretrained(tmp_path)
    vae.eval()  # from_pretrained returns eval mode; the decoder's train-mode path differs in the last bits
    assert again.config.scaling_factor == 0.61 and vae_grid(again) == (8, 8)
    with torch.no_grad():
        assert torch.equal(encode_latents(vae, images), encode_latents(again, images))
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(decode_latents(vae, z), decode_latents(again, z))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.long), "float tensor"),
    (torch.zeros(2, 1, 32, 32), r"shape \(B, 3, 32, 32\)"),
    (torch.zeros(2, 3, 64, 64), r"shape \(B, 3, 32, 32\)"),
    (torch.zeros(3, 32, 32), r"shape \(B, 3, 32, 32\)"),
    (torch.full((1, 3, 32, 32), 1.5), r"\[-1, 1\]"),
    ([[0.0]], "float tensor"),
])
def test_bad_images_raise(bad, match):
    vae = tiny_vae()
    with pytest.raises(ValueError, match=match):
        encode_latents(vae, bad)


def test_bad_config_and_latents_raise():
    with pytest.raises(ValueError, match="image_size"):
        make_vae(image_size=36)
    with pytest.raises(ValueError, match="norm_num_groups"):
        make_vae(block_out_channels=(24, 64, 64, 64))
    with pytest.raises(ValueError, match="latents"):
        decode_latents(tiny_vae(), torch.zeros(1, 3, 8, 8))
