"""Grounding: the [SEG] state becomes SAM's prompt, optionally through a pointer and a re-ranker.

LISA's prompt path is an MLP from the hidden state that predicts [SEG] to one sparse prompt
embedding (`SegPromptHead`); it relies on an LLM whose pre-training already links words to image
regions. The tiny preset's LLM is trained from scratch and has no such link, so the preset turns
on a pointer (`grounding.weight`, `grounding.pointer`):

* **scores**: s_i = ⟨q([SEG]), k(v_i)⟩/√d between the [SEG] state and each visual token; a soft
  cross-entropy pulls softmax(s) towards the tokens whose footprint (`ProjectorOutput.regions`)
  covers the target, each weighted by coverage × purity (overlap² / footprint area);
* **pointer**: the point code (SAM's Fourier code of the footprint centroid) of the pointed-at
  token, mapped and added to the [SEG] state before the MLP. Training points at one target token
  drawn by weight; evaluation at the top-scored token;
* **re-ranker** (`grounding.rerank` = K): the masks decoded from the K top-scored tokens (kept
  apart by `rerank_spread`) are read by the projector's visual tokens pooled inside each (by
  footprint overlap), their place, size, shape code and the scores' mass inside them, and
  matched against a bag of the prompt's words
  (`rerank_context` encoder layers let candidates and words in order see each other); evaluation
  takes the best candidate.

A projector whose tokens have no footprint (`has_regions` false; none of the seven) gets LISA's
plain path, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from common.errors import ConfigError
from lightning_modules.projectors.semantic import GEOMETRY_DIM, superpixel_geometry

SHAPE_CODE = 4  # side of a candidate mask's shape code (the SSPE code of `semantic`)


@dataclass
class GroundingConfig:
    weight: float = 0.0  # weight of the pointer's score loss (0 with pointer=false: LISA's path)
    pointer: bool = False  # add the pointed-at token's place to the [SEG] state
    dim: int = 64  # width of the scores' queries and keys
    # candidate masks the re-ranker picks from, with the pointer on (0 = point at the top token)
    rerank: int = 8
    rerank_weight: float = 1.0  # weight of the re-ranker's loss
    # candidates whose footprint centroids lie within this fraction of the grid's side of one
    # already taken are skipped (0.1 skips a patch's 8 neighbours on a 16×16 grid; 0 = plain top K)
    rerank_spread: float = 0.1
    rerank_context: int = 2  # encoder layers over query, candidates and words (0 = none)
    context_heads: int = 4  # attention heads of those layers; must divide `dim`


def check_config(g: GroundingConfig) -> None:
    """ConfigError, naming the key, for settings the head cannot be built with."""
    if g.rerank < 0:
        raise ConfigError(
            "grounding.rerank is a number of candidate masks and must be ≥ 0 (0 = point at the "
            f"top-scored token); got {g.rerank}."
        )
    if g.dim < 1:
        raise ConfigError(f"grounding.dim is a width and must be ≥ 1; got {g.dim}.")
    if g.rerank_context < 0 or (
        g.rerank_context > 0 and (g.context_heads < 1 or g.dim % g.context_heads)
    ):
        raise ConfigError(
            "grounding.rerank_context is a number of encoder layers (0 = off), ≥ 0, and "
            "grounding.context_heads must divide grounding.dim; got "
            f"rerank_context={g.rerank_context}, context_heads={g.context_heads}, dim={g.dim}."
        )
    if not g.rerank_spread >= 0:
        raise ConfigError(
            "grounding.rerank_spread is a distance (a fraction of the feature grid's side) "
            f"and must be ≥ 0 (0 = the plain top tokens); got {g.rerank_spread}."
        )


class SegPromptHead(nn.Module):
    """LISA's `text_hidden_fcs`: [SEG] hidden state → MLP → one sparse prompt embedding."""

    def __init__(self, hidden: int, mlp_hidden: int, prompt_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.ReLU(inplace=True), nn.Linear(mlp_hidden, prompt_dim)
        )

    def forward(self, seg_hidden: Tensor) -> Tensor:
        return self.mlp(seg_hidden)


