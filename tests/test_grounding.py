"""Grounding pointer: targets, losses, accuracy, centroids and the re-ranker's parts against
hand-computed cases."""

import math

import torch

from lightning_modules.grounding import (
    GroundingConfig,
    Pointer,
    cell_iou,
    grid_targets,
    grounding_loss,
    mask_votes,
    picked_hits,
    pool_tokens,
    rerank_loss,
    sample_targets,
    spread_top,
    target_distribution,
    token_centroids,
    word_query,
    word_states,
)


def _pointer(hidden=8, dim=4, pe_dim=6, token_dim=5, vocab=10, **cfg) -> Pointer:
    return Pointer(hidden, pe_dim, token_dim, vocab, GroundingConfig(dim=dim, pointer=True, **cfg))


def test_target_weights_are_coverage_times_purity():
    # 4 cells; token 0 = cells {0, 1}, token 1 = cell 2, token 2 = cell 3; target fills cells 1, 2
    regions = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]])
    cells = torch.tensor([[0.0, 1, 1, 0]])
    target, valid = target_distribution(regions, cells)
    # overlap²/area: token 0 → 1/2, token 1 → 1, token 2 → 0; normalised
    torch.testing.assert_close(target, torch.tensor([[1 / 3, 2 / 3, 0.0]]))
    assert valid.tolist() == [True]
    target, valid = target_distribution(regions, torch.zeros(1, 4))
    assert valid.tolist() == [False] and (target == 0).all()


def test_grounding_loss_and_accuracy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf], [5.0, 0.0, 0.0]])
    target = torch.tensor([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([True, False])  # the second sample has no target: ignored
    loss, acc = grounding_loss(logits, target, valid)
    # softmax of the first row: 1/4, 3/4, 0
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert abs(float(loss) - expected) < 1e-6
    assert float(acc) == 1.0


def test_token_centroids():
    regions = torch.zeros(1, 3, 4)  # a 2×2 grid, cells in raster order
    regions[0, 0, 0] = 1.0  # top-left cell
    regions[0, 1, [1, 3]] = 1.0  # right column
    centres = token_centroids(regions, 2, 2)
    torch.testing.assert_close(centres[0, 0], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(centres[0, 1], torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(centres[0, 2], torch.tensor([0.5, 0.5]))  # empty footprint


def test_grid_targets_pool_each_mask():
    mask = torch.zeros(4, 4, dtype=torch.uint8)
    mask[:2, :2] = 1
    mask[2, 2] = 1
    cells = grid_targets([mask], 2, 2, "cpu")
    torch.testing.assert_close(cells, torch.tensor([[1.0, 0.0, 0.0, 0.25]]))


def test_head_scores_mask_padding_and_point_code_follows_the_scores():
    torch.manual_seed(0)
    head = _pointer(rerank=0)
    assert head.rerank_key is None and len(head.rerank_context) == 0
    mask = torch.tensor([[True, True, False]])
    logits = head.logits(torch.randn(1, 8), torch.randn(1, 3, 8), mask)
    assert torch.isinf(logits[0, 2]) and torch.isfinite(logits[0, :2]).all()
    codes = torch.randn(1, 3, 6)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(head.point_code(one_hot, codes), head.point(codes[:, 0]))
    half = torch.tensor([[0.5, 0.5, 0.0]])
    torch.testing.assert_close(head.point_code(half, codes), head.point(codes[:, :2].mean(1)))


def test_pointing_hits_by_hand():
    logits = torch.tensor([[2.0, 1.0, -math.inf], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    # tie for the top weight counts; the second sample points at a lesser target token; the third
    # has no target
    assert picked_hits(logits.argmax(-1), target, valid).tolist() == [True, False, False]


def test_sampled_teacher_points_are_one_target_token_drawn_by_weight():
    target = torch.tensor([[0.0, 0.25, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([sample_targets(target) for _ in range(4000)])
    assert ((draws == 0) | (draws == 1)).all()
    assert (draws[:, 0].sum(-1) == 1).all() and (draws[:, 1] == 0).all()  # no target: no point
    assert (draws[:, 0, [0, 3]] == 0).all()  # never a token without target weight
    share = draws[:, 0, 2].mean().item()
    assert abs(share - 0.75) < 0.03, share


def test_mask_votes_sum_the_mass_inside_each_mask():
    """Four one-cell tokens on a 2×2 grid with softmax mass 0.1, 0.2, 0.3, 0.4: a mask over the
    top row holds 0.3, one over the right column 0.6, one over half of the last cell 0.2."""
    regions = torch.eye(4)[None]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    cells = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.5]]])
    torch.testing.assert_close(mask_votes(probs, regions, cells), torch.tensor([[0.3, 0.6, 0.2]]))
    # a token of two cells, half inside the mask, brings half its mass
    wide = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    half = mask_votes(torch.tensor([[0.8, 0.2]]), wide, torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]))
    torch.testing.assert_close(half, torch.tensor([[0.4]]))


def test_pool_tokens_weights_each_token_by_its_overlap_with_the_mask():
    """Token 0 covers cells 0–1, token 1 cell 2; a mask over half of cell 0 and all of cell 2
    overlaps them 0.5 and 1, so it pools (0.5·[3, 0] + 1·[0, 3]) / 1.5 = [1, 2]; a mask over
    cell 3, which no token covers, pools to zeros."""
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 3.0]]])
    regions = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    cells = torch.tensor([[[0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    pooled = pool_tokens(tokens, regions, cells)
    torch.testing.assert_close(pooled, torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))


def test_mask_geometry_reads_a_mask_as_sspe_reads_a_superpixel():
    """An 8×8 frame: a 4×4 square at rows 2–5, cols 0–3 has bbox (0, 0.25, 0.5, 0.75), centroid
    (0.25, 0.5) and a full 2×2 shape code; a triangle (the lower-left half of a 4×4 box, with its
    diagonal) fills its bins 3/4, 0, 1, 3/4; an empty mask gives zeros."""
    from lightning_modules.grounding import mask_geometry

    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 0:4] = True
    for r in range(4):
        masks[1, 4 + r, 4 : 4 + r + 1] = True  # lower-left triangle with the diagonal
    geo = mask_geometry(masks, 2)
    assert geo.shape == (3, 11)  # bbox, centroid, area and the 2×2 shape code
    torch.testing.assert_close(geo[0, :6], torch.tensor([0.0, 0.25, 0.5, 0.75, 0.25, 0.5]))
    torch.testing.assert_close(geo[0, 7:], torch.ones(4))
    # the triangle's bins of 2×2 pixels: top-left holds 1 + 2 of 4, top-right none, bottom-left
    # all, bottom-right 1 + 2
    torch.testing.assert_close(geo[1, 7:], torch.tensor([0.75, 0.0, 1.0, 0.75]))
    assert (geo[2] == 0).all()


def test_cell_iou_by_hand():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    cells = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]])
    # identical 1; one shared cell of three 1/3; half a cell inside, min 0.5 / max 2 = 0.25
    torch.testing.assert_close(cell_iou(cells, target), torch.tensor([[1.0, 1 / 3, 0.25]]))
    assert cell_iou(torch.zeros(1, 1, 4), torch.zeros(1, 4)).item() == 0.0


