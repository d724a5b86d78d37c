"""Tiny random Hugging Face PaliGemma checkpoints (transformers + torch, CPU) for the VLM tests."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch
import transformers

VOCAB = 300
IMAGE_TOKEN = VOCAB - 1  # PaliGemma's <image> placeholder id (never a prompt token here)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB)

# name -> (vision_config, text_config) overrides of the tiny base configs.
CONFIGS = {
    # PaliGemma (Gemma 1) with grouped-query attention (4 query heads, 2 kv heads); SigLIP with
    # its pooling head, whose tensors the converter must skip.
    "gqa": (dict(image_size=16, patch_size=4),
            dict(model_type="gemma", num_hidden_layers=2, num_key_value_heads=2, head_dim=8)),
    # Another image and patch size (24 / 8: 9 image tokens), multi-query attention, head_dim
    # unrelated to width / heads.
    "patch": (dict(image_size=24, patch_size=8, vision_use_head=False),
              dict(model_type="gemma", num_hidden_layers=2, num_key_value_heads=1,
                   head_dim=12)),
    # PaliGemma 2 (Gemma 2): soft-capping (small caps, so they matter), query_pre_attn_scalar,
    # alternating sliding-window (6) and full attention, pre/post feed-forward norms.
    "pg2": (dict(image_size=16, patch_size=4, vision_use_head=False),
            dict(model_type="gemma2", num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                 query_pre_attn_scalar=12, sliding_window=6, attn_logit_softcapping=3.0,
                 final_logit_softcapping=8.0)),
    # Plain multi-head attention with q/k/v/o biases and an untied output head.
    "untied": (dict(image_size=16, patch_size=8, vision_use_head=False),
               dict(model_type="gemma", num_hidden_layers=1, num_key_value_heads=4, head_dim=8,
                    attention_bias=True, tie_word_embeddings=False)),
}


@dataclasses.dataclass
class HFCheckpoint:
    """A saved tiny checkpoint and the PyTorch reference model it holds."""

    name: str
    path: pathlib.Path
    model: transformers.PaliGemmaForConditionalGeneration
    config: transformers.PaliGemmaConfig


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replaces every weight by random values of a size that keeps activations O(1).

    HF's init leaves RMSNorm weights at zero and biases at zero, which would hide mistakes in
    how they are applied; random ones make every tensor matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.3
            if "patch_embedding" in name:
                scale = (p[0].numel()) ** -0.5
            if "embed_tokens" in name:
                scale = 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def make_checkpoint(name: str, root: pathlib.Path, seed: int = 0, vocab: int = VOCAB
                    ) -> HFCheckpoint:
    """A tiny random `PaliGemmaForConditionalGeneration` of CONFIGS[name] with `vocab` ids (the
    last one the <image> placeholder), saved under root."""
    vision, text = CONFIGS[name]
    config = transformers.PaliGemmaConfig(
        vision_config={**_VISION, **vision}, text_config={**_TEXT, **text, "vocab_size": vocab},
        image_token_index=vocab - 1, vocab_size=vocab, projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"], tie_word_embeddings=text.get("tie_word_embeddings", True))
    config._attn_implementation = "eager"  # the plain reference computation
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    _randomize(model, seed)
    path = root / name
    model.save_pretrained(path)
    return HFCheckpoint(name, path, model, config)


def num_image_tokens(ckpt: HFCheckpoint) -> int:
    """N, the image tokens of the checkpoint's vision tower."""
    vision = ckpt.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def inputs(ckpt: HFCheckpoint, batch: int, length: int, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """A random image (B, H, W, 3) float32 (channels last) and text ids (B, length) int32."""
    rng = np.random.default_rng(seed)
    size = ckpt.config.vision_config.image_size
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    return image, rng.integers(3, IMAGE_TOKEN, (batch, length)).astype(np.int32)


def hf_inputs(ckpt: HFCheckpoint, image: np.ndarray, tokens: np.ndarray,
              prefix_len: int | None) -> dict[str, torch.Tensor]:
    """HF forward kwargs: <image> placeholders + tokens, NCHW pixels, token_type_ids marking the
    image and first `prefix_len` tokens as the prefix (None: no token_type_ids, all causal)."""
    b, length = tokens.shape
    n = num_image_tokens(ckpt)
    ids = np.concatenate([np.full((b, n), IMAGE_TOKEN, np.int64), tokens], axis=1)
    kwargs = dict(input_ids=torch.tensor(ids),
                  pixel_values=torch.tensor(image.transpose(0, 3, 1, 2).copy()))
    if prefix_len is not None:
        types = (np.arange(n + length) >= n + prefix_len).astype(np.int64)
        kwargs["token_type_ids"] = torch.tensor(np.broadcast_to(types, ids.shape).copy())
    return kwargs


def hf_logits(ckpt: HFCheckpoint, image: np.ndarray, tokens: np.ndarray,
              prefix_len: int | None) -> np.ndarray:
    """The reference logits (B, N + L, V) float32."""
    with torch.no_grad():
        return ckpt.model(**hf_inputs(ckpt, image, tokens, prefix_len)).logits.numpy()


def hf_greedy(ckpt: HFCheckpoint, image: np.ndarray, prompt: np.ndarray,
              max_new_tokens: int) -> np.ndarray:
    """HF greedy generation after image + prompt: the new tokens (B, <= max_new_tokens)."""
    kwargs = hf_inputs(ckpt, image, prompt, prompt.shape[1])
    with torch.no_grad():
        out = ckpt.model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=0)
    return out[:, kwargs["input_ids"].shape[1]:].numpy()
