"""VAR multi-scale residual tokenizer (tokenizers_vis.multiscale): residual quantization maths, the decoder
input, teacher inputs for next-scale prediction, schedules, training, restarts, save/load, bad input."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_vqgan
from mmgen.eval.image_metrics import psnr
from test_vqgan import blob_images
from tokenizers_vis.multiscale import MultiScaleVQGAN

tiny_msvq = partial(tiny_vqgan, channel_mult=(1, 2, 2), embed_dim=32, num_codes=64, image_size=32, scales=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def images():
    return blob_images()


def decoder_input(vq: MultiScaleVQGAN, images: torch.Tensor):
    """Run forward and capture what the decoder is fed."""
    seen = []
    handle = vq.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        out = vq(images)
    handle.remove()
    return out, seen[0]


def test_shapes_and_properties(images):
    vq = tiny_msvq(scales=(1, 3, 5, 8)).eval()  # non-divisible sides: area / bicubic resizes of any ratio
    assert vq.scales == (1, 3, 5, 8) and vq.num_tokens == 1 + 9 + 25 + 64 and vq.grid_size == (8, 8)
    assert vq.vocab_size == 64 and vq.feature_dim == 32 and vq.downsample_factor == 4
    assert vq.last_layer is vq.decoder.conv_out.weight and len(vq.phis) == 4
    ids = vq.encode(images)
    assert [tuple(i.shape) for i in ids] == [(8, 1, 1), (8, 3, 3), (8, 5, 5), (8, 8, 8)]
    assert all(i.dtype == torch.long for i in ids)
    out = vq(images)
    assert out.recon.shape == (8, 3, 32, 32) and out.ids.shape == (8, 99) and out.ids.dtype == torch.long
    assert torch.equal(out.ids, torch.cat([i.flatten(1) for i in ids], 1))  # raster, coarse to fine
    assert out.quant_loss.shape == () and out.quant_loss.item() > 0
    assert 1 <= out.perplexity.item() <= 64 and 0 < out.usage.item() <= 1
    assert vq.next_scale_inputs(ids).shape == (8, 99 - 1, 32)
    assert vq.ids_to_features(ids).shape == (8, 32, 8, 8)
    dec = vq.decode(ids)
    assert dec.shape == (8, 3, 32, 32) and dec.min() >= -1 and dec.max() <= 1
    default = MultiScaleVQGAN()
    assert default.scales == (1, 2, 3, 4, 6, 8) and default.num_tokens == 130 and default.grid_size == (8, 8)


def test_codes_sum_to_the_decoder_input(images):
    vq = tiny_msvq().eval()
    out, z_q = decoder_input(vq, images)
    ids = vq.encode(images)
    with torch.no_grad():
        f_hat = vq.ids_to_features(ids)
        # straight-through f + (f_hat - f) equals f_hat up to float rounding
        torch.testing.assert_close(f_hat, z_q, atol=1e-5, rtol=0)
        torch.testing.assert_close(vq.decode(ids), out.recon.clamp(-1, 1), atol=1e-5, rtol=0)


def test_each_scale_quantizes_the_residual(images):
    """Scale k's ids are the nearest codes to the area-downsampled residual f - f_hat_{<k}, brute force."""
    vq = tiny_msvq().eval()
    ids = vq.encode(images)
    q = vq.quantizer
    with torch.no_grad():
        f = vq.encoder(images)
        f_hat = torch.zeros_like(f)
        for k, s in enumerate(vq.scales):
            z = q.project(F.interpolate(f - f_hat, size=(s, s), mode="area")).reshape(-1, q.code_dim)
            brute = torch.cdist(z, q.codebook).argmin(-1).view(-1, s, s)
            assert (brute == ids[k]).float().mean() > 0.99, k  # float ties at most
            f_hat, _ = vq.next_input(f_hat, ids[k], k)


def test_next_input_loop_equals_teacher_inputs(images):
    vq = tiny_msvq(scales=(1, 2, 3, 5, 8)).eval()
    ids = vq.encode(images[:3])
    with torch.no_grad():
        teacher = vq.next_scale_inputs(ids)
        f_hat = torch.zeros(3, 32, 8, 8)
        parts = []
        for k in range(len(vq.scales)):
            f_hat, x = vq.next_input(f_hat, ids[k], k)
            if x is not None:
                assert x.shape == (3, vq.scales[k + 1] ** 2, 32)
                parts.append(x)
        assert x is None and torch.equal(torch.cat(parts, 1), teacher)
        assert torch.equal(f_hat, vq.ids_to_features(ids))
        # the input of scale 2 is the scale-1 contribution seen at 2x2 (a 1x1 map upsampled, then phi'd)
        h = vq.phis[0](F.interpolate(vq.quantizer.lookup(ids[0]), size=(8, 8), mode="bicubic"))
        torch.testing.assert_close(teacher[:, :4], F.interpolate(h, size=(2, 2), mode="area").flatten(2).mT)


