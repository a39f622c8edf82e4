"""The SAM builder (SAM-format checkpoints) and `train_sam` on a tiny SynthRef."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_SAM
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from common.errors import ConfigError, DataError
from common.sam import (
    SamConfig,
    build_sam,
    load_sam,
    save_sam,
    sidecar_path,
)
from datamodules.refer import ReferDataset
from lightning_modules.mask_decoder import decode_masks
from lightning_modules.sam_pretraining import training as sam_training
from lightning_modules.sam_pretraining.training import (
    SamInstanceDataset,
    SamTrainingModule,
    TrainSamConfig,
    collate_instances,
    evaluate_single_point,
    farthest_point,
    mask_iou,
    train_sam,
)


def _tiny_sam(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    return build_sam(TINY_SAM)


def _prompted(sam: Sam) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 64, 48)).float()
    points = torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]])
    return sam(
        [
            {
                "image": image,
                "original_size": (64, 48),
                "point_coords": points,
                "point_labels": torch.ones(2, 1, dtype=torch.int),
            }
        ],
        multimask_output=True,
    )


def test_build_custom_forward_shapes():
    sam = _tiny_sam()
    assert isinstance(sam, Sam)
    out = _prompted(sam)[0]
    assert out["masks"].shape == (2, 3, 64, 48)
    assert out["iou_predictions"].shape == (2, 3)
    assert out["low_res_logits"].shape == (2, 3, 32, 32)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="patch_size"):
        build_sam(SamConfig(img_size=100, patch_size=8))
    with pytest.raises(ConfigError, match="model_type"):
        build_sam(SamConfig(model_type="vit_x"))


def test_save_is_sam_format_and_roundtrips(tmp_path):
    sam = _tiny_sam(0)
    path = save_sam(sam, TINY_SAM, tmp_path / "sam_tiny.pth")
    assert sidecar_path(path) == tmp_path / "sam_tiny.json"
    assert json.loads(sidecar_path(path).read_text())["encoder_embed_dim"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam_tiny.json", "sam_tiny.pth"]
    fresh = _tiny_sam(1)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    loaded = load_sam(path)
    expected = _prompted(sam)[0]
    for model in (fresh, loaded):
        out = _prompted(model)[0]
        torch.testing.assert_close(out["low_res_logits"], expected["low_res_logits"])
        torch.testing.assert_close(out["iou_predictions"], expected["iou_predictions"])


def test_load_official_vit_b_shaped_state_dict(tmp_path):
    with torch.device("meta"):
        reference = sam_model_registry["vit_b"]()
    reference.to_empty(device="cpu")
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in reference.state_dict().items()}
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)
    loaded = load_sam(path, "vit_b")
    assert loaded.image_encoder.img_size == 1024 and len(loaded.image_encoder.blocks) == 12
    for key in ("image_encoder.pos_embed", "image_encoder.blocks.11.mlp.lin2.weight"):
        torch.testing.assert_close(loaded.state_dict()[key], state[key])
    torch.testing.assert_close(loaded.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))


def test_missing_files_and_misfits_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.pth.*svp train-sam"):
        load_sam(tmp_path / "nope.pth")
    path = save_sam(_tiny_sam(), TINY_SAM, tmp_path / "sam_tiny.pth")
    side = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps(side | {"encoder_depth": 3}))
    with pytest.raises(ConfigError, match=r"missing \(\d+\): image_encoder\.blocks\.2"):
        load_sam(path)
    sidecar_path(path).unlink()
    with pytest.raises(ConfigError, match=r"sam_tiny\.json is missing"):
        load_sam(path)


def test_predictor_and_automatic_generator_run_on_small_sam():
    sam = _tiny_sam()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    masks, ious, low_res = predictor.predict(np.array([[20, 30]]), np.array([1]))
    assert masks.shape == (3, 64, 64) and ious.shape == (3,) and low_res.shape == (3, 32, 32)
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    for found in generator.generate(image):
        assert found["segmentation"].shape == (64, 64)


def test_batched_decoder_matches_sam_decoder():
    sam = _tiny_sam()
    embeddings = torch.randn(2, 32, 8, 8)
    points = torch.rand(5, 1, 2) * 64
    labels = torch.ones(5, 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    counts = torch.tensor([2, 3])
    masks, ious = decode_masks(sam, embeddings.repeat_interleave(counts, 0), sparse, dense)
    for i, sl in enumerate((slice(0, 2), slice(2, 5))):
        ref_masks, ref_ious = sam.mask_decoder.predict_masks(
            embeddings[i : i + 1], pe, sparse[sl], dense[sl]
        )
        torch.testing.assert_close(masks[sl], ref_masks, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ious[sl], ref_ious, rtol=1e-4, atol=1e-4)


def test_iou_and_farthest_point():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:6, 2:8] = True
    other = torch.zeros_like(mask)
    other[2:6, 2:5] = True
    assert mask_iou(mask, mask).item() == 1.0
    assert mask_iou(other, mask).item() == pytest.approx(0.5)
    assert mask_iou(torch.zeros_like(mask), torch.zeros_like(mask)).item() == 1.0
    x, y = farthest_point(np.pad(np.ones((5, 5)), ((0, 5), (3, 2))))
    assert (x, y) == (5, 2)


def test_evaluation_scores_a_ground_truth_model_one(synthref_root, monkeypatch):
    val = ReferDataset(synthref_root, "synthref", "unc", "val")
    sam = _tiny_sam()

    def oracle(model, image, points):
        (image_id,) = [i for i in val.image_ids if np.array_equal(val.load_image(i), image)]
        gt = torch.as_tensor(val.instance_masks(image_id)).bool()
        gt = gt[gt.flatten(1).any(1)]
        assert all(gt[k, int(y), int(x)] for k, (x, y) in enumerate(points))
        masks = torch.stack([~gt, gt, ~gt], dim=1)
        return masks, torch.tensor([[0.1, 0.9, 0.2]]).expand(len(gt), 3)

    monkeypatch.setattr(sam_training, "predict_single_point", oracle)
    result = evaluate_single_point(sam, val, limit=3)
    assert result["miou"] == 1.0 and result["images"] == 3 and result["instances"] > 3


def _fit(module: SamTrainingModule, batch: dict, steps: int = 15) -> None:
    """`steps` AdamW steps (lr 3e-3) of the module's total loss on one batch."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        module.losses(batch)["loss"].backward()
        opt.step()