def test_rerank_loss_by_hand():
    """Sample 0: candidates 1 and 2 overlap the target (IoU ≥ 0.5) → −log of their softmax mass
    under scores [0, 1, −1]; sample 1: none does (its padding slot's 0.9 does not count) → left
    out of the mean."""
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, -math.inf]], requires_grad=True)
    iou = torch.tensor([[0.3, 0.8, 0.6], [0.1, 0.2, 0.9]])
    loss, acc = rerank_loss(logits, iou)
    p = torch.tensor([0.0, 1.0, -1.0]).softmax(-1)
    torch.testing.assert_close(loss, -(p[1] + p[2]).log())
    assert acc.item() == 1.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()
    none, _ = rerank_loss(logits, torch.zeros(2, 3))
    assert none.item() == 0.0


def test_word_query_is_the_mean_embedding_of_the_kept_tokens():
    """The re-ranker's query is the mean of the kept tokens' embeddings (padding and the <image>
    token left out), so the same sentence gives the same query at any padding."""
    head = _pointer()
    ids = torch.tensor([[3, 5, 0, 0], [3, 5, 7, 9]])
    keep = torch.tensor([[True, True, False, False], [True, True, True, False]])
    emb = head.rerank_words.weight
    q = word_query(head.rerank_words, ids, keep)
    torch.testing.assert_close(q[0], (emb[3] + emb[5]) / 2)
    torch.testing.assert_close(q[1], (emb[3] + emb[5] + emb[7]) / 3)


