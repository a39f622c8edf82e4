"""`data.mix`: training drawn from RefCOCO, RefCOCO+ and RefCOCOg by sample rates, as LISA."""

from __future__ import annotations

import bisect
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides
from refer_fixture import write_synthref_as_refcoco
from torch.utils.data import DistributedSampler

from datamodules.mix import MixEntry, MixSampler, training_sets
from datamodules.ris import RISDataModule
from lightning_modules.cli import main
from lightning_modules.cli.config import load_config, load_saved_config
from lightning_modules.llm import tokenizer_for, tokenizer_texts

MIX = "data.mix={refcoco: 2, refcoco+: 1, refcocog: 1}"


@pytest.fixture(scope="module")
def refer_root(synthref_root, tmp_path_factory) -> Path:
    return write_synthref_as_refcoco(synthref_root, tmp_path_factory.mktemp("refer"))


def config(root: Path, tmp_path: Path, *extra: str, projector: str = "mlp"):
    overrides = [f"data.root={root}", "data.dataset=refcoco", "data.split_by=unc"]
    overrides += [f"cache.root={tmp_path / 'cache'}", f"projector={projector}", *extra]
    return load_config(overrides)


def data_module(cfg) -> RISDataModule:
    dm = RISDataModule(cfg, tokenizer_for(cfg))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_training_sets_without_and_with_a_mix(refer_root, tmp_path):
    plain = config(refer_root, tmp_path)
    assert training_sets(plain.data) == [MixEntry("refcoco", "unc", 1.0)]
    assert training_sets(config(refer_root, tmp_path, "data.mix={}").data) == [
        MixEntry("refcoco", "unc", 1.0)
    ]
    mixed = config(refer_root, tmp_path, "data.mix={refcocog: 0.5, refcoco+: 0, refcoco: 2}")
    assert training_sets(mixed.data) == [
        MixEntry("refcocog", "umd", 0.5),  # each data set's standard split scheme
        MixEntry("refcoco", "unc", 2.0),
    ]
    sentences, prompt_and_answer = tokenizer_texts(plain)[:-2], tokenizer_texts(plain)[-2:]
    assert tokenizer_texts(mixed) == [*sentences, *sentences, *prompt_and_answer]  # the copies


def test_draws_follow_the_rates_and_cover_each_data_set_without_repeats(refer_root, tmp_path):
    dm = data_module(config(refer_root, tmp_path, MIX))
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, MixSampler)
    bounds = dm.train_set.cumulative_sizes
    sizes = [len(part) for part in dm.train_set.datasets]
    assert len(sampler) == sum(sizes) == bounds[-1]  # an epoch: the mixed splits' sentences
    counts = torch.zeros(3)
    for epoch in range(12):
        sampler.set_epoch(epoch)
        draws = list(sampler)
        owners = [bisect.bisect_right(bounds, i) for i in draws]
        counts += torch.bincount(torch.tensor(owners), minlength=3)
        for d in (1, 2):  # a quarter of the draws each: fewer than their sentences, no repeats
            mine = [i for i, o in zip(draws, owners) if o == d]
            assert len(mine) == len(set(mine))
    shares = counts / counts.sum()
    assert torch.allclose(shares, torch.tensor([0.5, 0.25, 0.25]), atol=0.03), shares
    sampler.set_epoch(3)
    again = MixSampler(sizes, [2.0, 1.0, 1.0], seed=0)
    again.set_epoch(3)
    assert list(sampler) == list(again)  # a function of the seed and the epoch
    again.set_epoch(4)
    assert list(sampler) != list(again)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == dm.cfg.data.batch_size


