"""Alignment: frozen target encoders, losses that vanish at the target, config validation, training wiring."""

import pytest
import torch
import torch.nn as nn

from tiny import tiny_vqgan
from mmgen.alignment import AlignmentConfig, AlignmentHead, make_target_encoder
from mmgen.alignment.losses import resample_patches


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tokenizer"])
def test_encoder_is_frozen_and_gets_no_gradients(name):
    enc = make_target_encoder(name, vq=tiny_vqgan().eval())
    enc.train()
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    g, patches = enc(images)
    assert g.shape == (2, enc.global_dim) and patches.shape[2] == enc.patch_dim
    assert patches.shape[1] == enc.patch_grid[0] * enc.patch_grid[1]
    head = AlignmentHead(AlignmentConfig(type="arra"), 16, enc.global_dim)
    head(torch.randn(2, 4, 16, requires_grad=True), g).backward()
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in head.parameters())


def test_open_clip_encoder_random_weights():
    enc = make_target_encoder("open_clip:ViT-B-32")
    g, patches = enc(torch.zeros(1, 3, 64, 64))
    assert g.shape == (1, 512) and patches.shape == (1, 49, 768) and enc.patch_grid == (7, 7)
    assert all(not p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("kind", ["arra", "repa"])
def test_loss_is_zero_when_projection_equals_target(kind):
    head = AlignmentHead(AlignmentConfig(type=kind), 6, 6)
    head.proj = nn.Identity()
    target = torch.randn(3, 6)
    hidden = target[:, None, :].expand(3, 5, 6).clone()
    loss = head(hidden, target, hidden) if kind == "repa" else head(hidden, target)
    assert loss.abs().item() < 1e-6
    assert head(torch.randn(3, 5, 6), target, torch.randn(3, 5, 6)).item() > 0.1


def test_ola_loss_falls_when_fitting():
    torch.manual_seed(0)
    head = AlignmentHead(AlignmentConfig(type="ola"), 8, 4)
    hidden, target = torch.randn(6, 3, 8), torch.randn(6, 4)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = head(hidden, target).item()
    for _ in range(200):
        opt.zero_grad()
        head(hidden, target).backward()
        opt.step()
    assert head(hidden, target).item() < 0.3 * first


def test_resample_patches_to_token_grid():
    p = torch.arange(16.0).view(1, 16, 1)
    out = resample_patches(p, (4, 4), (2, 2))
    assert out.shape == (1, 4, 1)
    assert torch.equal(resample_patches(p, (4, 4), (4, 4)), p)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(type="clip"), "alignment.type must be one of none, arra, repa, ola"),
    (dict(type="arra", layer=0), "alignment.layer"),
    (dict(type="arra", layer=7), "alignment.layer"),
    (dict(type="arra", weight=0.0), "alignment.weight"),
    (dict(type="repa", encoder="dino"), "alignment.encoder"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AlignmentConfig(**kwargs).validate(n_layers=6)
