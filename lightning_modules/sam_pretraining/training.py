"""`svp train-sam`: train segment-anything's architecture at small size on REFER instance masks.

SAM's promptable objective: random foreground points of an instance → three candidate masks, the
best of them trained with focal (×20) + dice (×1) loss, the IoU head regressed on the actual IoU of
every candidate (MSE). The single-mask output (token 0, used with ``multimask_output=False``, e.g.
by the LISA-style mask decoder) is trained on the same target. The whole model is trained, so the
image embeddings cannot be cached: keep the encoder small.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy import ndimage
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.errors import ConfigError
from common.files import write_json
from common.sam import (
    SamConfig,
    encoder_state_channels,
    encoder_states,
    sam_from_config,
    save_sam,
)
from common.threads import check_threads, use_threads
from datamodules.refer import ReferDataset
from lightning_modules.mask_decoder import decode_masks, dice_loss
from lightning_modules.schedules import warmup_cosine


@dataclass
class TrainSamConfig:
    """What `train_sam` trains on, for how long, and where the checkpoint goes."""

    root: str = "data"
    dataset: str = "synthref"
    split_by: str = "unc"
    train_split: str = "train"
    val_split: str = "val"
    sam: SamConfig = field(default_factory=SamConfig)
    max_steps: int = 1500
    max_minutes: float | None = None
    batch_size: int = 16
    instances_per_image: int = 4
    points_per_instance: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    flip: bool = True
    num_workers: int = 0
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    out: str = "runs/sam/sam_small.pth"
    val_limit: int | None = 500
    # torch CPU threads (null: torch's default); the same seed gives the same SAM at the same count
    threads: int | None = None
    # Semantic pre-training of the encoder (off when empty): the encoder state at `semantic_layer`
    # (0 = patch embedding, 1..depth = blocks, -1 = neck) is mask-pooled over each training
    # instance, as the `semantic` projector pools a superpixel, and a linear head per key
    # classifies it (cross-entropy, × `semantic_weight`). Keys: `category` (COCO category_id) or an
    # annotation attribute (SynthRef: shape, color, size, texture). The heads are not saved: they
    # only shape the encoder, which a small SAM trained from scratch would otherwise leave blind
    # to what the objects are.
    semantic_labels: list[str] = field(default_factory=list)
    semantic_layer: int = -1
    semantic_weight: float = 1.0


def check_config(cfg: TrainSamConfig) -> None:
    """Raise a ConfigError naming the `train_sam.*` key of the first invalid value."""
    positive = (
        "max_steps",
        "batch_size",
        "instances_per_image",
        "points_per_instance",
        "lr",
        "devices",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"train_sam.{key}={getattr(cfg, key)} must be positive")
    for key in ("weight_decay", "warmup_steps", "num_workers"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"train_sam.{key}={getattr(cfg, key)} must not be negative")
    check_threads(cfg.threads, "train_sam.threads")
    if cfg.semantic_weight < 0:
        raise ConfigError(f"train_sam.semantic_weight={cfg.semantic_weight} must not be negative")
    if len(set(cfg.semantic_labels)) != len(cfg.semantic_labels):
        raise ConfigError(f"train_sam.semantic_labels={list(cfg.semantic_labels)} repeats a key")
    for key in ("max_minutes", "val_limit"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ConfigError(
                f"train_sam.{key}={getattr(cfg, key)} must be positive or null (no limit)"
            )
    if not str(cfg.out).endswith(".pth"):
        raise ConfigError(
            f"train_sam.out={cfg.out!r} must end in .pth (its .json sidecar goes beside it)"
        )


def label_vocabulary(refer: ReferDataset, keys: list[str]) -> dict[str, list]:
    """Per label key, its sorted values over every instance of the split's images (value i is
    class i of the key's head)."""
    values: dict[str, set] = {key: set() for key in keys}
    for image_id in refer.image_ids:
        for key in keys:
            values[key].update(refer.instance_labels(image_id, key))
    return {key: sorted(v, key=str) for key, v in values.items()}


UNKNOWN_CLASS = -100  # a value the training split never has: ignored by the loss and accuracy


def instance_classes(refer: ReferDataset, image_id: int, vocab: dict[str, list]) -> torch.Tensor:
    """L×N int64: per key of `vocab`, the class (index in the key's values) of every instance of
    the image, in `instance_ann_ids` order; `UNKNOWN_CLASS` for a value not in the vocabulary."""
    rows = []
    for key, values in vocab.items():
        index = {v: j for j, v in enumerate(values)}
        rows.append([index.get(v, UNKNOWN_CLASS) for v in refer.instance_labels(image_id, key)])
    return torch.tensor(rows, dtype=torch.long).view(len(vocab), -1)