def test_overfit_loss_falls_and_codebook_is_used(images):
    vq = tiny_msvq()
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    with torch.no_grad():
        before = psnr(vq.eval().decode(vq.encode(images)), images).item()
    vq.train()
    losses = []
    for _ in range(60):
        out = vq(images)
        loss = (out.recon - images).abs().mean() + (out.recon - images).pow(2).mean() + out.quant_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vq.eval()
    with torch.no_grad():
        after = psnr(vq.decode(vq.encode(images)), images).item()
    # measured with seed 0: loss 1.80 -> 0.37, PSNR 9.7 -> 18.5 dB
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], (losses[0], losses[-5:])
    assert after > before + 5, (before, after)
    ids = vq.encode(images)
    used = torch.cat([i.flatten() for i in ids]).unique().numel()
    assert used > 8, used
    with torch.no_grad():  # the codes now explain most of the encoder map (measured: 35% of it is left)
        f = vq.encoder(images)
        assert (f - vq.ids_to_features(ids)).pow(2).mean() < 0.5 * f.pow(2).mean()


def test_gradients_reach_codebook_phis_and_encoder(images):
    vq = tiny_msvq()
    out = vq(images[:2])
    out.quant_loss.backward(retain_graph=True)
    for p in (vq.quantizer.embedding.weight, vq.quantizer.proj_out.weight, vq.phis[0].weight, vq.phis[-1].weight,
              vq.encoder.net[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    vq.zero_grad()
    out.recon.pow(2).mean().backward()  # straight-through: reconstruction reaches the encoder, not the codes
    assert vq.encoder.net[0].weight.grad.abs().sum() > 0
    assert vq.quantizer.embedding.weight.grad is None or vq.quantizer.embedding.weight.grad.abs().sum() == 0


def test_first_training_step_reseeds_codes_no_scale_hit(images):
    vq = tiny_msvq().train()
    before = vq.quantizer.embedding.weight.detach().clone()
    ids = vq.encode(images)  # encode never touches the codebook, even in training mode
    assert torch.equal(vq.quantizer.embedding.weight, before) and torch.equal(vq.quantizer.usage_ema, torch.zeros(64))
    hit = torch.bincount(torch.cat([i.flatten() for i in ids]), minlength=64) > 0
    assert 0 < hit.sum() < 64
    vq(images)
    changed = (vq.quantizer.embedding.weight != before).any(-1)
    assert torch.equal(changed, ~hit)  # usage is counted over all scales, so only never-hit codes restart


def test_save_load_bit_identical(tmp_path, images):
    vq = tiny_msvq(scales=(1, 2, 3, 8), phi_kernel=1, phi_ratio=0.3)
    vq(images)  # a training step's restart changes the codebook: that state must be saved
    vq.eval().save_pretrained(tmp_path)
    again = MultiScaleVQGAN.from_pretrained(tmp_path).eval()
    assert again.config.scales == (1, 2, 3, 8) and again.config.channel_mult == (1, 2, 2)
    assert again.phis[0].ratio == 0.3 and again.phis[0].kernel_size == (1, 1)
    for (k, a), (k2, b) in zip(vq.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = vq.encode(images)
    assert all(torch.equal(a, b) for a, b in zip(ids, again.encode(images)))
    with torch.no_grad():
        assert torch.equal(vq.decode(ids), again.decode(ids))
        assert torch.equal(vq.next_scale_inputs(ids), again.next_scale_inputs(ids))


@pytest.mark.parametrize("kw, match", [
    (dict(scales=(1, 2, 2, 8)), "strictly increasing"),
    (dict(scales=(1, 2, 4)), r"ending at the encoder grid side 8"),
    (dict(scales=(1, 2, 4, 16)), r"ending at the encoder grid side 8"),
    (dict(scales=(0, 8)), "positive ints"),
    (dict(scales=()), "scales must be"),
    (dict(scales=(1.0, 8)), "scales must be"),
    (dict(phi_kernel=2), "phi_kernel must be an odd positive int"),
    (dict(phi_ratio=1.5), r"phi_ratio must be in \[0, 1\]"),
    (dict(image_size=30), "image_size must be a multiple of the downsampling factor 4"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_msvq(**kw)


def test_bad_input(images):
    vq = tiny_msvq().eval()
    ids = vq.encode(images[:2])
    with pytest.raises(ValueError, match=r"images must be 32x32"):
        vq.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        vq(torch.full((2, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"images must be a float tensor"):
        vq.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"ids_list must be a list of 4 id maps"):
        vq.decode(ids[:3])
    with pytest.raises(ValueError, match=r"ids_list\[2\] must have shape \(B, 4, 4\)"):
        vq.decode([ids[0], ids[1], ids[1], ids[3]])
    with pytest.raises(ValueError, match=r"ids_list\[1\] must lie in \[0, 64\)"):
        vq.decode([ids[0], ids[1] + 64, ids[2], ids[3]])
    with pytest.raises(ValueError, match=r"ids_list\[0\] must be an integer tensor"):
        vq.next_scale_inputs([ids[0].float()] + ids[1:])
    with pytest.raises(ValueError, match=r"ids of scale 1 must have shape \(B, 2, 2\)"):
        vq.next_input(torch.zeros(2, 32, 8, 8), ids[2], 1)
    with pytest.raises(ValueError, match=r"k must be a scale index in \[0, 4\)"):
        vq.next_input(torch.zeros(2, 32, 8, 8), ids[0], 4)
