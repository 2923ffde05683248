"""ETT: End-to-End Vision Tokenizer Tuning (Wang et al. 2025, arXiv 2505.10562), for next-token runs on a VQGAN.

The decoder reads each image token as the tokenizer's code vector through a projector (MLP + GELU, as the paper)
instead of its id-embedding row, so the AR loss reaches the tokenizer: encoder by the straight-through estimator,
codebook through the looked-up vectors. Stage 1 (steps < `ett.stage1_steps`) trains the projector alone, tokenizer
and decoder frozen; stage 2 trains projector, decoder and tokenizer (encoder, codebook, pixel decoder) on the AR loss
plus `ett.rec_weight` x the tokenizer's own loss (L1/L2, perceptual, codebook terms: `tokenizers_vis.losses`).

The quantizer runs without dead-code restarts (eval mode), so the codebook moves by gradients only. At saving, the
projector is folded into the decoder's image-id rows (`fold_projector`: row k = projector(code k), exactly what
training fed it), so the saved pipeline samples ids as any next-token pipeline and decodes with the tuned tokenizer.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.models.text_encoder import caption_prefix
from mmgen.paradigms.sequence import IGNORE_INDEX
from mmgen.training.loop import decay_groups
from tokenizers_vis.losses import VQGANLoss
from tokenizers_vis.vqgan import VQGAN


@dataclass
class ETTConfig:
    enabled: bool = False
    stage1_steps: int = 0  # steps [0, stage1_steps) train the projector alone; the rest tune everything
    rec_weight: float = 1.0  # weight of the tokenizer's loss beside the AR loss in stage 2 (paper's value unverified)
    tokenizer_lr_scale: float = 1.0  # the tokenizer's learning rate as a multiple of train.lr
    projector_lr_scale: float = 1.0  # the projector's (fresh, while the rest continues) as a multiple of train.lr
    projector_hidden: int = 0  # the projector MLP's hidden width; 0: the decoder width
    # the tokenizer's loss terms (VQGANLoss arguments: l1_weight, l2_weight, perceptual_weight, codebook_weight,
    # perceptual_resize); the adversarial term is not available here (disc_weight must stay 0)
    loss: dict = field(default_factory=lambda: {"disc_weight": 0.0})

    def validate(self, paradigm: str, vq, train, alignment_type: str, world: int) -> None:
        """Refuse what ETT does not cover, naming the key and the accepted values (nothing to check when off)."""
        if not self.enabled:
            return
        checks = [
            (paradigm == "next_token", f"paradigm must be next_token (model.shuffle_window 1), got {paradigm!r}"),
            (isinstance(vq, VQGAN), f"tokenizer must be a VQGAN directory, got {type(vq).__name__}"),
            (0 <= self.stage1_steps <= train.steps,
             f"ett.stage1_steps must be in 0..train.steps={train.steps}, got {self.stage1_steps}"),
            (self.rec_weight >= 0, f"ett.rec_weight must be >= 0, got {self.rec_weight}"),
            (self.tokenizer_lr_scale > 0, f"ett.tokenizer_lr_scale must be > 0, got {self.tokenizer_lr_scale}"),
            (self.projector_lr_scale > 0, f"ett.projector_lr_scale must be > 0, got {self.projector_lr_scale}"),
            (self.projector_hidden >= 0, f"ett.projector_hidden must be >= 0, got {self.projector_hidden}"),
            (alignment_type == "none", f"alignment.type must be none with ett.enabled, got {alignment_type!r}"),
            (train.ema_decay == 0, f"train.ema_decay must be 0 with ett.enabled (the tokenizer has no average), "
                                   f"got {train.ema_decay}"),
            (world == 1, f"ett.enabled runs in one process (the trained parameters change between stages), "
                         f"got {world} processes"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        accepted = sorted(set(inspect.signature(VQGANLoss).parameters) - {"disc_start", "disc_channels",
                                                                         "disc_layers"})
        if unknown := sorted(set(self.loss) - set(accepted)):
            raise ValueError(f"ett.loss: unknown key(s) {unknown}; accepted: {accepted}")
        if self.loss.get("disc_weight", 0.0) != 0:
            raise ValueError(f"ett.loss.disc_weight must be 0 (no adversarial term under ETT), "
                             f"got {self.loss['disc_weight']}")

    def make_loss(self) -> VQGANLoss:
        return VQGANLoss(**{**self.loss, "disc_weight": 0.0})


class CodebookProjector(nn.Module):
    """Code vectors (..., code_dim) -> decoder input embeddings (..., dim): Linear, GELU, Linear."""

    def __init__(self, code_dim: int, dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, codes):
        return self.net(codes)


@dataclass
class TokenizerPass:
    ids: torch.Tensor  # (B, h, w) the codes the decoder predicts
    codes_BND: torch.Tensor  # value: the code vectors of ids; gradient: to the codebook and (straight-through) encoder
    recon: torch.Tensor  # (B, 3, H, W) the pixel decoder's reconstruction from the same codes
    quant_loss: torch.Tensor  # () codebook + beta * commitment


def tokenizer_pass(vq: VQGAN, images: torch.Tensor) -> TokenizerPass:
    """One encoder pass giving both what the generator reads and what the reconstruction loss sees."""
    h = vq.encoder(images)
    q = vq.quantizer(h)  # eval mode: no usage tracking, no restarts
    z_BND = q.z.flatten(1, 2)
    codes_BND = vq.quantizer.code_vectors(q.ids.flatten(1))
    codes_BND = codes_BND + (z_BND - z_BND.detach())  # straight-through to the encoder, the codes' value kept
    return TokenizerPass(q.ids, codes_BND, vq.decoder(q.z_q), q.loss)


def embedded_loss(model, batch, layout, image_BNC: torch.Tensor) -> torch.Tensor:
    """The next-token loss with the image tokens' input embeddings replaced by `image_BNC` (B, h*w, C)."""
    x = model.tok_emb(batch.tokens)
    s, n = layout.boi_index + 1, layout.num_image_tokens
    x = torch.cat([x[:, :s], image_BNC.to(x.dtype), x[:, s + n:]], 1)
    logits = model(inputs_embeds=x, positions=batch.positions, mask=batch.mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)


