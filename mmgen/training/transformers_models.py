"""Fine-tuning the image generation of public AR checkpoints saved in the transformers layout: Janus / Janus-Pro
(Chen et al. 2025, "Janus-Pro: Unified Multimodal Understanding and Generation with Data and Model Scaling";
Wu et al. 2024, "Janus: Decoupling Visual Encoding ...").

`load_finetune(paradigm, directory)` checks the directory (model type, processor files) and returns the family's
trainer: an `nn.Module` whose forward is the training loss, holding the model with everything frozen except the
generation path. `scripts/train_generator.py` runs it in the one training loop (`mmgen.training.loop.Run`).

Janus generates an image as `<prompt><begin_of_image>` then the VQ codes, each code fed back through the
generation embeddings + aligner and predicted by the generation head from the language model's hidden state
(transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`). Training is that sequence
teacher-forced: the language model, generation embeddings, aligner and head learn; the understanding path
(SigLIP encoder + aligner), the text head (unless tied to the input embeddings) and the VQ-VAE stay frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.atomic import atomic_dir
from tokenizers_vis.protocol import JanusVQTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class JanusTrainer(torch.nn.Module):
    """A `JanusForConditionalGeneration` and its `JanusProcessor`, frozen but for the image generation path;
    `forward(input_ids, attention_mask, codes)` is the teacher-forced cross-entropy on the image codes."""

    TRAINED = ("language_model", "generation_embeddings", "generation_aligner", "generation_head")

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        # FSDP units (`mmgen.training.memory.shard_classes`): the language model's decoder layers, not the
        # vision encoder layers the whole model names (frozen and unused by image generation)
        self._no_split_modules = list(model.model.language_model._no_split_modules)
        model.requires_grad_(False).eval()
        for name in self.TRAINED:  # a tied text head trains with the input embeddings
            getattr(model.model, name).requires_grad_(True).train()
        ip = processor.image_processor
        # the pixels the generation path sees: the processor's normalization (its postprocess inverts it)
        self.vq = JanusVQTokenizer(model.model.vqmodel, ip.image_mean, ip.image_std)
        gen, tok = model.generation_config, processor.tokenizer
        # the unconditional row as `generate` builds it: every prompt token but BOS / begin-of-image -> pad
        self.bos = gen.bos_token_id if gen.bos_token_id is not None else tok.bos_token_id
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id
        self.boi = (gen.generation_kwargs or {}).get("boi_token_id", tok.convert_tokens_to_ids(tok.boi_token))
        if None in (self.bos, self.pad, self.boi):
            raise ValueError(f"the Janus checkpoint names no bos/pad/begin-of-image token ids (bos={self.bos}, "
                             f"pad={self.pad}, boi={self.boi}): set them in generation_config.json")

    @property
    def image_size(self) -> int:
        return self.vq.image_size

    def trained_modules(self) -> dict:
        """What a checkpoint holds: the trained submodules, by name (the frozen rest is reloaded from init_from)."""
        return {name: getattr(self.model.model, name) for name in self.TRAINED}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> the frozen VQ-VAE's codes (B, h*w)."""
        return self.vq.encode_tokens(images).flatten(1)

    def conditions(self, dataset) -> list[list[int]]:
        """Each image's prompt ids: its caption, prompted as `prompts` does."""
        captions = list(dataset.captions) if hasattr(dataset, "captions") else [d["caption"] for d in dataset]
        return self.prompts(captions)

    def prompts(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption as Janus is prompted for an image: the chat template (when the processor has
        one) with the assistant turn opened, then the processor in generation_mode="image" (appends
        begin-of-image)."""
        proc = self.processor
        if proc.chat_template is not None:
            captions = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": c}]}],
                                                 add_generation_prompt=True) for c in captions]
        ids = proc(text=captions, generation_mode="image", return_tensors=None)["input_ids"]
        if any(row[-1] != self.boi for row in ids):
            raise ValueError(f"the processor's prompts do not end with the begin-of-image token id {self.boi}")
        return ids

    def batch(self, prompts: list[list[int]], codes: torch.Tensor, drop: torch.Tensor) -> dict:
        """Prompts left-padded to the longest (as the processor pads), rows with `drop` set made unconditional."""
        P = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), P), self.pad, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, P - len(p):] = torch.tensor(p)
            attention_mask[i, P - len(p):] = 1
        keep = (input_ids == self.bos) | (input_ids == self.boi)
        input_ids = torch.where(drop[:, None] & ~keep, self.pad, input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "codes": codes}

    def logits(self, input_ids, attention_mask, codes) -> torch.Tensor:
        """Generation-head logits (B, N, V) for codes (B, N): position P - 1 (begin-of-image) predicts code 0."""
        m = self.model
        P = input_ids.shape[1]
        x_BLD = torch.cat([m.get_input_embeddings()(input_ids),
                           m.prepare_embeddings_for_image_generation(codes[:, :-1])], 1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(codes.shape[0], codes.shape[1] - 1)], 1)
        # positions as generate gives them (0.. over the padding too): RoPE sees only relative positions, so a
        # left-padded row computes as it does alone (the tests check it)
        h_BLD = m.model.language_model(inputs_embeds=x_BLD, attention_mask=mask).last_hidden_state
        return m.model.generation_head(h_BLD[:, P - 1:])

    def forward(self, input_ids, attention_mask, codes) -> torch.Tensor:
        logits_BNV = self.logits(input_ids, attention_mask, codes)
        return F.cross_entropy(logits_BNV.float().flatten(0, 1), codes.flatten())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Model (safetensors) and processor in the transformers layout, written atomically."""
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
        return Path(directory)


FINETUNE = {"janus": ("JanusForConditionalGeneration", "JanusProcessor", JanusTrainer)}


def load_finetune(paradigm: str, directory: str | Path):
    """The trainer of a transformers checkpoint directory (model + processor, as `save_pretrained` writes them),
    in float32 on the CPU; `paradigm` names the model type the directory must hold."""
    import transformers

    from mmgen.pipelines.transformers_models import transformers_model_type

    if paradigm not in FINETUNE:
        raise ValueError(f"paradigm {paradigm!r} fine-tunes no transformers model; supported model types: "
                         f"{', '.join(FINETUNE)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"init_from {str(directory)!r} is not a directory")
    model_type = transformers_model_type(directory)
    if model_type is None:
        raise FileNotFoundError(f"init_from {str(directory)!r} is not a transformers checkpoint (no config.json)")
    if model_type != paradigm:
        raise ValueError(f"init_from {str(directory)!r} holds a transformers model of type {model_type!r}; paradigm "
                         f"{paradigm!r} fine-tunes model type {paradigm!r} (supported model types: "
                         f"{', '.join(FINETUNE)})")
    missing = [group for group in (TOKENIZER_FILES, PROCESSOR_FILES)
               if not any((directory / f).is_file() for f in group)]
    if missing:
        raise FileNotFoundError(f"init_from {str(directory)!r} lacks its processor files (one of "
                                f"{' and one of '.join('/'.join(g) for g in missing)}): save the processor beside "
                                f"the model ({FINETUNE[paradigm][1]}.save_pretrained)")
    model_cls, processor_cls, trainer_cls = FINETUNE[paradigm]
    model = getattr(transformers, model_cls).from_pretrained(directory, dtype=torch.float32)
    processor = getattr(transformers, processor_cls).from_pretrained(directory)
    return trainer_cls(model, processor)