class SamInstanceDataset(Dataset):
    """Images of a split, each with up to ``instances`` of its non-empty instance masks, at random.

    Items: ``image`` 3×h×w uint8 (resized so the long side is ``img_size``, unpadded),
    ``masks`` K×h×w float and, with a `vocab` (`label_vocabulary`), ``labels`` L×K int64: the
    class of each of those instances under each label key (`instance_classes`).
    """

    def __init__(
        self,
        refer: ReferDataset,
        img_size: int,
        instances: int,
        flip: bool,
        vocab: dict[str, list] | None = None,
    ) -> None:
        self.refer, self.instances, self.flip = refer, instances, flip
        self.vocab = vocab or {}
        self.image_ids = list(refer.image_ids)
        self.transform = ResizeLongestSide(img_size)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.image_ids[index]
        image = self.transform.apply_image(self.refer.load_image(image_id))
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        masks = torch.from_numpy(self.refer.instance_masks(image_id)).bool()
        present = masks.flatten(1).any(1).nonzero()[:, 0]
        chosen = present[torch.randperm(len(present))[: self.instances]]
        masks = masks[chosen].float()
        labels = (
            instance_classes(self.refer, image_id, self.vocab)[:, chosen] if self.vocab else None
        )
        if masks.shape[0] and masks.shape[-2:] != image.shape[-2:]:
            masks = F.interpolate(masks[None], image.shape[-2:], mode="nearest")[0]
            present = masks.flatten(1).any(1)
            masks = masks[present]
            labels = labels[:, present] if labels is not None else None
        item = {"image": image, "masks": masks}
        if self.vocab:
            item["labels"] = labels
        if self.flip:
            dims = [d for d, p in zip((-1, -2), torch.rand(2)) if p < 0.5]
            if dims:
                item["image"], item["masks"] = image.flip(dims), masks.flip(dims)
        return item


