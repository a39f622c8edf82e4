"""The alignment stage: LLaVA-format conversations, `svp align`, and RIS training from it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_svp, tiny_run_overrides
from PIL import Image

from common.errors import ConfigError, DataError
from datamodules.conversations import ConversationEncoder, read_conversations
from datamodules.synthref.conversations import GRID, place_phrase
from lightning_modules.cli.config import load_config


def _synthref(root: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((root / "synthref" / "instances.json").read_text())
    refs = pickle.loads((root / "synthref" / "refs(unc).p").read_bytes())
    return instances, refs


def test_synthref_writes_llava_conversations_about_its_train_images(synthref_root):
    instances, refs = _synthref(synthref_root)
    entries = read_conversations(synthref_root / "synthref" / "conversations.json")
    names = {im["file_name"]: im for im in instances["images"]}
    train_images = {r["image_id"] for r in refs if r["split"] == "train"}
    train_sentences = {s["sent_id"]: (r, s["sent"]) for r in refs for s in r["sentences"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    assert {names[e["image"]]["id"] for e in entries} == train_images
    captions = [e for e in entries if e["id"].endswith("-caption")]
    assert len(captions) == len(train_images)
    wheres = [e for e in entries if e["id"].endswith("-where")]
    assert wheres
    for e in wheres:
        image_id, sent_id, _ = e["id"].split("-")
        ref, sent = train_sentences[int(sent_id)]
        assert ref["split"] == "train" and ref["image_id"] == int(image_id)
        question, answer = (t["value"] for t in e["conversations"])
        assert question == f"<image>\nwhere is {sent} ?"
        # the answer names the target's visible box centre: its 3×3 place and its 10×10 cell
        x, y, w, h = anns[ref["ann_id"]]["bbox"]
        im = names[e["image"]]
        cx, cy = (x + w / 2) / im["width"], (y + h / 2) / im["height"]
        cell = f"( {min(int(cx * GRID), GRID - 1)} , {min(int(cy * GRID), GRID - 1)} )"
        assert answer == f"{place_phrase(cx, cy)} , {cell} ."


def test_place_phrases():
    assert place_phrase(0.1, 0.1) == "at the top left"
    assert place_phrase(0.5, 0.9) == "at the bottom"
    assert place_phrase(0.9, 0.5) == "on the right"
    assert place_phrase(0.5, 0.5) == "in the center"


def test_the_answers_alone_carry_the_loss(synthref_root, tmp_path):
    from lightning_modules.llm import build_tokenizer, image_token_id

    turns = [
        {"from": "human", "value": "<image>\nwhere is the red star ?"},
        {"from": "gpt", "value": "at the top left ."},
        {"from": "human", "value": "what is it ?"},
        {"from": "gpt", "value": "a red star ."},
    ]
    texts = [t["value"].replace("<image>", "") for t in turns]
    tok = build_tokenizer(texts)
    enc = ConversationEncoder(tok)(turns)
    ids, labels = enc.input_ids, enc.labels
    assert ids[0] == tok.bos_token_id and ids[1] == image_token_id(tok)
    assert ids.count(image_token_id(tok)) == 1
    answered = [tok.decode([i]) for i, lab in zip(ids, labels) if lab != -100]
    words = "at the top left . </s> a red star . </s>".split()
    assert answered == words
    assert [i for i, lab in zip(ids, labels) if lab != -100] == [
        lab for lab in labels if lab != -100
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is not a file"),
        ("not json", "is not JSON"),
        ([], "no list"),
        ([{"conversations": []}], "entry 0: needs an 'image'"),
        ([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}], "pairs"),
        (
            [
                {
                    "image": "a.png",
                    "conversations": [
                        {"from": "gpt", "value": "<image>"},
                        {"from": "human", "value": "x"},
                    ],
                }
            ],
            "turn 0 must come from 'human'",
        ),
        (
            [
                {
                    "image": "a.png",
                    "conversations": [
                        {"from": "human", "value": "<image> <image>"},
                        {"from": "gpt", "value": "x"},
                    ],
                }
            ],
            "one <image>",
        ),
    ],
)
def test_bad_conversation_files_are_data_errors(content, message, tmp_path):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def _overrides(root, sam, runs, projector="mlp", extra=()):
    sp = ["superpixels=grid", "superpixels.k=4"]
    return [*tiny_run_overrides(root, sam, runs, projector), *sp, "align.train_llm=true", *extra]


def test_alignment_lowers_the_held_out_answer_loss(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules.cli.align import align

    base = _overrides(synthref_root, tiny_sam_checkpoint, tmp_path)
    base += ["align.val_conversations=32", "align.batch_size=16", "align.lr=3e-3"]
    one = align(load_config([*base, "align.epochs=1", "name=one", "align.limit_conversations=48"]))
    more = align(load_config([*base, "align.epochs=8", "name=more"]))
    assert Path(one["out"], "aligned.pt").is_file()
    assert more["align/val_ce"] < one["align/val_ce"] - 0.5, (one, more)


@pytest.mark.parametrize("projector", ["mlp", "semantic"])
def test_training_starts_from_the_aligned_weights(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    from lightning_modules.alignment import load_aligned
    from lightning_modules.cli.align import align
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    overrides = _overrides(synthref_root, tiny_sam_checkpoint, tmp_path, projector)
    cfg = load_config([*overrides, "align.limit_conversations=40", "align.val_conversations=8"])
    out = Path(align(cfg)["out"])
    saved = torch.load(out / "aligned.pt", weights_only=True)
    assert set(saved) == {"projector", "llm", "projector_name"}

    cfg = load_config([*overrides, f"align.checkpoint={out}"])
    tokenizer = tokenizer_for(cfg, aligned=out)
    assert tokenizer.get_vocab() == tokenizer_for(cfg, aligned=out).get_vocab()
    model = RISModel(cfg, tokenizer)
    assert load_aligned(model, out, cfg) == ["projector", "llm"]
    for part in ("projector", "llm"):
        state = getattr(model, part).state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved[part].items()), part

    other = "pool" if projector == "mlp" else "mlp"
    with pytest.raises(ConfigError, match=f"aligned projector={projector}"):
        load_aligned(model, out, load_config([*overrides, f"projector={other}"]))
    with pytest.raises(ConfigError, match="holds no aligned.pt"):
        load_aligned(model, tmp_path, cfg)


def test_train_aligns_inside_the_run_and_reuses_it(synthref_root, tiny_sam_checkpoint, tmp_path):
    """`align.checkpoint=run`: the run aligns into its own folder first, then trains from it; a
    resumed run finds it there."""
    extra = ["align.checkpoint=run", "align.limit_conversations=24", "align.val_conversations=0"]
    extra += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    extra += ["data.limit_test_sentences=8", "grounding.weight=0", "grounding.pointer=false"]
    overrides = _overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp", extra)
    first = run_svp("train", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "tiny" / "mlp-seed0"
    aligned = run / "align" / "aligned.pt"
    assert aligned.is_file() and (run / "metrics.json").is_file()
    stamp = aligned.stat().st_mtime_ns
    again = run_svp("train", *overrides, "trainer.max_epochs=2", "ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert aligned.stat().st_mtime_ns == stamp


def test_a_llava_file_about_other_images_aligns_projectors_without_superpixels(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """A LLaVA-format file (as blip_laion_cc_sbu_558k.json) with its own image folder."""
    folder = tmp_path / "images"
    (folder / "00000").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(12):
        name = f"00000/{i:09d}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(folder / name)
        entries.append(
            {
                "id": f"{i:09d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "Render a clear and concise summary.\n<image>"},
                    {"from": "gpt", "value": f"a noisy picture number {i}"},
                ],
            }
        )
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(entries))
    extra = [f"align.data={data}", f"align.image_folder={folder}", "align.val_conversations=4"]
    cmd = run_svp("align", *_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "pool", extra))
    assert cmd.returncode == 0, cmd.stderr[-3000:]
    assert (tmp_path / "align" / "tiny" / "aligned.pt").is_file()
    assert "(val text loss " in cmd.stdout
    none_held = [*extra, "align.val_conversations=0", f"align.out={tmp_path / 'all'}"]
    cmd = run_svp(
        "align", *_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "pool", none_held)
    )
    assert cmd.returncode == 0 and "(no held-out conversations)" in cmd.stdout, cmd.stderr[-3000:]
    semantic = _overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic", extra)
    refused = run_svp("align", *semantic)
    assert refused.returncode == 2 and "error: " in refused.stderr
    assert "outside it" in refused.stderr and "Traceback" not in refused.stderr


def test_two_processes_align_and_a_run_with_several_aligns_first(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """`svp align trainer=ddp_cpu` (2 gloo processes) writes one aligned folder; `svp train`
    with several processes refuses `align.checkpoint=run` (each process would align) and names
    the way, which works: align first, then `align.checkpoint=<folder>`."""
    extra = ["align.limit_conversations=24", "align.val_conversations=8", "trainer=ddp_cpu"]
    extra += ["trainer.enable_progress_bar=false"]
    overrides = _overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp", extra)
    proc = run_svp("align", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "align" / "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "aligned.pt").is_file() and metrics["steps"] > 0
    assert [p.name for p in tmp_path.glob("align/.*")] == []  # no rank left a staging folder
    assert proc.stdout.count("aligned: ") == 1  # one summary line, not one per process

    refused = run_svp("train", *overrides, "align.checkpoint=run")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "error: align.checkpoint=run" in refused.stderr and "svp align" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "tiny").exists()

    short = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    short += ["data.limit_test_sentences=8", "grounding.weight=0", "grounding.pointer=false"]
    trained = run_svp("train", *overrides, *short, f"align.checkpoint={out}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "tiny" / "mlp-seed0" / "metrics.json").is_file()
