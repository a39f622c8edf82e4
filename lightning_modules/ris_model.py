"""`RISModel`: vision tower → projector → LLM ([SEG]) → SAM mask decoder, as a LightningModule."""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from datamodules.errors import ConfigError
from lightning_modules.grounding import (
    GROUNDING_KEYS,
    GROUNDING_LOSSES,
    POINTER_EVAL,
    RERANK_QUERIES,
    RERANK_SOURCES,
    TEACHER_POINTERS,
    GroundingHead,
    cell_iou,
    grid_targets,
    grounding_loss,
    mask_geometry,
    mask_geometry_dim,
    mask_votes,
    picked_hits,
    pool_cells,
    pool_in_masks,
    rerank_loss,
    sample_targets,
    smoothed_scores,
    spread_top,
    target_distribution,
    token_centroids,
    word_query,
    word_states,
)
from lightning_modules.mask_decoding import SegPromptHead, decode_masks, dice_loss
from lightning_modules.metrics import CIoU, GIoU, token_stats

# Frozen-feature memory shared by every model in the process (sweeps run many trials in one
# process): (tower hash, image id) -> features on CPU.
_FEATURE_MEMORY: dict[tuple[str, int], torch.Tensor] = {}


class FrozenEncoder(nn.Module):
    """Runs a frozen image encoder once per image id and remembers the result.

    Two levels: a process-wide memory (sweeps run many trials in one process) and, when `disk_dir`
    is set, float16 `.npy` files keyed by the encoder's config hash, shared by every process and
    machine that sees the folder. With the disk cache on, fresh features are rounded to float16 too,
    so a run gives the same numbers whether its features were cached or not.
    """

    def __init__(
        self, encoder: nn.Module, key: str, preprocess, memory: bool = True, disk_dir=None
    ):
        super().__init__()
        self.encoder = encoder
        self.key = key
        self.preprocess = preprocess
        self.memory = memory
        self.disk_dir = Path(disk_dir) / key if disk_dir else None

    def _load(self, name: str) -> torch.Tensor | None:
        if (self.key, name) in _FEATURE_MEMORY:
            return _FEATURE_MEMORY[(self.key, name)]
        if self.disk_dir is not None:
            path = self.disk_dir / f"{name}.npy"
            if path.is_file():
                feat = torch.from_numpy(np.load(path).astype(np.float32))
                if self.memory:
                    _FEATURE_MEMORY[(self.key, name)] = feat
                return feat
        return None

    def _store(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        if self.disk_dir is not None:
            feat = feat.half().float()
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            path = self.disk_dir / f"{name}.npy"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, feat.detach().cpu().numpy().astype(np.float16))
            os.replace(tmp, path)
        if self.memory:
            _FEATURE_MEMORY[(self.key, name)] = feat.detach().to("cpu")
        return feat

    @staticmethod
    def entry_name(image_id: int, view: int = 0) -> str:
        """Cache entry of an image seen through a flip `view` (`datamodules.augment`)."""
        return str(int(image_id)) if not view else f"{int(image_id)}-view{int(view)}"

    @torch.no_grad()
    def forward(
        self, images: list[torch.Tensor], image_ids: torch.Tensor, views: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features of `images`; `views` (flips, default none) key the cache with the id."""
        views_ = [0] * len(image_ids) if views is None else [int(v) for v in views]
        names = [self.entry_name(i, v) for i, v in zip(image_ids, views_)]
        device = self._device()
        found = {j: self._load(n) for j, n in enumerate(names)}
        missing = [j for j, f in found.items() if f is None]
        if missing:
            out = self.encoder(self.preprocess([images[j] for j in missing]))
            for j, feat in zip(missing, out):
                found[j] = self._store(names[j], feat)
        return torch.stack([found[j].to(device) for j in range(len(names))])

    def _device(self) -> torch.device:
        for p in self.encoder.parameters():
            return p.device
        for b in self.encoder.buffers():
            return b.device
        return torch.device("cpu")


class RISModel(pl.LightningModule):
    """LISA-style referring segmentation with a swappable visual projector."""

    def __init__(self, cfg: DictConfig | dict, tokenizer=None):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        from lightning_modules.llm import build_llm, image_token_id, seg_token_id
        from lightning_modules.projectors import build_projector
        from lightning_modules.sam_builder import load_sam
        from lightning_modules.vision_tower import build_vision_tower

        if tokenizer is None:
            from lightning_modules.tokenizer_setup import tokenizer_for

            tokenizer = tokenizer_for(cfg)
        self.tokenizer = tokenizer
        self.seg_id = seg_token_id(tokenizer)
        self.image_id = image_token_id(tokenizer)

        self.sam = load_sam(cfg.mask_decoder.checkpoint, cfg.mask_decoder.model_type)
        for p in self.sam.image_encoder.parameters():
            p.requires_grad_(False)
        for p in self.sam.prompt_encoder.parameters():
            p.requires_grad_(False)
        for p in self.sam.mask_decoder.parameters():
            p.requires_grad_(bool(cfg.mask_decoder.train_decoder))

        self.tower = build_vision_tower(OmegaConf.to_object(cfg.vision))
        self.llm = build_llm(OmegaConf.to_object(cfg.llm), tokenizer)
        hidden = self.llm.get_input_embeddings().embedding_dim
        self.projector = build_projector(cfg.projector, self.tower.out_channels, hidden)
        prompt_dim = self.sam.prompt_encoder.embed_dim
        self.seg_head = SegPromptHead(hidden, cfg.mask_decoder.seg_mlp_hidden, prompt_dim)
        self.grounding = None
        g = cfg.grounding
        for key, allowed in (
            ("keys_from", GROUNDING_KEYS),
            ("pointer_eval", POINTER_EVAL),
            ("loss", GROUNDING_LOSSES),
            ("teacher_pointer", TEACHER_POINTERS),
            ("rerank_query", RERANK_QUERIES),
            ("rerank_from", RERANK_SOURCES),
        ):
            if g[key] not in allowed:
                raise ConfigError(
                    f"grounding.{key} must be one of {', '.join(allowed)}, got {g[key]!r}."
                )
        if g.pointer_vote < 0:
            raise ConfigError(
                "grounding.pointer_vote is a number of candidate tokens and must be ≥ 0 "
                f"(0 = off); got {g.pointer_vote}."
            )
        if g.rerank < 0 or (g.rerank > 0 and not g.pointer):
            raise ConfigError(
                "grounding.rerank is a number of candidate tokens (0 = off), ≥ 0, and needs "
                f"grounding.pointer=true to decode their masks; got rerank={g.rerank}, "
                f"pointer={g.pointer}."
            )
        if g.rerank_shape < 0:
            raise ConfigError(
                "grounding.rerank_shape is the side of the candidate masks' shape code and must "
                f"be ≥ 0 (0 = off); got {g.rerank_shape}."
            )
        if g.rerank_context < 0 or (g.rerank_context > 0 and g.dim % g.fusion_heads):
            raise ConfigError(
                "grounding.rerank_context is a number of encoder layers (0 = off), ≥ 0, and "
                "grounding.fusion_heads must divide the re-ranker's width grounding.dim; got "
                f"rerank_context={g.rerank_context}, dim={g.dim}, "
                f"fusion_heads={g.fusion_heads}."
            )
        if not g.rerank_spread >= 0:
            raise ConfigError(
                "grounding.rerank_spread is a distance (a fraction of the feature grid's side) "
                f"and must be ≥ 0 (0 = the plain top tokens); got {g.rerank_spread}."
            )
        if not g.pointer_smooth >= 0:
            raise ConfigError(
                "grounding.pointer_smooth is a width (a fraction of the feature grid's side) and "
                f"must be ≥ 0 (0 = point at the top-scored token); got {g.pointer_smooth}."
            )
        if g.fusion_layers < 0 or g.fusion_heads < 1 or hidden % g.fusion_heads:
            raise ConfigError(
                f"grounding.fusion_layers must be ≥ 0 and grounding.fusion_heads must divide the "
                f"LLM width {hidden}; got fusion_layers={g.fusion_layers}, "
                f"fusion_heads={g.fusion_heads}."
            )
        if g.weight > 0 or g.pointer:
            if self.projector.has_regions:
                self.grounding = GroundingHead(
                    hidden,
                    g.dim,
                    prompt_dim,
                    bool(g.pointer),
                    fusion_layers=int(g.fusion_layers),
                    fusion_heads=int(g.fusion_heads),
                    key_geometry=bool(g.key_geometry),
                    rerank=g.rerank > 0,
                    rerank_in=self.tower.out_channels if g.rerank_from == "features" else None,
                    rerank_vote=bool(g.rerank_vote),
                    rerank_geometry=mask_geometry_dim(g.rerank_shape) if g.rerank_shape else 0,
                    rerank_vocab=len(tokenizer) if g.rerank_query == "words" else 0,
                    query_vocab=len(tokenizer) if g.query_words else 0,
                    rerank_context=int(g.rerank_context),
                )
            else:
                rank_zero_warn(
                    f"projector {cfg.projector.name!r} has tokens without an image footprint; "
                    "the grounding head (grounding.weight / grounding.pointer) is off for it."
                )

        disk = Path(cfg.cache.root) / "features" if cfg.cache.features else None
        # features are stored per image id: the key names the encoder *and* the data set, so two
        # data roots whose ids overlap (a regenerated or larger SynthRef) never share entries
        images = _data_key(cfg.data)
        self.tower_features = FrozenEncoder(
            self.tower,
            f"tower-{self.tower.config_hash()}-{images}",
            self.tower.preprocess,
            memory=bool(cfg.vision.frozen),
            disk_dir=disk if cfg.vision.frozen else None,
        )
        self.sam_features = FrozenEncoder(
            self.sam.image_encoder,
            f"sam-{_file_key(cfg.mask_decoder.checkpoint)}-{images}",
            self._sam_preprocess,
            disk_dir=disk,
        )
        eval_splits = list(cfg.data.eval_splits)
        self.eval_splits = eval_splits
        self.ciou = nn.ModuleList([CIoU() for _ in eval_splits])
        self.giou = nn.ModuleList([GIoU() for _ in eval_splits])
        # with a grounding head: cIoU of the sentences it points right at (hit) and wrong (miss)
        self.ciou_hit = nn.ModuleList([CIoU() for _ in eval_splits])
        self.ciou_miss = nn.ModuleList([CIoU() for _ in eval_splits])
        self._hits: dict[int, list[int]] = {i: [] for i in range(len(eval_splits))}
        self._tokens: dict[int, list[int]] = {i: [] for i in range(len(eval_splits))}
        self._seq_len: dict[int, list[int]] = {i: [] for i in range(len(eval_splits))}
        self._fit_start = 0.0
        self.start_epoch = 0
        self.image_samples: list[dict] = []

    # ------------------------------------------------------------------ encoders
    def _sam_preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        size = self.sam.image_encoder.img_size
        out = []
        for img in images:
            x = img.to(self.device).permute(2, 0, 1).float()
            h, w = x.shape[-2:]
            scale = size / max(h, w)
            nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
            if (nh, nw) != (h, w):
                x = F.interpolate(
                    x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=True
                )[0]
            out.append(self.sam.preprocess(x))
        return torch.stack(out)

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        size = self.sam.image_encoder.img_size
        scale = size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    # ------------------------------------------------------------------ sequence building
    def build_inputs(self, tokens: torch.Tensor, token_mask: torch.Tensor, batch: dict):
        """Splice each sample's own visual tokens in place of `<image>`; pad on the right.

        Returns embeddings, attention mask, text labels, the [SEG] position and the position of
        the first visual token, per sample.
        """
        embed = self.llm.get_input_embeddings()
        ids, labels, lengths = batch["input_ids"], batch["text_labels"], batch["text_lengths"]
        seqs, labs, seg_pos, image_pos = [], [], [], []
        for b in range(ids.shape[0]):
            n_text = int(lengths[b])
            row = ids[b, :n_text]
            where = (row == self.image_id).nonzero()
            if len(where) != 1:
                raise ValueError(
                    f"sample {b}: expected exactly one <image> token, found {len(where)}"
                )
            k = int(where[0])
            image_pos.append(k)
            vis = tokens[b][token_mask[b]]
            text = embed(row)
            seqs.append(torch.cat([text[:k], vis.to(text.dtype), text[k + 1 :]]))
            fill = torch.full((vis.shape[0],), -100, dtype=labels.dtype, device=labels.device)
            lab = torch.cat([labels[b, :k], fill, labels[b, k + 1 : n_text]])
            labs.append(lab)
            seg = (torch.cat([row[:k], fill, row[k + 1 :]]) == self.seg_id).nonzero()
            if len(seg) == 0:
                raise ValueError(f"sample {b}: the answer has no [SEG] token")
            seg_pos.append(int(seg[0]))
        length = max(s.shape[0] for s in seqs)
        dim = seqs[0].shape[-1]
        emb = seqs[0].new_zeros((len(seqs), length, dim))
        attn = torch.zeros((len(seqs), length), dtype=torch.long, device=emb.device)
        lab_out = torch.full((len(seqs), length), -100, dtype=labels.dtype, device=labels.device)
        for b, (s, lb) in enumerate(zip(seqs, labs)):
            emb[b, : s.shape[0]] = s
            attn[b, : s.shape[0]] = 1
            lab_out[b, : lb.shape[0]] = lb
        dev = emb.device
        return (
            emb,
            attn,
            lab_out,
            torch.tensor(seg_pos, device=dev),
            torch.tensor(image_pos, device=dev),
        )

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict, decode: bool = True) -> dict[str, Any]:
        """The model's outputs; `decode=False` stops before the mask decoder (no `mask_logits`),
        for training or measuring the pointing alone."""
        images, image_ids, views = batch["images"], batch["image_ids"], batch.get("views")
        feats = self.tower_features(images, image_ids, views)
        if self.tower.training and not self.cfg.vision.frozen:
            feats = self.tower(self.tower.preprocess(images))
        proj = self.projector(feats, batch.get("labels"))
        emb, attn, text_labels, seg_pos, image_pos = self.build_inputs(
            proj.tokens, proj.mask, batch
        )
        llm_mask = attn
        if self.cfg.llm.visual_attention == "bidirectional":
            from lightning_modules.llm import prefix_attention_mask

            llm_mask = prefix_attention_mask(attn, image_pos, proj.mask.sum(1), emb.dtype)
        out = self.llm(inputs_embeds=emb, attention_mask=llm_mask, output_hidden_states=True)
        logits = out.logits[:, :-1].float()
        target = text_labels[:, 1:]
        token_ce = F.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
        )
        valid = (target != -100).float()
        ce = (token_ce * valid).sum() / valid.sum().clamp_min(1.0)
        ce_per_sample = (token_ce * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        hidden = out.hidden_states[-1]
        # The hidden state that predicts [SEG] sits one position before it.
        seg_hidden = hidden[
            torch.arange(hidden.shape[0], device=hidden.device), seg_pos - 1
        ].float()
        extra = {}
        if self.grounding is not None:
            seg_hidden, extra = self._ground(
                seg_hidden, hidden, image_pos, seg_pos, proj, feats, batch
            )
        if decode:
            extra["mask_logits"] = self.decode(self.seg_head(seg_hidden), images, image_ids, views)
        return {
            **extra,
            "seg_hidden": seg_hidden,
            "ce": ce,
            "ce_per_sample": ce_per_sample,
            "num_tokens": proj.mask.sum(1),
            "seq_len": attn.sum(1),
        }

    def _ground(self, seg_hidden, hidden, image_pos, seg_pos, proj, feats, batch) -> tuple:
        """Grounding scores of the visual tokens and, with the pointer on, the [SEG] state plus
        the pointed-at location's code. Returns (seg_hidden, outputs for the loss)."""
        g = self.cfg.grounding
        if g.keys_from == "tokens":
            vis = proj.tokens.float()
        else:  # the LLM's last hidden state of each visual token (padding slots read position k)
            pos = image_pos[:, None] + (proj.mask.long().cumsum(1) - 1).clamp(min=0)
            vis = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])).float()
        query = seg_hidden
        if len(self.grounding.fusion):
            text, text_mask = self._text_states(hidden, image_pos, seg_pos, proj.mask.sum(1))
            query, vis = self.grounding.fuse(seg_hidden, vis, proj.mask, text, text_mask)
        regions, (h, w) = proj.regions.float(), (int(s) for s in feats.shape[-2:])
        codes = centres = None
        if self.grounding.point is not None or self.grounding.geometry is not None:
            centres = token_centroids(regions, h, w)
            codes = self._point_codes(centres, batch["images"])
        words, table = None, self.grounding.query_words
        if table is not None:  # `query_words`: the prompt's bag of words joins the query
            words = word_query(table, *self._prompt_words(batch))
        logits = self.grounding.logits(query, vis, proj.mask, codes, words)
        extra = {"ground_logits": logits}
        # with `pointer_vote` as well the vote picks at evaluation: the re-ranker only trains
        rerank = g.rerank > 0 and (self.training or g.pointer_vote == 0)
        cells = None
        if "masks" in batch:
            cells = grid_targets(batch["masks"], h, w, logits.device)
            extra["ground_target"], extra["ground_valid"] = target_distribution(regions, cells)
        if self.grounding.point is None:
            return seg_hidden, extra
        rerank_top = None
        if rerank:
            if g.rerank_from == "features":  # the tower's grid, each cell by its share inside
                pool = partial(pool_cells, feats.float().flatten(2).transpose(1, 2))
            else:  # the scored visual states, each token by the share of its footprint inside
                pool = partial(pool_in_masks, vis, regions)
            rerank_top = self._rerank(
                seg_hidden, logits, pool, codes, centres, regions, (h, w), batch, cells, extra
            )
        weights = logits.softmax(-1)
        if self.training and g.teacher_forcing and "ground_target" in extra:
            valid = extra["ground_valid"][:, None]
            teacher = extra["ground_target"]
            if g.teacher_pointer == "sample":
                teacher = sample_targets(teacher)
            weights = torch.where(valid, teacher, weights)
        elif not self.training and g.pointer_eval == "argmax":
            if g.pointer_smooth > 0:
                extra["point_scores"] = smoothed_scores(logits, centres, g.pointer_smooth)
            pick = extra.get("point_scores", logits).argmax(-1)
            if rerank_top is not None:
                best = extra["rerank_logits"].argmax(-1, keepdim=True)
                pick = rerank_top.gather(1, best)[:, 0]
            elif g.pointer_vote > 0:
                pick = self._vote(seg_hidden, logits, extra, codes, regions, (h, w), batch)
            extra["point_pick"] = pick
            weights = F.one_hot(pick, logits.shape[-1]).to(weights.dtype)
        return seg_hidden + self.grounding.point_code(weights, codes), extra

    def _candidates(self, seg_hidden, scores, codes, grid, batch, k, centres=None, spread=0.0):
        """The top-`k` tokens by `scores` (B×K indices; with `spread` > 0 kept apart by their
        footprint `centres`, `spread_top`), which of them are real tokens (B×K; a sample with
        fewer tokens gets padding slots), the masks decoded from pointing at each (B×K×(h·w):
        the fraction of each feature-grid cell inside the mask), and per image the masks
        themselves (K×h'×w' bool at SAM's low resolution, the image's part of its frame)."""
        b, n = scores.shape
        k = min(int(k), n)
        top, real = spread_top(scores, centres, k, spread)
        onehot = F.one_hot(top, n).to(codes.dtype)
        prompts = self.seg_head(seg_hidden[:, None] + self.grounding.point(onehot @ codes))
        images = batch["images"]
        embed = self.sam_features(images, batch["image_ids"], batch.get("views"))
        low = decode_masks(self.sam, embed.repeat_interleave(k, 0), prompts.flatten(0, 1))
        low = low.view(b, k, *low.shape[-2:])
        size, cells, masks = self.sam.image_encoder.img_size, [], []
        for i, img in enumerate(images):  # the image's part of SAM's padded frame, on the grid
            rh, rw = self._resized_size(int(img.shape[0]), int(img.shape[1]))
            hh = max(1, round(rh / size * low.shape[-2]))
            ww = max(1, round(rw / size * low.shape[-1]))
            inside = low[i, :, :hh, :ww] > 0
            masks.append(inside)
            cells.append(F.adaptive_avg_pool2d(inside.float()[:, None], grid).flatten(1))
        return top, real, torch.stack(cells), masks

    def _vote(self, seg_hidden, logits, extra, codes, regions, grid, batch) -> torch.Tensor:
        """B token indices: of the top `grounding.pointer_vote` tokens, the one whose decoded
        mask holds the most softmax mass (`mask_votes`)."""
        scores = extra.get("point_scores", logits)
        top, real, cells, _ = self._candidates(
            seg_hidden, scores, codes, grid, batch, self.cfg.grounding.pointer_vote
        )
        votes = mask_votes(logits.float().softmax(-1), regions, cells)
        votes = votes.masked_fill(~real, -math.inf)
        extra["point_votes"] = votes
        return top.gather(1, votes.argmax(-1, keepdim=True))[:, 0]

    def _rerank(
        self, seg_hidden, logits, pool, codes, centres, regions, grid, batch, target_cells, extra
    ) -> torch.Tensor:
        """Scores (B×K) of the masks decoded from the top `grounding.rerank` tokens, from the
        states that `pool` (B×K×(h·w) mask cell fractions → B×K×D) pools inside each; stores
        them and (given the target's grid cells, `target_cells` B×(h·w) or None) each
        candidate's grid IoU with the target in `extra`. `centres` (the tokens' footprint
        centroids, `token_centroids`) keep the candidates apart with `rerank_spread`. Returns the
        candidates' indices."""
        with torch.no_grad():  # the candidates are inputs to the re-ranker, not trained through
            g = self.cfg.grounding
            top, real, cells, masks = self._candidates(
                seg_hidden.detach(),
                logits.detach(),
                codes,
                grid,
                batch,
                g.rerank,
                centres,
                g.rerank_spread,
            )
            geometry = None
            if self.cfg.grounding.rerank_shape > 0:
                s = int(self.cfg.grounding.rerank_shape)
                geometry = torch.stack([mask_geometry(m, s) for m in masks])
        pooled = pool(cells)
        h, w = grid
        ccodes = self._point_codes(token_centroids(cells, h, w), batch["images"])
        votes = None
        if self.grounding.rerank_vote is not None:
            votes = mask_votes(logits.detach().float().softmax(-1), regions, cells)
        query, words, table = seg_hidden, None, self.grounding.rerank_words
        if table is not None:
            prompt = self._prompt_words(batch)
            query = word_query(table, *prompt)
            if len(self.grounding.rerank_context):  # the words in order, for the encoder
                words = word_states(table, *prompt)
        extra["rerank_logits"] = self.grounding.rerank_logits(
            query, pooled, ccodes, cells.sum(-1) / (h * w), real, votes, geometry, words
        )
        if target_cells is not None:
            extra["rerank_iou"] = cell_iou(cells, target_cells)
        return top

    def _prompt_words(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids (B×T) and which of them are text (B×T): <image> and padding left out."""
        ids = batch["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return ids, (pos < batch["text_lengths"][:, None]) & (ids != self.image_id)

    @staticmethod
    def _text_states(hidden, image_pos, seg_pos, num_vis) -> tuple:
        """The LLM's last hidden states of the text before [SEG] (visual tokens left out): B×T×D
        and a B×T mask. Position p of sample b is text iff p < seg_pos and p is not one of its
        visual tokens [image_pos, image_pos + num_vis)."""
        length = int(seg_pos.max())
        p = torch.arange(length, device=hidden.device)[None]
        is_vis = (p >= image_pos[:, None]) & (p < (image_pos + num_vis)[:, None])
        return hidden[:, :length].float(), (p < seg_pos[:, None]) & ~is_vis

    def _point_codes(self, xy: torch.Tensor, images: list) -> torch.Tensor:
        """SAM's Fourier point code (B×N×C) at each token's footprint centroid (`xy`, B×N×2 from
        `token_centroids`).

        The footprints live on the tower's feature grid, taken to span the image; SAM's point
        coordinates are relative to its padded square input frame, hence the per-image scale.
        """
        size = self.sam.image_encoder.img_size
        scale = [self._resized_size(int(i.shape[0]), int(i.shape[1])) for i in images]
        frame = torch.tensor([[w / size, h / size] for h, w in scale], device=xy.device)
        return self.sam.prompt_encoder.pe_layer._pe_encoding(xy * frame[:, None, :])

    def grounding_terms(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Grounding loss and top-1 pointing accuracy of a forward output with a grounding head."""
        return grounding_loss(
            out["ground_logits"], out["ground_target"], out["ground_valid"], self.cfg.grounding.loss
        )

    def decode(
        self, prompts: torch.Tensor, images: list, image_ids: torch.Tensor, views=None
    ) -> list:
        """Mask logits at each image's own size, from one SAM prompt embedding per image."""
        low_res = decode_masks(self.sam, self.sam_features(images, image_ids, views), prompts)
        masks = []
        for b, img in enumerate(images):
            h, w = int(img.shape[0]), int(img.shape[1])
            size = self._resized_size(h, w)
            masks.append(self.sam.postprocess_masks(low_res[b : b + 1], size, (h, w))[0, 0])
        return masks

    @staticmethod
    def mask_losses(mask_logits: list, masks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch means of the per-sample BCE and Dice losses."""
        bce, dice = [], []
        for logit, gt in zip(mask_logits, masks):
            target = gt.to(logit.device).float()
            bce.append(F.binary_cross_entropy_with_logits(logit, target))
            dice.append(dice_loss(logit, target))
        return torch.stack(bce).mean(), torch.stack(dice).mean()

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        w = self.cfg.loss
        bce_m, dice_m = self.mask_losses(out["mask_logits"], batch["masks"])
        total = w.ce_weight * out["ce"] + w.bce_weight * bce_m + w.dice_weight * dice_m
        terms = {"ce": out["ce"], "bce": bce_m, "dice": dice_m}
        if "ground_logits" in out:
            ground, acc = self.grounding_terms(out)
            total = total + self.cfg.grounding.weight * ground
            terms.update(grounding=ground, point_acc=acc.detach())
        if "rerank_iou" in out:
            rerank, racc = rerank_loss(out["rerank_logits"], out["rerank_iou"])
            total = total + self.cfg.grounding.rerank_weight * rerank
            terms.update(rerank=rerank, rerank_acc=racc.detach())
        return {"loss": total, **terms}

    # ------------------------------------------------------------------ lightning hooks
    def on_train_start(self) -> None:
        self._fit_start = time.time()
        self.start_epoch = self.current_epoch  # > 0 when resumed from a checkpoint

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        losses = self.losses(out, batch)
        bs = len(batch["images"])
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs, prog_bar=k == "loss")
        self.log("train/tokens_per_image", out["num_tokens"].float().mean(), batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, idx: int, stage: str) -> None:
        out = self(batch)
        losses = self.losses(out, batch)
        split = self.eval_splits[idx]
        preds = [(m > 0).to(torch.uint8) for m in out["mask_logits"]]
        targets = [g.to(self.device) for g in batch["masks"]]
        self.ciou[idx].update(preds, targets)
        self.giou[idx].update(preds, targets)
        self._tokens[idx].extend(out["num_tokens"].tolist())
        self._seq_len[idx].extend(out["seq_len"].tolist())
        if "ground_target" in out:
            # the token the pointer picked (smoothed, voted), else the top-scored one
            pick = out.get("point_pick", out["ground_logits"].argmax(-1))
            hits = picked_hits(pick, out["ground_target"], out["ground_valid"])
            self._hits[idx].extend(hits.long().tolist())
            for metric, keep in ((self.ciou_hit[idx], hits), (self.ciou_miss[idx], ~hits)):
                pick = keep.nonzero()[:, 0].tolist()
                metric.update([preds[i] for i in pick], [targets[i] for i in pick])
        logged = {f"{stage}_loss/{split}": losses["loss"]}
        for name, value in logged.items():
            self.log(name, value, batch_size=len(preds), add_dataloader_idx=False, sync_dist=True)
        if batch_idx == 0 and idx == 0:
            self.image_samples = _image_samples(batch, preds, self.cfg.trainer.num_image_samples)

    def _eval_epoch_end(self, stage: str) -> None:
        for idx, split in enumerate(self.eval_splits):
            self.log(f"{stage}/{split}/ciou", self.ciou[idx].compute(), sync_dist=False)
            self.log(f"{stage}/{split}/giou", self.giou[idx].compute(), sync_dist=False)
            self.ciou[idx].reset()
            self.giou[idx].reset()
            counts = self._gather(self._tokens[idx])
            lens = self._gather(self._seq_len[idx])
            if counts:
                stats = token_stats(counts)
                for k, v in stats.items():
                    self.log(f"{stage}/{split}/tokens_{k}", float(v), sync_dist=False)
                self.log(f"{stage}/{split}/seq_len_mean", float(np.mean(lens)), sync_dist=False)
            hits = self._gather(self._hits[idx])
            if hits:  # pointing accuracy over the whole split (a sentence without a target
                # counts as a miss); cIoU of the hits and of the misses
                self.log(f"{stage}/{split}/point_acc", float(np.mean(hits)), sync_dist=False)
                for name, metric, n in (
                    ("ciou_hit", self.ciou_hit[idx], sum(hits)),
                    ("ciou_miss", self.ciou_miss[idx], len(hits) - sum(hits)),
                ):
                    value = metric.compute()
                    if n:
                        self.log(f"{stage}/{split}/{name}", value, sync_dist=False)
            self.ciou_hit[idx].reset()
            self.ciou_miss[idx].reset()
            self._tokens[idx], self._seq_len[idx], self._hits[idx] = [], [], []
        if stage == "val" and self.eval_splits:
            first = self.eval_splits[0]
            self.log("val/ciou", self.trainer.callback_metrics[f"val/{first}/ciou"])
            self._log_images()

    def _gather(self, values: list[int]) -> list[int]:
        if self.trainer is None or self.trainer.world_size == 1:
            return list(values)
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, list(values))
        return [v for part in gathered for v in part]

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _log_images(self) -> None:
        logger = self.logger
        if not self.image_samples or logger is None or not hasattr(logger, "experiment"):
            return
        if self.global_rank != 0 or not hasattr(logger.experiment, "add_image"):
            return
        from lightning_modules.visualize import prediction_grid

        grid = prediction_grid(self.image_samples)
        logger.experiment.add_image("val/predictions", grid, self.global_step, dataformats="HWC")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        o = self.cfg.optim
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warm = min(o.warmup_steps, max(1, total // 10))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if o.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _file_key(path: str) -> str:
    import hashlib

    try:
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = str(path)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _data_key(data) -> str:
    """Identity of the images behind the image ids: the data set's annotation file (path, size,
    mtime), so another root or a regenerated data set gets other feature-cache entries."""
    return _file_key(str(Path(data.root) / data.dataset / "instances.json"))[:8]


def _image_samples(batch: dict, preds: list[torch.Tensor], count: int) -> list[dict]:
    samples = []
    for b in range(min(count, len(preds))):
        sample = {
            "image": batch["images"][b].cpu().numpy(),
            "gt": batch["masks"][b].cpu().numpy(),
            "pred": preds[b].cpu().numpy(),
            "sentence": batch["sentences"][b],
        }
        if "superpixels" in batch:
            sample["superpixels"] = batch["superpixels"][b].cpu().numpy()
        samples.append(sample)
    return samples