class ETTStep(nn.Module):
    """The ETT training forward as one module (decoder, projector, tokenizer, tokenizer loss), so a checkpoint holds
    every trained part. `forward(images, texts, stage2, ...)` -> (loss, AR loss, tokenizer loss or None)."""

    def __init__(self, cfg: ETTConfig, paradigm, layout, model, vq: VQGAN, projector: CodebookProjector,
                 loss_fn: VQGANLoss, projection=None):
        super().__init__()
        self.cfg, self.paradigm, self.layout = cfg, paradigm, layout
        self.model, self.vq, self.projector, self.loss_fn = model, vq, projector, loss_fn
        self.projection = projection  # a text_encoder run's caption projection, trained with the decoder

    def set_stage(self, stage2: bool) -> None:
        """Stage 1: only the projector trains; stage 2: decoder and tokenizer too."""
        self.vq.eval()  # the quantizer's restarts would move codes outside the optimizer
        self.model.requires_grad_(stage2)
        if self.projection is not None:
            self.projection.requires_grad_(stage2)
        self.vq.requires_grad_(stage2)
        self.projector.requires_grad_(True)

    def forward(self, images, texts, stage2: bool, cond_drop_prob: float = 0.0, step: int = 0,
                caption_features=None):
        """`caption_features` (B, L, E): a text_encoder run's, projected into the text embedding for this forward."""
        with torch.set_grad_enabled(stage2 and torch.is_grad_enabled()):
            tp = tokenizer_pass(self.vq, images)
        batch = self.paradigm.build_batch(self.layout, texts, tp.ids, cond_drop_prob)
        prefix = contextlib.nullcontext() if caption_features is None else \
            caption_prefix(self.model, self.projection(caption_features))
        with prefix:
            ar_loss = embedded_loss(self.model, batch, self.layout, self.projector(tp.codes_BND))
        if not stage2:
            return ar_loss, ar_loss, None
        tok_loss, _ = self.loss_fn.generator_loss(images, tp.recon, tp.quant_loss, self.vq.last_layer, step)
        return ar_loss + self.cfg.rec_weight * tok_loss, ar_loss, tok_loss


def ett_param_groups(train, cfg: ETTConfig, vq: VQGAN, projector: CodebookProjector) -> list[dict]:
    """AdamW groups of the projector (x ett.projector_lr_scale) and the tokenizer (x ett.tokenizer_lr_scale), weight
    decay on matrices; each group's `lr_scale` multiplies the step's learning rate."""
    return [group for module, scale in ((projector, cfg.projector_lr_scale), (vq, cfg.tokenizer_lr_scale))
            for group in decay_groups(module.parameters(), train.weight_decay, lr_scale=scale)]


@torch.no_grad()
def fold_projector(model, vq: VQGAN, projector: CodebookProjector, image_offset: int) -> None:
    """Write projector(code k) into the decoder's embedding row of image id k (in place): sampling by ids then feeds
    the decoder what ETT training fed it."""
    codes_KD = vq.quantizer.code_vectors(torch.arange(vq.vocab_size, device=vq.device))
    rows = projector.to(codes_KD.device)(codes_KD)
    model.tok_emb.weight[image_offset: image_offset + vq.vocab_size] = rows.to(model.tok_emb.weight.dtype)