class ContextLayer(nn.Module):
    """Pre-norm bidirectional transformer layer with a key-padding mask.

    Written out (rather than `nn.TransformerEncoderLayer`) so that eval mode takes the same
    arithmetic as training and padded samples stay bit-comparable. Both residual branches end in
    zero-initialised layers: a fresh layer is the identity.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        for last in (self.out, self.mlp[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None]
        )
        x = x + self.out(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class Pointer(nn.Module):
    """The learned parts of the pointer: scores, point code map and the re-ranker."""

    def __init__(
        self, hidden: int, pe_dim: int, token_dim: int, vocab: int, cfg: GroundingConfig
    ) -> None:
        super().__init__()
        dim = self.dim = cfg.dim
        self.query = nn.Linear(hidden, dim)
        self.key = nn.Linear(hidden, dim, bias=False)  # a key bias would cancel in the softmax
        self.point = nn.Linear(pe_dim, hidden) if cfg.pointer else None
        rerank = cfg.pointer and cfg.rerank > 0
        # the re-ranker's own embedding of each vocabulary token, averaged over the prompt
        self.rerank_words = nn.Embedding(vocab, dim) if rerank else None
        self.rerank_norm = nn.LayerNorm(token_dim) if rerank else None
        self.rerank_vote = nn.Parameter(torch.ones(())) if rerank else None  # × log vote mass
        # pooled tokens ⊕ centroid point code ⊕ log share of the grid ⊕ geometry and shape code
        width = token_dim + pe_dim + 1 + GEOMETRY_DIM + SHAPE_CODE**2
        self.rerank_key = (
            nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            if rerank
            else None
        )
        layers = cfg.rerank_context if rerank else 0
        self.rerank_context = nn.ModuleList(
            ContextLayer(dim, cfg.context_heads) for _ in range(layers)
        )
        if layers:
            self.rerank_role = nn.Parameter(torch.randn(3, dim) * 0.02)  # query, candidate, word

    def logits(self, seg_hidden: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """B×N scores of the B×N×D visual tokens against the B×D [SEG] states; −inf on padding."""
        q = self.query(seg_hidden)
        scores = (self.key(tokens) @ q[..., None]).squeeze(-1) / math.sqrt(self.dim)
        return scores.masked_fill(~mask, -math.inf)

    def rerank_logits(
        self,
        query: Tensor,
        pooled: Tensor,
        codes: Tensor,
        area: Tensor,
        real: Tensor,
        votes: Tensor,
        geometry: Tensor,
        words: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """B×K scores of K candidate masks against the words `query` (B×dim, `word_query`): each
        read by its pooled visual tokens B×K×C (`pool_tokens`), centroid point code B×K×P,
        share of the grid B×K and geometry B×K×G, plus the learned weight × log of `votes` (the
        scores' softmax mass inside it, `mask_votes`); −inf where not `real`. `words`
        (`word_states`) feed the context layers."""
        parts = [self.rerank_norm(pooled), codes, area.clamp(min=1e-4).log()[..., None]]
        keys = self.rerank_key(torch.cat([*parts, geometry.to(pooled.dtype)], -1))
        if len(self.rerank_context):
            query, keys = self._context(query, keys, real, words)
        scores = (keys @ query[..., None]).squeeze(-1) / math.sqrt(self.dim)
        scores = scores + self.rerank_vote * votes.clamp(min=1e-6).log()
        return scores.masked_fill(~real, -math.inf)

    def _context(
        self, q: Tensor, keys: Tensor, real: Tensor, words: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """Query and keys after the context layers over [query, candidates (where `real`),
        words (where kept)]."""
        k = keys.shape[1]
        seq = [(q + self.rerank_role[0])[:, None], keys + self.rerank_role[1]]
        keep = [real.new_ones(real.shape[0], 1), real]
        if words is not None:
            states, kept = words
            seq.append(states.to(keys.dtype) + self.rerank_role[2])
            keep.append(kept)
        x, keep = torch.cat(seq, 1), torch.cat(keep, 1)
        for layer in self.rerank_context:
            x = layer(x, keep)
        # the roles only tell the slots apart: without them, fresh layers give back q and keys
        return x[:, 0] - self.rerank_role[0], x[:, 1 : 1 + k] - self.rerank_role[1]

    def point_code(self, weights: Tensor, codes: Tensor) -> Tensor:
        """B×D: the `weights`-weighted (B×N) sum of the tokens' B×N×P point codes, mapped to D."""
        return self.point((weights[..., None] * codes).sum(1))


class Grounding(nn.Module):
    """[SEG] state → SAM prompt embedding, through the pointer when it is on.

    `forward(seg_hidden, proj, feats, batch, decoder)` returns the prompt (B×P) and the pointer's
    outputs for the loss and the metrics (`ground_logits`, `ground_target`, `ground_valid`,
    `point_pick`, `rerank_logits`, `rerank_iou`; empty without a pointer).
    """

    def __init__(
        self,
        cfg: GroundingConfig,
        hidden: int,
        mlp_hidden: int,
        decoder,
        vocab: int,
        image_token_id: int,
        has_regions: bool,
        projector: str = "",
    ) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.seg_mlp = SegPromptHead(hidden, mlp_hidden, decoder.prompt_dim)
        self.pointer = None
        if cfg.weight > 0 or cfg.pointer:
            if has_regions:
                self.pointer = Pointer(hidden, decoder.prompt_dim, hidden, vocab, cfg)
            else:
                rank_zero_warn(
                    f"projector {projector!r} has tokens without an image footprint; the "
                    "grounding pointer (grounding.weight / grounding.pointer) is off for it."
                )

    def forward(self, seg_hidden: Tensor, proj, feats: Tensor, batch: dict, decoder):
        head = self.pointer
        if head is None:
            return self.seg_mlp(seg_hidden), {}
        regions, (h, w) = proj.regions.float(), (int(s) for s in feats.shape[-2:])
        centres = codes = None
        if head.point is not None:
            centres = token_centroids(regions, h, w)
            codes = decoder.point_codes(centres, batch["images"])
        logits = head.logits(seg_hidden, proj.tokens.float(), proj.mask)
        extra = {"ground_logits": logits}
        cells = None
        if "masks" in batch:
            cells = grid_targets(batch["masks"], h, w, logits.device)
            extra["ground_target"], extra["ground_valid"] = target_distribution(regions, cells)
        if head.point is None:
            return self.seg_mlp(seg_hidden), extra
        top = None
        if self.cfg.rerank > 0:
            top, reranked = self._rerank(
                seg_hidden,
                logits,
                proj.tokens,
                feats,
                codes,
                centres,
                regions,
                batch,
                cells,
                decoder,
            )
            extra.update(reranked)
        weights = logits.softmax(-1)
        if self.training and "ground_target" in extra:  # one target token, as evaluation points
            teacher = sample_targets(extra["ground_target"])
            weights = torch.where(extra["ground_valid"][:, None], teacher, weights)
        elif not self.training:
            pick = logits.argmax(-1)
            if top is not None:
                pick = top.gather(1, extra["rerank_logits"].argmax(-1, keepdim=True))[:, 0]
            extra["point_pick"] = pick
            weights = F.one_hot(pick, logits.shape[-1]).to(weights.dtype)
        return self.seg_mlp(seg_hidden + head.point_code(weights, codes)), extra

    def _rerank(
        self, seg_hidden, logits, tokens, feats, codes, centres, regions, batch, cells, decoder
    ):
        """The candidates (B×K token indices) and the re-ranker's outputs: `rerank_logits` and,
        given the target's grid cells `cells`, each candidate's grid IoU with it (`rerank_iou`)."""
        head, (h, w) = self.pointer, feats.shape[-2:]
        with torch.no_grad():  # the candidates are inputs to the re-ranker, not trained through
            top, real, masks = self._candidates(
                seg_hidden.detach(), logits.detach(), codes, centres, batch, decoder
            )
            found = torch.stack(
                [F.adaptive_avg_pool2d(m.float()[:, None], (h, w)).flatten(1) for m in masks]
            )
            geometry = torch.stack([mask_geometry(m, SHAPE_CODE) for m in masks])
        pooled = pool_tokens(tokens.float(), regions, found)
        centroid_codes = decoder.point_codes(token_centroids(found, h, w), batch["images"])
        votes = mask_votes(logits.detach().float().softmax(-1), regions, found)
        ids = batch["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        keep = (pos < batch["text_lengths"][:, None]) & (ids != self.image_token_id)
        query = word_query(head.rerank_words, ids, keep)
        words = word_states(head.rerank_words, ids, keep) if len(head.rerank_context) else None
        out = {
            "rerank_logits": head.rerank_logits(
                query, pooled, centroid_codes, found.sum(-1) / (h * w), real, votes, geometry, words
            )
        }
        if cells is not None:
            out["rerank_iou"] = cell_iou(found, cells)
        return top, out

    def _candidates(self, seg_hidden, scores, codes, centres, batch, decoder):
        """The top `rerank` tokens by `scores` (B×K, kept apart by `rerank_spread`), which are
        real tokens (B×K; a sample with fewer tokens gets repeats), and per image the masks
        decoded from pointing at each (K×h'×w' bool at SAM's low resolution, the image's part of
        its frame)."""
        b, n = scores.shape
        k = min(int(self.cfg.rerank), n)
        top, real = spread_top(scores, centres, k, self.cfg.rerank_spread)
        onehot = F.one_hot(top, n).to(codes.dtype)
        prompts = self.seg_mlp(seg_hidden[:, None] + self.pointer.point(onehot @ codes))
        images = batch["images"]
        embed = decoder.embeddings(images, batch["image_ids"])
        low = decoder.low_res(embed.repeat_interleave(k, 0), prompts.flatten(0, 1))
        low = low.view(b, k, *low.shape[-2:])
        masks = []
        for i, img in enumerate(images):
            hh, ww = decoder.low_res_size(int(img.shape[0]), int(img.shape[1]), low.shape[-2:])
            masks.append(low[i, :, :hh, :ww] > 0)
        return top, real, masks

    def add_losses(self, total: Tensor, out: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """`total` plus the pointer's weighted losses, and their terms (none without a pointer)."""
        terms = {}
        if "ground_target" in out:
            ground, acc = grounding_loss(
                out["ground_logits"], out["ground_target"], out["ground_valid"]
            )
            total = total + self.cfg.weight * ground
            terms.update(grounding=ground, point_acc=acc.detach())
        if "rerank_iou" in out:
            rerank, racc = rerank_loss(out["rerank_logits"], out["rerank_iou"])
            total = total + self.cfg.rerank_weight * rerank
            terms.update(rerank=rerank, rerank_acc=racc.detach())
        return total, terms


def token_centroids(regions: Tensor, h: int, w: int) -> Tensor:
    """Footprint centroids B×N×2, (x, y) in [0, 1] of the feature grid; 0.5 where empty."""
    ys = (torch.arange(h, device=regions.device, dtype=regions.dtype) + 0.5) / h
    xs = (torch.arange(w, device=regions.device, dtype=regions.dtype) + 0.5) / w
    cells = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)
    area = regions.sum(-1, keepdim=True)
    centre = (regions @ cells) / area.clamp(min=1e-12)
    return torch.where(area > 0, centre, torch.full_like(centre, 0.5))


def spread_top(scores: Tensor, centres: Tensor, k: int, spread: float) -> tuple[Tensor, Tensor]:
    """Greedy top-`k` tokens (B×k indices) by `scores` (B×N, −inf = padding) that keeps taken
    tokens' footprint centroids (`centres` B×N×2, `token_centroids`) more than `spread` apart
    in x or y, and which picks are real (B×k; False once a sample runs out of tokens far enough
    from those taken: such slots repeat a taken token). `spread` = 0 is `scores.topk(k)`."""
    k = min(int(k), scores.shape[-1])
    if spread <= 0:
        top = scores.topk(k, -1).indices
        return top, torch.isfinite(scores.gather(1, top))
    left, picks, real = scores.float().clone(), [], []
    for _ in range(k):
        value, pick = left.max(-1)
        ok = torch.isfinite(value)
        if picks:  # nothing left: repeat the first pick, flagged as not real
            pick = torch.where(ok, pick, picks[0])
        picks.append(pick)
        real.append(ok)
        taken = centres.gather(1, pick[:, None, None].expand(-1, 1, centres.shape[-1]))
        near = (centres - taken).abs().amax(-1) < spread
        left = left.masked_fill(near, -math.inf).scatter(1, pick[:, None], -math.inf)
    return torch.stack(picks, 1), torch.stack(real, 1)


def grid_targets(masks: list[Tensor], h: int, w: int, device) -> Tensor:
    """Fraction of each h×w feature-grid cell inside each target mask: B×(h·w)."""
    cells = [
        F.adaptive_avg_pool2d(m.to(device=device, dtype=torch.float32)[None, None], (h, w))
        for m in masks
    ]
    return torch.cat(cells).flatten(1)


def target_distribution(regions: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Target weights B×N over the tokens and a B bool (the target overlaps some token).

    A token's weight is overlap²/area (overlap = Σ_cells share × target fraction): its coverage of
    the target times its purity, normalised over the tokens.
    """
    overlap = (regions @ cells[..., None]).squeeze(-1)
    area = regions.sum(-1)
    score = overlap.square() / area.clamp(min=1e-12)
    total = score.sum(-1, keepdim=True)
    return score / total.clamp(min=1e-12), total[:, 0] > 0


def mask_votes(probs: Tensor, regions: Tensor, cells: Tensor) -> Tensor:
    """B×K softmax mass inside K candidate masks: Σ_i p_i · (share of token i's footprint inside
    the mask). `probs` B×N, `regions` B×N×(h·w) footprints, `cells` B×K×(h·w) mask fractions."""
    inside = regions @ cells.transpose(1, 2)  # B×N×K
    share = inside / regions.sum(-1, keepdim=True).clamp(min=1e-12)
    return (probs[:, None, :] @ share).squeeze(1)


def word_query(table: nn.Embedding, ids: Tensor, keep: Tensor) -> Tensor:
    """B×dim: the mean of `table`'s embeddings of the token ids B×T where `keep` (a bag of the
    prompt's words)."""
    w = keep.to(table.weight.dtype)[..., None]
    return (table(ids) * w).sum(1) / w.sum(1).clamp(min=1)


def word_states(table: nn.Embedding, ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The prompt's words in order for the re-ranker's context layers: B×T'×dim, each kept
    token's embedding in `table` plus a sinusoidal code of its place among the kept tokens (the
    <image> slot and padding do not count), and B×T' which slots are words (T' = the most kept in
    a sample)."""
    length = max(int(keep.sum(1).max()), 1)
    # the kept tokens moved to the front in their order (a stable sort on "dropped")
    front = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :length]
    mask = keep.gather(1, front)
    dim = table.embedding_dim
    out = table(ids.gather(1, front))
    place = torch.arange(length, device=ids.device, dtype=out.dtype)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=ids.device, dtype=out.dtype) * (-math.log(100.0) / dim)
    )
    code = torch.zeros(length, dim, device=ids.device, dtype=out.dtype)
    code[:, 0::2], code[:, 1::2] = torch.sin(place * freq), torch.cos(place * freq)
    return (out + code) * mask[..., None], mask


def pool_tokens(tokens: Tensor, regions: Tensor, cells: Tensor) -> Tensor:
    """B×K×D: the mean of the B×N×D visual tokens over each of K masks, each token weighted by
    its footprint's overlap with the mask (Σ_cells share × the cell's fraction inside; `regions`
    B×N×(h·w), `cells` B×K×(h·w)); zeros for a mask no token overlaps."""
    overlap = cells @ regions.transpose(1, 2)  # B×K×N
    weights = overlap / overlap.sum(-1, keepdim=True).clamp(min=1e-12)
    return weights @ tokens


def mask_geometry(masks: Tensor, shape_size: int) -> Tensor:
    """K×(7 + s²) geometry of K binary masks (K×H×W): bbox, centroid, area and the s×s shape code,
    as the `semantic` projector's SSPE reads a superpixel (`superpixel_geometry`, each mask
    alone; its area column is then 1); zeros for an empty mask."""
    labels = torch.where(masks.bool(), 0, -1)
    return superpixel_geometry(labels, 1, int(shape_size))[:, 0]


def cell_iou(cells: Tensor, target: Tensor) -> Tensor:
    """B×K IoU on the feature grid between K candidate masks (B×K×(h·w) cell fractions) and the
    target (B×(h·w)): Σ min / Σ max; 0 when both are empty."""
    t = target[:, None, :].expand_as(cells)
    inter = torch.minimum(cells, t).sum(-1)
    return inter / torch.maximum(cells, t).sum(-1).clamp(min=1e-12)


def rerank_loss(logits: Tensor, iou: Tensor, min_iou: float = 0.5) -> tuple[Tensor, Tensor]:
    """−log of the softmax mass (over the candidates' scores B×K, −inf = no candidate) on the
    candidates that overlap the target with IoU ≥ `min_iou` — the top tokens often point at one
    object twice, and either mask is right — over the samples that have such a candidate; and
    how often the top-scored candidate is one of them. Zero (with a gradient path) when no
    sample has one."""
    good = (iou >= min_iou) & torch.isfinite(logits)
    valid = good.any(-1)
    logp = logits.float().masked_fill(torch.isinf(logits), -1e4).log_softmax(-1)
    per = -torch.logsumexp(logp.masked_fill(~good, -1e4), -1)
    n = valid.sum().clamp(min=1)
    hits = good.gather(1, logp.argmax(-1, keepdim=True))[:, 0] & valid
    return (per * valid).sum() / n, hits.sum() / n


def sample_targets(target: Tensor) -> Tensor:
    """One-hot B×N rows: one token per sample drawn with probability ∝ its target weight (rows
    of `target` sum to 1, or are all zero — those give an all-zero row)."""
    mass = target.float().clamp(min=0)
    has = mass.sum(-1, keepdim=True) > 0
    pick = torch.multinomial(torch.where(has, mass, torch.ones_like(mass)), 1)[:, 0]
    return F.one_hot(pick, target.shape[-1]).to(target.dtype) * has.to(target.dtype)


def grounding_loss(logits: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the samples with a target of the cross-entropy towards the target weights, and
    top-1 accuracy (the highest-scored token is a highest-weighted target token)."""
    logp = logits.float().log_softmax(-1)
    per_sample = -(target * logp.masked_fill(torch.isinf(logits), 0.0)).sum(-1)
    n = valid.sum().clamp(min=1)
    loss = (per_sample * valid).sum() / n
    return loss, picked_hits(logits.argmax(-1), target, valid).sum() / n


def picked_hits(pick: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """B bool: token `pick` (B indices) is a highest-weighted target token (False without a
    target)."""
    best = target.gather(1, pick[:, None])[:, 0]
    return (best >= target.amax(-1) - 1e-6) & valid