def test_training_steps_decrease_the_loss(synthref_root):
    torch.manual_seed(0)
    cfg = TrainSamConfig(root=str(synthref_root), sam=TINY_SAM, instances_per_image=8, lr=3e-3)
    module = SamTrainingModule(cfg)
    refer = ReferDataset(synthref_root, "synthref", "unc", "train")
    data = SamInstanceDataset(refer, 64, instances=8, flip=False)
    batch = collate_instances([data[i] for i in range(8)])
    torch.manual_seed(1)
    with torch.no_grad():
        before = module.losses(batch)["loss"].item()
    _fit(module, batch)
    torch.manual_seed(1)
    with torch.no_grad():
        assert module.losses(batch)["loss"].item() < 0.7 * before


def test_train_sam_saves_a_loadable_reproducible_checkpoint(synthref_root, tmp_path):
    def run(name: str) -> dict:
        cfg = TrainSamConfig(
            root=str(synthref_root),
            sam=TINY_SAM,
            max_steps=3,
            batch_size=4,
            warmup_steps=1,
            out=str(tmp_path / name / "sam.pth"),
            val_limit=2,
            threads=1,  # bit-identical weights need the same thread count
        )
        return train_sam(cfg, progress=False)

    before = torch.get_num_threads()
    try:
        first, second = run("a"), run("b")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert first["steps"] == 3 and 0.0 <= first["miou"] <= 1.0
    assert first["threads"] == 1
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["miou"] == first["miou"]
    a, b = load_sam(first["checkpoint"]), load_sam(second["checkpoint"])
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)
    assert first["miou"] == second["miou"]


def test_train_config_errors_name_the_key(synthref_root):
    with pytest.raises(ConfigError, match="batch_size"):
        train_sam(TrainSamConfig(root=str(synthref_root), batch_size=0), progress=False)
    with pytest.raises(ConfigError, match="train_sam.threads"):
        train_sam(TrainSamConfig(root=str(synthref_root), threads=0), progress=False)
    with pytest.raises(ConfigError, match="out="):
        train_sam(TrainSamConfig(root=str(synthref_root), out="runs/sam/x.pt"), progress=False)


# ------------------------------------------------------------------ semantic pre-training


def test_encoder_states_match_sam_encoder_forward():
    from common.sam import encoder_state_channels, encoder_states

    enc = _tiny_sam().image_encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        neck, state = encoder_states(enc, x, 1)
        torch.testing.assert_close(neck, enc(x), rtol=0, atol=0)
        manual = enc.blocks[0](enc.patch_embed(x) + enc.pos_embed).permute(0, 3, 1, 2)
        torch.testing.assert_close(state, manual, rtol=0, atol=0)
        none, early = encoder_states(enc, x, 1, neck=False)
        assert none is None
        torch.testing.assert_close(early, manual, rtol=0, atol=0)
        torch.testing.assert_close(encoder_states(enc, x, -1)[1], neck, rtol=0, atol=0)
    assert encoder_state_channels(enc, 1) == 32 == state.shape[1]
    assert encoder_state_channels(enc, -1) == 32 == neck.shape[1]
    with pytest.raises(ConfigError, match="outside"):
        encoder_states(enc, x, 5)


