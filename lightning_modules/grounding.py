"""Grounding head: the [SEG] state points at the visual tokens that cover the target.

LISA's prompt path ([SEG] hidden → MLP → SAM prompt) relies on an LLM that already links words to
image regions (LLaVA's pre-training). A small LLM trained from scratch on a few thousand sentences
does not learn that link from the mask loss alone: its [SEG] state collapses to one constant
"typical object" prompt (docs/BENCHMARKS.md, `svp diagnose grounding`). This head gives the link a
direct training signal and, optionally, a direct path to the mask decoder:

* **loss** (`grounding.weight`): scores s_i = ⟨q([SEG]), k(v_i)⟩/√d between the [SEG] state and the
  LLM's last hidden state of every visual token; a soft cross-entropy pulls softmax(s) towards
  the tokens whose footprint (`ProjectorOutput.regions`) covers the target mask, each weighted by
  coverage × purity (overlap² / footprint area), so a large background token that grazes the
  target gets little weight.
* **pointer** (`grounding.pointer`): the softmax(s)-weighted mean of SAM's Fourier point code at
  each token's footprint centroid, mapped by a linear layer and added to the [SEG] state before
  the prompt MLP: the prompt then carries *where* the pointed-at tokens are, which SAM's decoder
  was trained to read.

* **fusion** (`grounding.fusion_layers`): in a causal LLM the visual tokens come before the
  sentence, so their hidden states never see it; only the single [SEG] state can relate the two.
  With `fusion_layers` > 0 the head first runs a small bidirectional encoder over the [SEG] state
  (as a query slot), the visual states and the sentence's hidden states, then scores the fused
  visual states against the fused query — the visual tokens are read *in the light of* the
  sentence, as in the `transformer` pointer of `svp diagnose pointing`.

All are off by default (pure LISA, as DESIGN §1); the tiny preset turns them on. Projectors whose
tokens have no footprint (`resampler`) get none, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.projectors.semantic import GEOMETRY_DIM, superpixel_geometry

GROUNDING_KEYS = ("llm", "tokens")
POINTER_EVAL = ("soft", "argmax")
TEACHER_POINTERS = ("mixture", "sample")
RERANK_SOURCES = ("tokens", "features")
RERANK_QUERIES = ("seg", "words")
GROUNDING_LOSSES = ("soft_ce", "mass")


@dataclass
class GroundingConfig:
    weight: float = 0.0  # weight of the grounding loss in the total loss (0 = no loss)
    pointer: bool = False  # add the pointed-at tokens' location to the [SEG] state
    dim: int = 64  # width of the query/key projections
    # what the keys are made from: `llm` = the LLM's last hidden state of each visual token,
    # `tokens` = the projector's visual tokens themselves (before the LLM)
    keys_from: str = "llm"
    # training: the pointer points at the target's tokens (its target weights) instead of the
    # predicted ones, so the mask decoder learns to read a location while the scores still learn
    teacher_forcing: bool = False
    # what the teacher-forced pointer carries: `mixture` = the target weights' mean of the
    # target tokens' point codes (a blur over the target when it spans many tokens, as `mlp`
    # patches do), `sample` = one target token drawn ∝ its weight, a single point like the
    # `argmax` pointer gives at evaluation
    teacher_pointer: str = "mixture"
    # evaluation: point with the softmax weights (`soft`) or at the top-scored token (`argmax`)
    pointer_eval: str = "soft"
    # evaluation with `argmax`: pick the token with the most softmax mass within a Gaussian of
    # this width (a fraction of the feature grid's side) around its footprint centroid, instead
    # of the single top-scored token — one patch of an object that spans twenty is a noisy
    # vote; 0 = the top-scored token
    pointer_smooth: float = 0.0
    # evaluation with `argmax`: decode a mask for each of the top `pointer_vote` tokens (by the
    # possibly smoothed scores) and point at the one whose mask holds the most softmax mass —
    # the scores vote per object, with the objects' own outlines; 0 = off
    pointer_vote: int = 0
    # the grounding loss: `soft_ce` = cross-entropy towards the target weights (spread the scores
    # over every target token as the weights say), `mass` = −log of the softmax mass on the
    # target (each token counted by its weight relative to the target's best token), which
    # lets the scores pick any part of the target — for `mlp`, whose target spans ≈ 20 patches,
    # the few patches that show it best
    loss: str = "soft_ce"
    # bidirectional encoder layers over [SEG] query, visual states and sentence states before
    # scoring (0 = score the LLM's states directly)
    fusion_layers: int = 0
    fusion_heads: int = 4
    # add a learned map of SAM's Fourier code of each token's footprint centroid to its key, so
    # the scores can prefer places ("the leftmost ...") even when the tokens carry no position
    # of their own (`mlp` patches; `semantic` tokens have SSPE)
    key_geometry: bool = False
    # a second, object-level scorer (training and evaluation; needs `pointer`): decode a mask for
    # each of the top `rerank` tokens and score each mask by the visual states pooled inside it
    # (area-weighted, as the `semantic` projector pools features into a superpixel) plus the
    # mask's place and size; trained towards the candidate that best overlaps the target, and at
    # evaluation with `argmax` the pointer takes the best-scored candidate. A patch scores what
    # it shows; a pooled mask scores the whole object. With `pointer_vote` > 0 as well, the vote
    # picks at evaluation and the re-ranker is a training signal only (it reaches the visual
    # tokens through the pooling). 0 = off
    rerank: int = 0
    rerank_weight: float = 1.0  # weight of the re-ranking loss in the total loss
    # what the re-ranker pools inside each candidate mask: `tokens` = the visual states the
    # pointer scores (`keys_from`), `features` = the vision tower's features themselves, before
    # the projector — a mean of the tower's states over an object is what the `semantic`
    # projector makes each token from (and what the tiny preset's SAM was pre-trained to read
    # shape, size, colour and texture from); a mean of the projected patches is not
    rerank_from: str = "tokens"
    # add the vote's evidence to the re-ranker's scores: a learned weight (starting at 1) times
    # the log of the softmax mass inside each candidate (`mask_votes`), so the re-ranker starts
    # as the vote and learns what the pooled object adds to it
    rerank_vote: bool = False
    # add each candidate mask's outline to what the re-ranker reads: its bbox, centroid and the
    # share of each of s×s bins of its bbox that it covers (the `semantic` projector's SSPE shape
    # code, `superpixel_geometry`), s = `rerank_shape`; patches do not show an object's shape,
    # a decoded mask does. 0 = off
    rerank_shape: int = 0
    # what the re-ranker matches the candidates against: `seg` = the [SEG] state (as the pointer
    # does), `words` = a bag of the prompt's words (the mean of the re-ranker's own embedding of
    # each text token), read straight from the sentence, not through the LLM — for a small LLM
    # trained from scratch, whose [SEG] state carries the sentence's attributes poorly
    rerank_query: str = "seg"
    # spread the re-ranker's candidates over the image: take the tokens in order of score but
    # skip one whose footprint centroid lies within this distance (a fraction of the feature
    # grid's side, in each direction) of a candidate already taken. `mlp`'s top patches often
    # sit on one object, so its top 8 decode few distinct masks; 0.1 on a 16×16 grid skips a
    # taken patch's 8 neighbours. 0 = the plain top tokens
    rerank_spread: float = 0.0
    # layers of a bidirectional encoder over the re-ranker's query, its K candidates (each as the
    # re-ranker reads it) and, with `rerank_query=words`, the prompt's words in order (their
    # re-ranker embeddings plus a code of their place in the sentence), before the candidates are
    # scored: each candidate is then scored in the light of the others ("the leftmost star", "the
    # second circle from the top") and of the word order ("the star left of the circle" is not
    # "the circle left of the star"); a bag of words scoring each mask alone sees neither. The
    # layers start as the identity (`FusionLayer`), i.e. as the plain re-ranker. 0 = off
    rerank_context: int = 0
    # add a bag of the prompt's words to the pointer's own query (the [SEG] state's projection):
    # the mean of a learned embedding of each text token, zero at the start so the pointer starts
    # as the plain one. The pointer's top tokens are the re-ranker's and the vote's candidates;
    # with a small LLM trained from scratch the [SEG] state alone ranks the target's patches
    # below the top 4 about half the time (session 12). Measured worse with the preset's
    # re-ranker (`mlp` seeds 0/1: 0.294 / 0.294 against 0.331 / 0.301; session 13), so off
    query_words: bool = False

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or self.pointer


class FusionLayer(nn.Module):
    """Pre-norm bidirectional transformer layer with a key-padding mask.

    Written out (rather than `nn.TransformerEncoderLayer`) so that eval mode takes the same
    arithmetic as training — no fused fast path — and padded samples stay bit-comparable. Both
    residual branches end in zero-initialised layers: a fresh layer is the identity, so the head
    starts as the plain one and learns what to take from the sentence (trained from scratch with
    a random residual the head did not learn to point at all within 1,200 steps).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
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


