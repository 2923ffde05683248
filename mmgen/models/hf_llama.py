"""mmgen's decoder as a transformers `LlamaForCausalLM` with the same weights.

The block layout is LLaMA's (RMSNorm, SwiGLU, GQA, rotate-half RoPE), so the conversion is a renaming of
tensors. With `rope_2d=False` the result is a stock LlamaForCausalLM. With the 2-D RoPE (half of the
rotary pairs follow the image row, half the column) the model's `rotary_emb` is replaced by
`ImageRope2D`, which maps transformers' 1-D position ids to mmgen's 2-D positions for a prompt of a given
length followed by a raster image; the rest of the model, `generate()` included, is transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmgen.models.transformer import Transformer, rope_angles


class ImageRope2D(nn.Module):
    """(cos, sin) for 1-D position ids laid out as [prompt of `prefix_len` tokens][image, raster, width w]:
    prompt position s -> (s, s); image token i -> (prefix_len + i // w, prefix_len + i % w). mmgen left-pads
    prompts, which shifts both coordinates by the same amount; RoPE only sees differences, so the logits
    are the same."""

    def __init__(self, head_dim: int, theta: float, grid_width: int, prefix_len: int = 0):
        super().__init__()
        self.head_dim, self.theta, self.grid_width, self.prefix_len = head_dim, theta, grid_width, prefix_len

    @torch.no_grad()
    def forward(self, x, position_ids):
        s = position_ids
        i = (s - self.prefix_len).clamp_min(0)
        image = s >= self.prefix_len
        rows = torch.where(image, self.prefix_len + i // self.grid_width, s)
        cols = torch.where(image, self.prefix_len + i % self.grid_width, s)
        angles = rope_angles(torch.stack([rows, cols], -1), self.head_dim, self.theta, two_d=True)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def llama_config(model: Transformer) -> LlamaConfig:
    c = model.config
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=model.layers[0].mlp.w1.out_features,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                       num_key_value_heads=c.n_kv_heads or c.n_heads, max_position_embeddings=max(c.max_seq_len, 4096),
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, hidden_act="silu", pad_token_id=0)


def to_llama(model: Transformer, grid_width: int | None = None) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding `model`'s weights (adaLN-conditioned models have no LLaMA equivalent)."""
    if model.config.cond_dim:
        raise ValueError("to_llama: models with adaLN conditioning (cond_dim) have no LlamaForCausalLM equivalent")
    if model.config.rope_2d and grid_width is None:
        raise ValueError("to_llama: a model with 2-D RoPE needs grid_width (image width in tokens)")
    config = llama_config(model)
    config.rope_parameters = {"rope_type": "default", "rope_theta": model.config.rope_theta}
    hf = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.head.proj.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        state |= {p + "self_attn.q_proj.weight": block.attn.wq.weight, p + "self_attn.k_proj.weight": block.attn.wk.weight,
                  p + "self_attn.v_proj.weight": block.attn.wv.weight, p + "self_attn.o_proj.weight": block.attn.wo.weight,
                  p + "mlp.gate_proj.weight": block.mlp.w1.weight, p + "mlp.up_proj.weight": block.mlp.w3.weight,
                  p + "mlp.down_proj.weight": block.mlp.w2.weight, p + "input_layernorm.weight": block.attn_norm.weight,
                  p + "post_attention_layernorm.weight": block.mlp_norm.weight}
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"to_llama: weight mapping mismatch; missing {missing}, unexpected {unexpected}")
    if model.config.rope_2d:
        hf.model.rotary_emb = ImageRope2D(model.head_dim, model.config.rope_theta, grid_width)
    return hf.to(model.device).eval()
