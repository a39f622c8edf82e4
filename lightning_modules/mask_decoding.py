"""From the [SEG] hidden state to mask logits with SAM's prompt encoder and mask decoder."""

from __future__ import annotations

import torch
from torch import nn


class SegPromptHead(nn.Module):
    """LISA's `text_hidden_fcs`: [SEG] hidden state → MLP → one sparse prompt embedding."""

    def __init__(self, hidden: int, mlp_hidden: int, prompt_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.ReLU(inplace=True), nn.Linear(mlp_hidden, prompt_dim)
        )

    def forward(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(seg_hidden)


def decode_masks(sam, image_embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Low-res mask logits B×1×4h×4w for B images, each with its own single prompt embedding.

    SAM's `MaskDecoder.predict_masks` repeats one image's embedding for many prompts; here every
    image has exactly one prompt, so the same computation runs batched without the repeat.
    """
    decoder = sam.mask_decoder
    b = image_embeddings.shape[0]
    sparse = prompts[:, None, :].to(image_embeddings.dtype)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    image_pe = sam.prompt_encoder.get_dense_pe().to(image_embeddings.dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    _, c2, h2, w2 = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
    return masks[:, :1]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice on one mask (LISA's form: 1 − (2·Σpt + ε) / (Σp + Σt + ε))."""
    p = logits.sigmoid().flatten()
    t = target.flatten()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)