def test_instance_classes_follow_the_annotations(synthref_root):
    refer = ReferDataset(synthref_root, "synthref", "unc", "train")
    vocab = sam_training.label_vocabulary(refer, ["category", "shape", "color"])
    assert vocab["category"] == sorted(vocab["category"]) and len(vocab["color"]) > 1
    image_id = refer.image_ids[0]
    classes = sam_training.instance_classes(refer, image_id, vocab)
    anns = [refer._instances.annotations[i] for i in refer.instance_ann_ids(image_id)]
    assert classes.shape == (3, len(anns))
    for j, ann in enumerate(anns):
        assert vocab["category"][classes[0, j]] == ann["category_id"]
        assert vocab["shape"][classes[1, j]] == ann["attributes"]["shape"]
        assert vocab["color"][classes[2, j]] == ann["attributes"]["color"]
    # the dataset's labels belong to the instances it picked, whatever the flip
    data = SamInstanceDataset(refer, 64, instances=3, flip=True, vocab=vocab)
    masks = torch.from_numpy(refer.instance_masks(image_id)).float()
    for seed in range(4):
        torch.manual_seed(seed)
        item = data[0]
        for k, mask in enumerate(item["masks"]):
            match = [
                j
                for j in range(len(masks))
                if any(torch.equal(mask, masks[j].flip(d)) for d in ([], [-1], [-2], [-2, -1]))
            ]
            assert classes[:, match[0]].tolist() == item["labels"][:, k].tolist()
    with pytest.raises(DataError, match="attributes.weight"):
        refer.instance_labels(image_id, "weight")
    val = ReferDataset(synthref_root, "synthref", "unc", "val")
    unknown = sam_training.instance_classes(val, val.image_ids[0], {"color": ["no-such-colour"]})
    assert (unknown == sam_training.UNKNOWN_CLASS).all()


def test_semantic_heads_learn_and_are_not_saved(synthref_root, tmp_path):
    cfg = TrainSamConfig(
        root=str(synthref_root),
        sam=TINY_SAM,
        instances_per_image=4,
        semantic_labels=["category", "color"],
        semantic_layer=1,
    )
    refer = ReferDataset(synthref_root, "synthref", "unc", "train")
    vocab = sam_training.label_vocabulary(refer, list(cfg.semantic_labels))
    torch.manual_seed(0)
    module = SamTrainingModule(cfg, vocab)
    data = SamInstanceDataset(refer, 64, instances=4, flip=True, vocab=vocab)
    item = data[0]
    assert item["labels"].shape == (2, len(item["masks"])) and item["labels"].dtype == torch.long
    batch = collate_instances([data[i] for i in range(8)])
    with torch.no_grad():
        before = module.losses(batch)["semantic"].item()
    _fit(module, batch)
    with torch.no_grad():
        out = module.losses(batch)
    assert out["semantic"].item() < 0.7 * before
    assert 0.0 <= float(out["acc_color"]) <= 1.0
    # values the training split never has are left out of the loss and the accuracy
    state = torch.randn(1, 32, 8, 8)
    masks = [torch.ones(2, 64, 64)]
    unknown = [torch.full((2, 2), sam_training.UNKNOWN_CLASS)]
    loss, counted = module.semantic_terms(state, masks, unknown)
    assert float(loss) == 0.0 and all(int(c) == 0 for _, c in counted.values())
    # end to end: the val accuracy is recorded, the checkpoint is plain SAM
    run = TrainSamConfig(
        root=str(synthref_root),
        sam=TINY_SAM,
        max_steps=2,
        batch_size=4,
        warmup_steps=1,
        out=str(tmp_path / "sem" / "sam.pth"),
        val_limit=2,
        semantic_labels=["category"],
        semantic_layer=-1,
    )
    result = train_sam(run, progress=False)
    assert set(result["semantic_accuracy"]) == {"category"}
    assert 0.0 <= result["semantic_accuracy"]["category"] <= 1.0
    saved = json.loads((tmp_path / "sem" / "metrics.json").read_text())
    assert saved["semantic_classes"] == {"category": len(vocab["category"])}
    state = torch.load(result["checkpoint"], weights_only=True)
    assert not any("semantic" in key for key in state)
    load_sam(result["checkpoint"])


def test_semantic_config_errors_name_the_key(synthref_root):
    root = str(synthref_root)
    with pytest.raises(ConfigError, match="train_sam.semantic_weight"):
        train_sam(TrainSamConfig(root=root, semantic_weight=-1.0), progress=False)
    with pytest.raises(ConfigError, match="train_sam.semantic_labels"):
        train_sam(TrainSamConfig(root=root, semantic_labels=["color", "color"]), progress=False)
    with pytest.raises(ConfigError, match="train_sam.semantic_layer"):
        SamTrainingModule(TrainSamConfig(sam=TINY_SAM, semantic_layer=9), {"color": ["red"]})
