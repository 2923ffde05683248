"""Decoder backbone: KV-cache decoding equals the full forward pass, rollback, masks, 2-D RoPE, save/load."""

from functools import partial

import torch
import pytest

from tiny import tiny_transformer
from mmgen.models.transformer import Transformer, rope_angles
from mmgen.paradigms.next_token import NextTokenLayout, build_batch, decode_step, prefill
from mmgen.paradigms.sequence import attention_mask
from mmgen.text import UnifiedVocab


tiny = partial(tiny_transformer, 60, 64, n_kv_heads=2)  # vocabulary 60, 64 positions


@pytest.mark.parametrize("rope_2d", [True, False])
def test_kv_cache_decoding_equals_full_forward(rope_2d):
    model = tiny(rope_2d=rope_2d)
    layout = NextTokenLayout(UnifiedVocab(text_vocab_size=20, image_vocab_size=24), max_text_len=6, grid=(3, 3))
    codes = torch.randint(0, 24, (3, 3, 3), generator=torch.Generator().manual_seed(1))
    batch = build_batch(layout, [[3, 4], [5, 6, 7, 8, 9, 10], [11]], codes)  # different pad lengths
    with torch.no_grad():
        full = model(batch.tokens, positions=batch.positions, mask=batch.mask)
        valid = batch.tokens != 0
        T0 = layout.boi_index + 1
        cache = model.new_cache(3, batch.tokens.shape[1])
        steps = [prefill(model, batch.tokens[:, :T0], batch.positions[:, :T0], valid[:, :T0], cache)]
        for t in range(T0, batch.tokens.shape[1]):
            steps.append(decode_step(model, batch.tokens[:, t], batch.positions[:, t], valid, cache))
    inc = torch.stack(steps, 1)
    torch.testing.assert_close(inc, full[:, T0 - 1:], atol=1e-5, rtol=0)


def test_rollback_then_redecode_matches():
    model = tiny()
    tokens = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 16)
        model(tokens[:, :7], cache=cache)
        model(torch.randint(0, 60, (2, 3)), cache=cache)  # wrong continuation, then roll back
        assert cache.length == 10
        cache.rollback(7)
        tail = model(tokens[:, 7:], cache=cache)
    torch.testing.assert_close(tail, full[:, 7:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rollback length"):
        cache.rollback(11)


def test_causal_and_padding_mask():
    valid = torch.tensor([[False, False, True, True]])
    m = attention_mask(valid)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    # later tokens never change earlier logits
    model = tiny()
    a = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 60
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :5], model(b)[:, :5], atol=0, rtol=0)


def test_rope_2d_is_relative_per_axis():
    """Scores depend only on (row, col) offsets: shifting both positions by the same vector keeps them."""
    torch.manual_seed(0)
    from mmgen.models.transformer import apply_rope
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        aq = rope_angles(torch.tensor([[pq]]), 16, 10000.0, True)
        ak = rope_angles(torch.tensor([[pk]]), 16, 10000.0, True)
        aq, ak = torch.cat([aq, aq], -1), torch.cat([ak, ak], -1)
        return (apply_rope(q, aq.cos(), aq.sin()) * apply_rope(k, ak.cos(), ak.sin())).sum()

    torch.testing.assert_close(score((3, 5), (1, 2)), score((13, 25), (11, 22)))
    assert not torch.allclose(score((3, 5), (1, 2)), score((3, 5), (2, 1)))  # rows and columns differ


def test_adaln_zero_init_is_identity_and_save_load(tmp_path):
    model = tiny(cond_dim=8)
    tokens = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(tokens, cond=torch.randn(2, 8)))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    again = Transformer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


def test_bad_config():
    with pytest.raises(ValueError, match="n_heads"):
        Transformer(vocab_size=10, dim=30, n_heads=4)


def test_inference_fast_path_is_bit_identical_and_follows_weight_updates():
    """Under no_grad the projections run fused (q|k|v, w1|w3) and RMSNorm as one kernel: the logits must be the
    very numbers of the training-path composite, and an in-place weight update must reach the fused copy."""
    model = tiny()
    tokens = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = model(tokens)
    slow = model(tokens).detach()  # grad enabled: separate projections, composite norm
    assert torch.equal(fast, slow)
    with torch.no_grad():
        model.layers[0].attn.wk.weight.mul_(1.5)
        model.layers[1].mlp.w3.weight.add_(0.01)
        fast = model(tokens)
    assert torch.equal(fast, model(tokens).detach()) and not torch.equal(fast, slow)