def test_spread_top_skips_tokens_near_those_taken():
    # a 3×3 grid of single-cell tokens (centroid spacing 1/3), scores falling in reading order
    centres = token_centroids(torch.eye(9)[None], 3, 3)
    scores = -torch.arange(9.0)[None]
    plain, real = spread_top(scores, centres, 4, 0.0)
    assert plain.tolist() == scores.topk(4).indices.tolist() and real.all()
    # 0.4 > 1/3: each pick skips its 8 neighbours; the corners are 2/3 apart
    top, real = spread_top(scores, centres, 4, 0.4)
    assert top.tolist() == [[0, 2, 6, 8]] and real.all()
    # 0.3 < 1/3: nothing is near enough to skip
    assert spread_top(scores, centres, 4, 0.3)[0].tolist() == [[0, 1, 2, 3]]
    # padding (−inf) is never taken; once nothing is left the slots repeat the first pick and
    # are flagged as not real
    scores[0, 3:] = -math.inf
    top, real = spread_top(scores, centres, 4, 0.4)
    assert top.tolist() == [[0, 2, 0, 0]] and real.tolist() == [[True, True, False, False]]
    # each sample by its own scores: batched picks are the picks alone
    both = torch.cat([scores, torch.arange(9.0)[None]])
    top2, real2 = spread_top(both, centres.expand(2, -1, -1), 4, 0.4)
    assert top2[0].tolist() == [0, 2, 0, 0] and real2[0].tolist() == real[0].tolist()
    assert top2[1].tolist() == [8, 6, 2, 0] and real2[1].all()


def test_word_states_are_the_kept_words_in_order_with_their_place():
    """The context layers read the prompt's words in order: the kept tokens' embeddings packed to
    the front, each plus a code of its place among the kept ones, so a sample's word states do
    not depend on where its <image> slot or its padding sit."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 6)
    ids = torch.tensor([[7, 3, 5, 2, 0], [3, 5, 0, 0, 0]])
    keep = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    states, mask = word_states(table, ids, keep)
    assert states.shape == (2, 3, 6) and mask.tolist() == [[True] * 3, [True, True, False]]
    # the same two words first in both rows (3, 5): the same states; the padding slot is zero
    torch.testing.assert_close(states[0, :2], states[1, :2])
    assert (states[1, 2] == 0).all()
    # place codes differ: the same word at another place has another state
    first, _ = word_states(table, torch.tensor([[5, 3]]), torch.tensor([[True, True]]))
    assert not torch.allclose(first[0, 0], states[0, 1])
    # what is not kept never reaches the states
    other = ids.clone()
    other[0, 0], other[0, 4] = 9, 8
    torch.testing.assert_close(word_states(table, other, keep)[0], states)


def test_rerank_context_starts_as_the_plain_reranker_and_then_compares_candidates():
    """Fresh `rerank_context` layers are the identity: the scores are the plain re-ranker's.
    Once trained (random weights here) a candidate's score depends on the other candidates and
    on the word order, and padding candidates still change nothing."""
    torch.manual_seed(0)
    plain = _pointer(rerank_context=0)
    ctx = _pointer(rerank_context=1)
    ctx.load_state_dict(plain.state_dict(), strict=False)
    ids, keep = torch.tensor([[3, 5, 7]]), torch.ones(1, 3, dtype=torch.bool)
    q, words = word_query(ctx.rerank_words, ids, keep), word_states(ctx.rerank_words, ids, keep)
    pooled, codes, area = torch.randn(1, 3, 5), torch.randn(1, 3, 6), torch.rand(1, 3)
    votes, geometry = torch.rand(1, 3), torch.rand(1, 3, 7 + 16)
    real = torch.tensor([[True, True, False]])

    def scores(head, pooled=pooled, words=words):
        return head.rerank_logits(q, pooled, codes, area, real, votes, geometry, words)

    torch.testing.assert_close(scores(ctx), scores(plain))
    assert torch.isinf(scores(ctx)[0, 2])
    with torch.no_grad():
        for p in ctx.rerank_context.parameters():
            p.normal_(0, 0.5)
    base = scores(ctx)
    other = pooled.clone()
    other[0, 1] += torch.randn(5)  # change candidate 1 (not by a constant: LayerNorm drops it)
    assert not torch.allclose(scores(ctx, other)[0, 0], base[0, 0])
    assert torch.allclose(scores(plain, other)[0, 0], scores(plain)[0, 0])
    pad = pooled.clone()
    pad[0, 2] += torch.randn(5)  # the padding candidate: nothing moves
    torch.testing.assert_close(scores(ctx, pad), base)
    swapped = word_states(ctx.rerank_words, ids.flip(1), keep)  # same bag, other order
    assert not torch.allclose(scores(ctx, words=swapped), base)