def test_processes_split_one_shared_sequence_of_draws():
    """With two processes each takes every other draw of one sequence both compute alike: the
    same number of batches each, no draw twice."""
    ranks = [MixSampler([5, 8], [1.0, 3.0], seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert len(ranks[0]) == len(ranks[1]) == 7  # 13 sentences, padded to 14 draws
    shared = ranks[0].draws()
    assert torch.equal(shared, ranks[1].draws()) and len(shared) == 14
    assert list(ranks[0]) == shared[0::2].tolist() and list(ranks[1]) == shared[1::2].tolist()
    for low, high in ((0, 5), (5, 13)):  # a sentence repeats only once its set is drawn through
        counts = torch.bincount(
            shared[(shared >= low) & (shared < high)] - low, minlength=high - low
        )
        assert counts.max() - counts.min() <= 1


def test_a_mix_of_one_data_set_at_rate_1_trains_on_the_same_data(refer_root, tmp_path):
    """The same sentences once per epoch, the same tokenizer, eval sets and superpixel cache;
    only the order of an epoch is drawn by the mix sampler instead of the plain shuffle."""
    plain_cfg = config(refer_root, tmp_path, "superpixels=grid", projector="semantic")
    mixed_cfg = config(
        refer_root, tmp_path, "superpixels=grid", "data.mix={refcoco: 1}", projector="semantic"
    )
    plain, mixed = data_module(plain_cfg), data_module(mixed_cfg)
    assert isinstance(plain.train_dataloader().sampler, DistributedSampler)
    assert tokenizer_texts(plain_cfg) == tokenizer_texts(mixed_cfg)
    (part,) = mixed.train_set.datasets
    assert [s["sent_id"] for s in _items(part)] == [s["sent_id"] for s in _items(plain.train_set)]
    assert sorted(mixed.train_dataloader().sampler) == list(range(len(plain.train_set)))
    for split, ds in plain.eval_sets.items():
        assert [s["sent_id"] for s in _items(ds)] == [
            s["sent_id"] for s in _items(mixed.eval_sets[split])
        ]
    assert {s.cache_dir for s in plain.stores.values()} == {
        s.cache_dir for s in mixed.stores.values()
    }


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def test_mixed_loader_with_workers_reads_every_data_set_superpixels(refer_root, tmp_path):
    """Superpixels for every mixed data set come from the one cache of their shared images; the
    train set (stores included) pickles, and DataLoader workers read it."""
    cfg = config(
        refer_root,
        tmp_path,
        MIX,
        "superpixels=grid",
        "superpixels.k=4",
        "data.num_workers=2",
        projector="semantic",
    )
    dm = data_module(cfg)
    assert len({store.cache_dir for store in dm.stores.values()}) == 1
    assert set(dm.stores) == {("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")}
    copy = pickle.loads(pickle.dumps(dm.train_set))
    last = len(copy) - 1  # a RefCOCOg sentence
    assert copy[last]["superpixels"].max() == 15
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape[0] == cfg.data.batch_size


def test_svp_train_with_a_mix(refer_root, tiny_sam_checkpoint, tmp_path):
    """`svp train` with `data.mix` end to end: it trains on the mix, evaluates on RefCOCO's
    splits, and its saved config records the mix."""
    overrides = tiny_run_overrides(refer_root, tiny_sam_checkpoint, tmp_path, "mlp")
    overrides += ["data.dataset=refcoco", MIX, "superpixels=grid", "superpixels.k=4"]
    overrides += ["trainer.max_steps=2", "trainer.limit_val_batches=1"]
    overrides += ["data.limit_test_sentences=4", "data.eval_splits=[val,testB]"]
    assert main(["train", *overrides]) == 0
    run = tmp_path / "tiny" / "mlp-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val_ciou"] <= 1.0 and 0.0 <= metrics["testB_ciou"] <= 1.0
    again = load_saved_config(run / "config.yaml")
    assert [s.dataset for s in training_sets(again.data)] == ["refcoco", "refcoco+", "refcocog"]


@pytest.mark.slow
def test_two_process_ddp_training_with_a_mix(refer_root, tiny_sam_checkpoint, tmp_path):
    """`svp train trainer=ddp_cpu` with `data.mix`: each of two gloo processes draws its share of
    the mix (RISDataModule builds the samplers; Lightning's own distributed sampler stays off)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    overrides = tiny_run_overrides(refer_root, tiny_sam_checkpoint, tmp_path, "mlp")
    overrides += ["data.dataset=refcoco", MIX, "superpixels=grid", "trainer=ddp_cpu"]
    overrides += ["trainer.max_steps=3", "trainer.limit_val_batches=1"]
    overrides += ["data.limit_test_sentences=8"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", "train", *overrides],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny" / "mlp-seed0"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3


def test_precompute_covers_every_mixed_data_set(synthref_root, tmp_path):
    """`svp precompute` with a mix builds what training reads, so a multi-process run (which
    refuses to start without its caches) can follow it."""
    import pickle

    from lightning_modules.cli import main

    root = write_synthref_as_refcoco(synthref_root, tmp_path / "refer")
    refs_file = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    only_in_refcocog = next(r["image_id"] for r in refs if r["split"] == "train")
    refs_file.write_bytes(pickle.dumps([r for r in refs if r["image_id"] != only_in_refcocog]))
    overrides = [f"data.root={root}", "data.dataset=refcoco", f"runs_root={tmp_path}"]
    overrides += [f"cache.root={tmp_path / 'cache'}", "projector=semantic", "superpixels=grid"]
    overrides += ["data.mix={refcocog: 1}"]  # refcocog's train split is not among refcoco's
    assert main(["precompute", *overrides]) == 0
    cfg = load_config(overrides)
    assert RISDataModule(cfg, tokenizer_for(cfg)).superpixels_ready()
