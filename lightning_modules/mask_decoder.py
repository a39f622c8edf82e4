"""SAM's prompt encoder and mask decoder: one sparse prompt embedding per image → mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.feature_cache import FrozenEncoder


def decode_masks(sam, embeddings: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    """SAM's `MaskDecoder.predict_masks` with one image embedding per prompt (B×C×h×w and B×T×C
    sparse, B×C×h×w or 1×C×1×1 dense), so one call serves the prompts of many images. Returns
    all mask logits B×M×4h×4w and the IoU predictions B×M."""
    decoder = sam.mask_decoder
    image_pe = sam.prompt_encoder.get_dense_pe().to(embeddings.dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse.to(embeddings.dtype)), dim=1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack(
        [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, decoder.iou_prediction_head(hs[:, 0, :])


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice per mask over the last two (pixel) dimensions, LISA's form:
    1 − (2·Σpt + ε) / (Σp + Σt + ε)."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + targets.sum(-1) + eps)


def mask_losses(mask_logits: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch means of the per-sample BCE and Dice losses (each mask at its own image's size)."""
    bce, dice = [], []
    for logit, gt in zip(mask_logits, masks):
        target = gt.to(logit.device).float()
        bce.append(F.binary_cross_entropy_with_logits(logit, target))
        dice.append(dice_loss(logit, target))
    return torch.stack(bce).mean(), torch.stack(dice).mean()


class SamDecoder(nn.Module):
    """SAM with its image encoder frozen (embeddings cached per image by `FrozenEncoder`), its
    prompt encoder frozen and its mask decoder trainable or not (its IoU head always frozen).

    `forward(prompts B×P, images, image_ids)` → mask logits at each image's own size.
    """

    def __init__(self, sam, train_decoder: bool, cache_key: str, cache_dir=None) -> None:
        super().__init__()
        self.sam = sam
        sam.image_encoder.requires_grad_(False)
        sam.prompt_encoder.requires_grad_(False)
        sam.mask_decoder.requires_grad_(bool(train_decoder))
        # one mask per prompt, no quality score: the IoU head takes no part in the loss (and DDP
        # refuses trainable parameters that take none)
        sam.mask_decoder.iou_prediction_head.requires_grad_(False)
        self.img_size = sam.image_encoder.img_size
        self.prompt_dim = sam.prompt_encoder.embed_dim
        self.image_features = FrozenEncoder(
            sam.image_encoder, cache_key, self._preprocess, disk_dir=cache_dir
        )

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """An h×w image's size inside SAM's square input frame (long side = `img_size`)."""
        scale = self.img_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def low_res_size(self, h: int, w: int, low: tuple[int, int]) -> tuple[int, int]:
        """The part of a `low`-sized low-res mask that covers an h×w image."""
        rh, rw = self.resized_size(h, w)
        return max(1, round(rh / self.img_size * low[0])), max(
            1, round(rw / self.img_size * low[1])
        )

    def _preprocess(self, images: list[Tensor]) -> Tensor:
        out = []
        for img in images:
            x = img.to(self.sam.device).permute(2, 0, 1).float()
            nh, nw = self.resized_size(*x.shape[-2:])
            if (nh, nw) != tuple(x.shape[-2:]):
                x = F.interpolate(
                    x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=True
                )[0]
            out.append(self.sam.preprocess(x))
        return torch.stack(out)

    def embeddings(self, images: list[Tensor], image_ids: Tensor) -> Tensor:
        """SAM's image embeddings B×C×h×w (frozen, cached)."""
        return self.image_features(images, image_ids)

    def point_codes(self, xy: Tensor, images: list[Tensor]) -> Tensor:
        """SAM's Fourier point code B×N×P at points `xy` (B×N×2, (x, y) in [0, 1] of each image).

        SAM's point coordinates are relative to its padded square input frame, hence the
        per-image scale.
        """
        scale = [self.resized_size(int(i.shape[0]), int(i.shape[1])) for i in images]
        size = self.img_size
        frame = torch.tensor([[w / size, h / size] for h, w in scale], device=xy.device)
        return self.sam.prompt_encoder.pe_layer._pe_encoding(xy * frame[:, None, :])

    def low_res(self, embeddings: Tensor, prompts: Tensor) -> Tensor:
        """Low-res mask logits B×1×4h×4w, one sparse prompt embedding (B×P) per image."""
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return decode_masks(self.sam, embeddings, prompts[:, None, :], dense)[0][:, :1]

    def forward(self, prompts: Tensor, images: list[Tensor], image_ids: Tensor) -> list[Tensor]:
        low = self.low_res(self.embeddings(images, image_ids), prompts)
        masks = []
        for b, img in enumerate(images):
            h, w = int(img.shape[0]), int(img.shape[1])
            size = self.resized_size(h, w)
            masks.append(self.sam.postprocess_masks(low[b : b + 1], size, (h, w))[0, 0])
        return masks