class GroundingHead(nn.Module):
    """Scores visual tokens against the [SEG] state; optionally turns scores into a point code."""

    def __init__(
        self,
        hidden: int,
        dim: int,
        pe_dim: int,
        pointer: bool,
        fusion_layers: int = 0,
        fusion_heads: int = 4,
        key_geometry: bool = False,
        rerank: bool = False,
        rerank_in: int | None = None,
        rerank_vote: bool = False,
        rerank_geometry: int = 0,
        rerank_vocab: int = 0,
        query_vocab: int = 0,
        rerank_context: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(hidden, dim)
        self.key = nn.Linear(hidden, dim, bias=False)  # a key bias would cancel in the softmax
        # `query_words`: a learned embedding of each vocabulary token, averaged over the prompt's
        # words and added to the query; zero at the start
        self.query_words = nn.Embedding(query_vocab, dim) if query_vocab else None
        if self.query_words is not None:
            nn.init.zeros_(self.query_words.weight)
        self.geometry = nn.Linear(pe_dim, dim, bias=False) if key_geometry else None
        if self.geometry is not None:
            # starts at zero: the scores first learn from what the tokens show, and place joins
            # as it helps (a random map let some seeds settle on a "usual place"; session 10)
            nn.init.zeros_(self.geometry.weight)
        self.point = nn.Linear(pe_dim, hidden) if pointer else None
        self.fusion = nn.ModuleList(FusionLayer(hidden, fusion_heads) for _ in range(fusion_layers))
        if fusion_layers:
            # role of each slot: [SEG] query, visual token, sentence token
            self.role = nn.Parameter(torch.randn(3, hidden) * 0.02)
        self.rerank_query = nn.Linear(hidden, dim) if rerank and not rerank_vocab else None
        # `rerank_query=words`: an embedding of each token of the vocabulary, averaged over the text
        self.rerank_words = nn.Embedding(rerank_vocab, dim) if rerank and rerank_vocab else None
        # the pooled states (width `rerank_in`, default the LLM's), normalised: the tower's
        # features are on their own scale
        pooled = hidden if rerank_in is None else int(rerank_in)
        self.rerank_norm = nn.LayerNorm(pooled) if rerank and rerank_in is not None else None
        # weight of the vote's log mass in the re-ranker's scores (`rerank_vote`)
        self.rerank_vote = nn.Parameter(torch.ones(())) if rerank and rerank_vote else None
        # pooled state ⊕ the mask centroid's point code ⊕ log of the mask's share of the grid
        # (⊕ the mask's geometry and shape code, `rerank_geometry` wide, with `rerank_shape`)
        width = pooled + pe_dim + 1 + int(rerank_geometry)
        self.rerank_key = (
            nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            if rerank
            else None
        )
        # `rerank_context`: encoder layers over [query, candidates, words], a role vector each
        self.rerank_context = nn.ModuleList(
            FusionLayer(dim, fusion_heads) for _ in range(rerank_context if rerank else 0)
        )
        if len(self.rerank_context):
            self.rerank_role = nn.Parameter(torch.randn(3, dim) * 0.02)

    def _rerank_context(
        self, q: Tensor, keys: Tensor, real: Tensor, words: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """The query (B×dim) and candidate keys (B×K×dim) after the `rerank_context` layers over
        [query, candidates (where `real`), words (where kept)]."""
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

    def fuse(
        self, seg_hidden: Tensor, vis_hidden: Tensor, mask: Tensor, text: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The [SEG] state (B×D) and the visual states (B×N×D) after the fusion layers, which let
        them attend to each other and to the sentence states (B×T×D, valid where `text_mask`)."""
        n = vis_hidden.shape[1]
        x = torch.cat(
            [
                (seg_hidden + self.role[0])[:, None],
                vis_hidden + self.role[1],
                text + self.role[2],
            ],
            1,
        )
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask, text_mask], 1)
        for layer in self.fusion:
            x = layer(x, keep)
        return x[:, 0], x[:, 1 : 1 + n]

    def logits(
        self,
        seg_hidden: Tensor,
        vis_hidden: Tensor,
        mask: Tensor,
        codes: Tensor | None = None,
        words: Tensor | None = None,
    ) -> Tensor:
        """B×N scores of the B×N×D visual states against the B×D [SEG] states; −inf on padding.
        With `key_geometry`, `codes` (B×N×C point codes of the tokens' centroids) join the keys;
        with `query_words`, `words` (B×dim, `word_query` of `query_words`) joins the query."""
        q = self.query(seg_hidden)
        if self.query_words is not None:
            if words is None:
                raise ValueError("query_words needs the prompt's bag of words")
            q = q + words
        keys = self.key(vis_hidden)
        if self.geometry is not None:
            if codes is None:
                raise ValueError("key_geometry needs the tokens' point codes")
            keys = keys + self.geometry(codes)
        scores = (keys @ q[..., None]).squeeze(-1) / math.sqrt(self.dim)
        return scores.masked_fill(~mask, -math.inf)

    def rerank_logits(
        self,
        seg_hidden: Tensor,
        pooled: Tensor,
        codes: Tensor,
        area: Tensor,
        real: Tensor,
        votes: Tensor | None = None,
        geometry: Tensor | None = None,
        words: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """B×K scores of K candidate masks (their pooled states B×K×D, centroid point codes
        B×K×C and shares of the grid B×K) against the B×D [SEG] states — or with
        `rerank_query=words`, `seg_hidden` is the B×dim query from `word_query`; −inf where not
        `real`. With `rerank_vote`, plus the learned weight × log of `votes` (B×K softmax mass
        inside each candidate, `mask_votes`); with `rerank_shape`, `geometry` (B×K×G) joins the
        inputs. With `rerank_context` layers, query and candidates (and `words`: the prompt's
        word states B×T×dim and which are real B×T, `word_states`) pass through them first."""
        q = seg_hidden if self.rerank_query is None else self.rerank_query(seg_hidden)
        if self.rerank_norm is not None:
            pooled = self.rerank_norm(pooled)
        parts = [pooled, codes, area.clamp(min=1e-4).log()[..., None]]
        if geometry is not None:
            parts.append(geometry.to(pooled.dtype))
        x = torch.cat(parts, -1)
        keys = self.rerank_key(x)
        if len(self.rerank_context):
            q, keys = self._rerank_context(q, keys, real, words)
        scores = (keys @ q[..., None]).squeeze(-1) / math.sqrt(self.dim)
        if self.rerank_vote is not None:
            if votes is None:
                raise ValueError("rerank_vote needs the candidates' vote mass")
            scores = scores + self.rerank_vote * votes.clamp(min=1e-6).log()
        return scores.masked_fill(~real, -math.inf)

    def point_code(self, weights: Tensor, codes: Tensor) -> Tensor:
        """B×D: the `weights`-weighted (B×N, rows sum to 1) mean of the tokens' B×N×C point codes,
        mapped to D."""
        return self.point((weights[..., None] * codes).sum(1))


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


def smoothed_scores(logits: Tensor, centres: Tensor, sigma: float) -> Tensor:
    """B×N log of the softmax mass near each token: Σ_j p_j · exp(−|c_i − c_j|² / 2σ²) over the
    tokens j (centroids `centres`, B×N×2 in [0, 1]); −inf on padding. σ = 0 gives `logits`."""
    if sigma <= 0:
        return logits
    probs = logits.float().softmax(-1)
    dist2 = torch.cdist(centres.float(), centres.float()).square()
    mass = (torch.exp(-dist2 / (2 * sigma**2)) @ probs[..., None]).squeeze(-1)
    return mass.clamp(min=1e-30).log().masked_fill(torch.isinf(logits), -math.inf)


def mask_votes(probs: Tensor, regions: Tensor, cells: Tensor) -> Tensor:
    """B×K softmax mass inside K candidate masks: Σ_i p_i · (share of token i's footprint inside
    the mask). `probs` B×N, `regions` B×N×(h·w) footprints, `cells` B×K×(h·w) mask fractions."""
    inside = regions @ cells.transpose(1, 2)  # B×N×K
    share = inside / regions.sum(-1, keepdim=True).clamp(min=1e-12)
    return (probs[:, None, :] @ share).squeeze(1)


def pool_in_masks(states: Tensor, regions: Tensor, cells: Tensor) -> Tensor:
    """B×K×D: the mean of the B×N×D states over each of K masks, each token weighted by how much
    of its footprint (`regions` B×N×(h·w)) the mask (`cells` B×K×(h·w) fractions) covers;
    zeros for an empty mask."""
    overlap = regions @ cells.transpose(1, 2)  # B×N×K, in cells
    weights = overlap / overlap.sum(1, keepdim=True).clamp(min=1e-12)
    return weights.transpose(1, 2) @ states


def word_query(table: nn.Embedding, ids: Tensor, keep: Tensor) -> Tensor:
    """B×dim: the mean of `table`'s embeddings of the token ids B×T where `keep` (a bag of the
    prompt's words: `GroundingHead.rerank_words` or `.query_words`)."""
    w = keep.to(table.weight.dtype)[..., None]
    return (table(ids) * w).sum(1) / w.sum(1).clamp(min=1)


def word_states(table: nn.Embedding, ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The prompt's words in order for `rerank_context`: B×T'×dim, each kept token's embedding
    in `table` plus a sinusoidal code of its place among the kept tokens (the <image> slot and
    padding do not count), and B×T' which slots are words (T' = the most kept in a sample)."""
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


def pool_cells(states: Tensor, cells: Tensor) -> Tensor:
    """B×K×C: the mean of the B×(h·w)×C grid states over each of K masks (`cells` B×K×(h·w)
    fractions), each cell weighted by its fraction inside; zeros for an empty mask."""
    weights = cells / cells.sum(-1, keepdim=True).clamp(min=1e-12)
    return weights @ states


def mask_geometry_dim(shape_size: int) -> int:
    """Width of `mask_geometry`'s rows."""
    return GEOMETRY_DIM + int(shape_size) ** 2


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


def grounding_loss(
    logits: Tensor, target: Tensor, valid: Tensor, kind: str = "soft_ce"
) -> tuple[Tensor, Tensor]:
    """Mean over the samples with a target of the `soft_ce` or `mass` loss (GroundingConfig.loss),
    and top-1 accuracy (the highest-scored token is a highest-weighted target token)."""
    logp = logits.float().log_softmax(-1)
    if kind == "mass":
        rel = target.float() / target.float().amax(-1, keepdim=True).clamp(min=1e-12)
        # samples without a target count every token (a finite, unused value: no NaN gradient)
        rel = torch.where(valid[:, None], rel, torch.ones_like(rel))
        per_sample = -torch.logsumexp(logp + rel.log(), -1)
    elif kind == "soft_ce":
        per_sample = -(target * logp.masked_fill(torch.isinf(logits), 0.0)).sum(-1)
    else:
        raise ValueError(f"unknown grounding loss {kind!r}; one of {', '.join(GROUNDING_LOSSES)}")
    n = valid.sum().clamp(min=1)
    loss = (per_sample * valid).sum() / n
    return loss, pointing_hits(logits, target, valid).sum() / n


def pointing_hits(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """B bool: the highest-scored token is a highest-weighted target token (False without a
    target)."""
    return picked_hits(logits.argmax(-1), target, valid)


def picked_hits(pick: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """B bool: token `pick` (B indices) is a highest-weighted target token (False without a
    target)."""
    best = target.gather(1, pick[:, None])[:, 0]
    return (best >= target.amax(-1) - 1e-6) & valid