def collate_instances(items: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Keep per-image lists: images may differ in size and in instance count."""
    return {key: [item[key] for item in items] for key in items[0]}


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha=0.25, gamma=2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask, averaged over the last two (pixel) dimensions."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def mask_iou(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks over the last two dimensions; an empty union counts 1.0."""
    preds, targets = preds.flatten(-2).bool(), targets.flatten(-2).bool()
    inter = (preds & targets).sum(-1).float()
    union = (preds | targets).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def farthest_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from its boundary (the image border counts as one)."""
    dist = ndimage.distance_transform_edt(np.pad(mask.astype(bool), 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


class SamTrainingModule(pl.LightningModule):
    """SAM (image encoder, prompt encoder, mask decoder) under SAM's promptable loss."""

    def __init__(self, cfg: TrainSamConfig, vocab: dict[str, list] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.sam = sam_from_config(cfg.sam)
        self.sam.train()
        # semantic pre-training: one linear classifier per label key on the chosen encoder state
        self.vocab = vocab or {}
        channels = encoder_state_channels(
            self.sam.image_encoder, cfg.semantic_layer, "train_sam.semantic_layer"
        )
        self.semantic_heads = nn.ModuleDict(
            {key: nn.Linear(channels, len(values)) for key, values in self.vocab.items()}
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image embeddings (the neck) and, with semantic heads, the state they read."""
        if not self.vocab:
            return self.sam.image_encoder(images), None
        return encoder_states(self.sam.image_encoder, images, self.cfg.semantic_layer)

    def semantic_terms(
        self, state: torch.Tensor, masks: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Mean cross-entropy of the heads on the instances' mask-pooled states (as the
        `semantic` projector pools a superpixel), and per key (right, counted) top-1 hits."""
        size = self.sam.image_encoder.img_size
        grid = state.shape[-2:]
        counts = torch.tensor([len(m) for m in masks], device=state.device)
        if not int(counts.sum()):
            zero = state.sum() * 0
            return zero, {key: (zero.long(), zero.long()) for key in self.vocab}
        cover = torch.cat([F.pad(m, (0, size - m.shape[-1], 0, size - m.shape[-2])) for m in masks])
        weights = F.adaptive_avg_pool2d(cover[:, None], grid).flatten(1)  # N×cells
        feats = state.flatten(2).repeat_interleave(counts, dim=0)  # N×C×cells
        pooled = (feats @ weights[..., None])[..., 0] / weights.sum(-1, keepdim=True).clamp(1e-9)
        classes = torch.cat(labels, dim=1)
        losses, accuracy = [], {}
        for i, (key, head) in enumerate(self.semantic_heads.items()):
            logits, known = head(pooled), classes[i] != UNKNOWN_CLASS
            if known.any():
                losses.append(F.cross_entropy(logits, classes[i], ignore_index=UNKNOWN_CLASS))
            right = ((logits.detach().argmax(-1) == classes[i]) & known).sum()
            accuracy[key] = (right, known.sum())
        if not losses:
            return state.sum() * 0, accuracy
        return torch.stack(losses).mean(), accuracy

    def sample_points(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """1..``points_per_instance`` uniform foreground points (x, y) per mask, labels 1."""
        n = int(torch.randint(1, self.cfg.points_per_instance + 1, ()))
        width = masks.shape[-1]
        idx = torch.multinomial(masks.flatten(1), n, replacement=True)
        points = torch.stack([idx % width, idx // width], dim=-1).float()
        return points, torch.ones(idx.shape, dtype=torch.int, device=masks.device)

    def losses(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        sam, size = self.sam, self.sam.image_encoder.img_size
        images = torch.stack([sam.preprocess(im.float()) for im in batch["image"]])
        embeddings, state = self.encode(images)
        semantic: dict[str, torch.Tensor] = {}
        if state is not None:
            semantic_loss, accuracy = self.semantic_terms(state, batch["masks"], batch["labels"])
            semantic = {
                "semantic": semantic_loss,
                **{f"acc_{k}": r / c.clamp(min=1) for k, (r, c) in accuracy.items()},
            }
        extra = self.cfg.semantic_weight * semantic["semantic"] if semantic else 0.0
        counts = torch.tensor([len(m) for m in batch["masks"]], device=embeddings.device)
        targets = torch.cat(
            [F.pad(m, (0, size - m.shape[-1], 0, size - m.shape[-2])) for m in batch["masks"]]
        )
        if not len(targets):
            zero = embeddings.sum() * 0
            return {"loss": zero + extra, "mask": zero, "iou": zero, "best_iou": zero, **semantic}
        points, labels = self.sample_points(targets)
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        low_res, iou_pred = decode_masks(
            sam, embeddings.repeat_interleave(counts, dim=0), sparse, dense
        )
        logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        targets = targets[:, None].expand_as(logits)
        per_mask = self.cfg.focal_weight * focal_loss(logits, targets)
        per_mask = per_mask + self.cfg.dice_weight * dice_loss(logits, targets)
        mask_loss = per_mask[:, 1:].min(1).values.mean() + per_mask[:, 0].mean()
        with torch.no_grad():
            actual = mask_iou(logits > sam.mask_threshold, targets)
        iou_loss = F.mse_loss(iou_pred, actual)
        return {
            "loss": mask_loss + self.cfg.iou_weight * iou_loss + extra,
            "mask": mask_loss,
            "iou": iou_loss,
            "best_iou": actual[:, 1:].max(1).values.mean(),
            **semantic,
        }

    def training_step(self, batch: dict[str, list[torch.Tensor]], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        n = len(batch["image"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/mask_loss", out["mask"], batch_size=n)
        self.log("train/iou_loss", out["iou"], batch_size=n)
        self.log("train/best_iou", out["best_iou"], prog_bar=True, batch_size=n)
        for key in ("semantic", *(f"acc_{k}" for k in self.vocab)):
            if key in out:
                self.log(f"train/{key}", out[key], batch_size=n)
        return out["loss"]

    def configure_optimizers(self):
        cfg = self.cfg
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )

        schedule = warmup_cosine(cfg.warmup_steps, cfg.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def predict_single_point(
    sam: Sam, image: np.ndarray, points: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (N×3×H×W bool, image size) and IoU predictions (N×3) for N single-point prompts.

    Same transforms as `segment_anything.SamPredictor` (resize the long side, normalise, pad).
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    size = image.shape[:2]
    x = torch.as_tensor(transform.apply_image(image), device=sam.device).permute(2, 0, 1)
    input_size = tuple(x.shape[-2:])
    embedding = sam.image_encoder(sam.preprocess(x.float())[None])
    coords = torch.as_tensor(transform.apply_coords(points, size), device=sam.device).float()
    labels = torch.ones(len(points), 1, dtype=torch.int, device=sam.device)
    sparse, dense = sam.prompt_encoder(points=(coords[:, None], labels), boxes=None, masks=None)
    low_res, iou_pred = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    masks = sam.postprocess_masks(low_res, input_size, size) > sam.mask_threshold
    return masks, iou_pred


def evaluate_single_point(
    sam: Sam, refer: ReferDataset, limit: int | None = None, progress: bool = False
) -> dict[str, float]:
    """Single-point mIoU over every non-empty instance of the first ``limit`` images.

    The point is the instance pixel farthest from its boundary; of the three multimask outputs
    the one with the highest predicted IoU counts (``miou``); ``miou_oracle`` takes the best.
    """
    was_training = sam.training
    sam.eval()
    ious, oracle = [], []
    image_ids = list(refer.image_ids)[:limit]
    for image_id in tqdm(image_ids, desc="eval", disable=not progress, leave=False):
        gt = refer.instance_masks(image_id)
        gt = gt[gt.reshape(len(gt), -1).any(1)]
        if not len(gt):
            continue
        points = np.array([farthest_point(m) for m in gt], dtype=float)
        masks, iou_pred = predict_single_point(sam, refer.load_image(image_id), points)
        target = torch.as_tensor(gt, device=masks.device)[:, None]
        iou = mask_iou(masks, target.expand_as(masks))
        ious.append(iou.gather(1, iou_pred.argmax(1, keepdim=True))[:, 0].cpu())
        oracle.append(iou.max(1).values.cpu())
    sam.train(was_training)
    if not ious:
        raise ConfigError(
            f"{refer.dataset} split {refer.split!r} under {refer.root} has no non-empty "
            "instance masks to evaluate on; pick another val_split"
        )
    ious, oracle = torch.cat(ious), torch.cat(oracle)
    return {
        "miou": float(ious.mean()),
        "miou_oracle": float(oracle.mean()),
        "instances": int(len(ious)),
        "images": len(image_ids),
    }


@torch.no_grad()
def evaluate_semantic(
    module: SamTrainingModule, refer: ReferDataset, limit: int | None = None
) -> dict[str, float]:
    """Per label key, the semantic head's top-1 accuracy over every instance of the first `limit`
    images (values the training split never has are left out)."""
    was_training = module.training
    module.eval()
    data = SamInstanceDataset(
        refer, module.sam.image_encoder.img_size, 10**6, flip=False, vocab=module.vocab
    )
    right = dict.fromkeys(module.vocab, 0)
    counted = dict.fromkeys(module.vocab, 0)
    for index in range(len(data.image_ids[:limit])):
        item = data[index]
        image = module.sam.preprocess(item["image"].float().to(module.device))[None]
        _, state = module.encode(image)
        masks, labels = [item["masks"].to(module.device)], [item["labels"].to(module.device)]
        _, accuracy = module.semantic_terms(state, masks, labels)
        for key, (r, c) in accuracy.items():
            right[key] += int(r)
            counted[key] += int(c)
    module.train(was_training)
    return {key: right[key] / max(1, counted[key]) for key in module.vocab}


def train_sam(cfg: TrainSamConfig, progress: bool = True) -> dict[str, Any]:
    """Train, save ``cfg.out`` (+ sidecar json, + ``metrics.json``) and evaluate single-point mIoU.

    Returns ``{"miou", "miou_oracle", "minutes", "train_minutes", "steps", "checkpoint"}``
    (on rank 0; other ranks of a multi-device run return ``{}``).
    """
    check_config(cfg)
    threads = use_threads(cfg.threads, "train_sam.threads")
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train = ReferDataset(cfg.root, cfg.dataset, cfg.split_by, cfg.train_split)
    val = ReferDataset(cfg.root, cfg.dataset, cfg.split_by, cfg.val_split)
    vocab = label_vocabulary(train, list(cfg.semantic_labels)) if cfg.semantic_labels else None
    module = SamTrainingModule(cfg, vocab)
    data = SamInstanceDataset(
        train,
        module.sam.image_encoder.img_size,
        cfg.instances_per_image,
        cfg.flip,
        vocab,
    )
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=collate_instances,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    out = Path(cfg.out)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
        logger=pl.loggers.TensorBoardLogger(out.parent, name="tb", default_hp_metric=False),
        log_every_n_steps=max(1, min(10, len(loader))),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    train_minutes = (time.perf_counter() - start) / 60
    if not trainer.is_global_zero:
        return {}
    sam = module.sam.eval()
    save_sam(sam, replace(cfg.sam, checkpoint=None), out)
    metrics = evaluate_single_point(sam, val, cfg.val_limit, progress)
    if vocab:
        metrics["semantic_accuracy"] = evaluate_semantic(module, val, cfg.val_limit)
        metrics["semantic_classes"] = {key: len(values) for key, values in vocab.items()}
    result = {
        **metrics,
        "minutes": (time.perf_counter() - start) / 60,
        "train_minutes": train_minutes,
        "steps": int(trainer.global_step),
        "checkpoint": str(out),
        "threads": threads,
    }
    write_json(out.parent / "metrics.json", {**result, "config": asdict(cfg)})
    return result
