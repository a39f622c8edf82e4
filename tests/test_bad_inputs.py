"""Bad input: an `error:` line naming the key or file, exit 2, no traceback, nothing written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from lightning_modules.cli import main


def _tree(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(synthref_root, tiny_sam_checkpoint, tmp_path_factory) -> tuple[list[str], Path]:
    """A finished two-step `mlp` run: its overrides and its folder."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, runs, "mlp")
    overrides += ["superpixels=grid", "superpixels.k=4", "trainer.max_steps=2"]
    overrides += ["trainer.limit_val_batches=1", "data.limit_test_sentences=4"]
    assert main(["train", *overrides]) == 0
    return overrides, runs / "tiny" / "mlp-seed0"


CASES = {
    "batch size 0": (["data.batch_size=0"], "data.batch_size=0"),
    "eval batch size 0": (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    "max_steps 0": (["trainer.max_steps=0"], "trainer.max_steps=0"),
    "limit 0": (["data.limit_train_sentences=0"], "data.limit_train_sentences=0"),
    "missing split": (["data.eval_splits=[val,testC]"], "data.eval_splits: synthref"),
    "missing train split": (["data.train_split=trainval"], "data.train_split"),
    "missing ckpt_path": (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path=/nonexistent/x.ckpt"),
    "missing data root": (["data.root=/nonexistent"], "/nonexistent/synthref is missing"),
    "bad rerank": (["grounding.rerank=-1"], "grounding.rerank"),
    "bad projector value": (["projector.k=0"], "projector.k"),
    "answer without [SEG]": (["data.answer=Sure."], "data.answer='Sure.' has no [SEG]"),
    "prompt without <image>": (["data.prompt='What is {sentence}?'"], "has no <image>"),
    "mix of an unknown data set": (["data.mix={nope: 1}"], "data.mix.nope: unknown data set"),
    "mix with a negative rate": (["data.mix={synthref: -1}"], "data.mix.synthref=-1"),
    "mix with a rate not a number": (["data.mix={synthref: many}"], "data.mix.synthref='many'"),
    "mix with every rate 0": (["data.mix={synthref: 0}"], "gives every data set rate 0"),
    "mix not a mapping": (["data.mix=[synthref]"], "data.mix=['synthref'] must map"),
    "mix over other images": (["data.mix={synthref: 1, refcoco: 1}"], "data.mix.refcoco: its"),
    "negative lr": (["optim.lr=-1"], "optim.lr=-1"),
    "negative seed": (["seed=-1"], "seed=-1"),
    "label size 0": (["data.label_size=0"], "data.label_size=0"),
    "negative max_epochs": (["trainer.max_epochs=-3"], "max_epochs=-3, …): `max_epochs` must be"),
    "no devices": (["trainer.devices=0"], "trainer.accelerator=cpu, devices=0"),
    "unknown precision": (["trainer.precision=fp8"], "Precision 'fp8' is invalid"),
    "align folder missing": (["align.checkpoint=/nonexistent"], "align.checkpoint=/nonexistent"),
    "shard size 0": (["cache.shard_size=0"], "cache.shard_size=0"),
    "ckpt_path a folder": (["ckpt_path=/tmp"], "ckpt_path=/tmp is a folder"),
}


@pytest.mark.parametrize("extra, named", CASES.values(), ids=CASES.keys())
def test_train_refuses_before_writing(finished_run, extra, named, tmp_path, capsys):
    overrides, _ = finished_run
    run_dir = tmp_path / "fresh"
    assert main(["train", *overrides, f"run_dir={run_dir}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert not run_dir.exists()


def test_a_mixed_data_set_without_its_folder_is_named(
    synthref_root, tiny_sam_checkpoint, tmp_path, capsys
):
    import shutil

    from refer_fixture import write_synthref_as_refcoco

    root = write_synthref_as_refcoco(synthref_root, tmp_path / "refer")
    shutil.rmtree(root / "refcocog")
    overrides = tiny_run_overrides(root, tiny_sam_checkpoint, tmp_path / "runs", "mlp")
    overrides += ["data.dataset=refcoco", "data.mix={refcoco: 1, refcocog: 1}"]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.mix.refcocog: data set folder {root / 'refcocog'} is")
    assert "Traceback" not in err and not (tmp_path / "runs" / "tiny").exists()


def test_a_finished_run_is_never_trained_over(finished_run, capsys):
    overrides, run_dir = finished_run
    before = _tree(run_dir)
    assert main(["train", *overrides, "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "ckpt_path=last" in err
    assert _tree(run_dir) == before  # config.yaml still says what the run was trained with


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_corrupt_checkpoints_are_named(finished_run, content, tmp_path, capsys):
    overrides, run_dir = finished_run
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    before = _tree(run_dir)
    config = str(run_dir / "config.yaml")
    assert main(["eval", "--config", config, "--ckpt", str(bad)]) == 2
    assert f"--ckpt={bad}" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["train", *overrides, f"run_dir={fresh}", f"ckpt_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"ckpt_path={bad}" in err and "Traceback" not in err and not fresh.exists()
    assert _tree(run_dir) == before


@pytest.mark.parametrize(
    "storage",
    ["foo://nowhere/x", "sqlite:///{file}/under-a-file/study.db", "postgresql://u@127.0.0.1:9/db"],
    ids=["unknown scheme", "folder under a file", "no server"],
)
def test_bad_sweep_storage_is_named(storage, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    storage = storage.format(file=file)
    argv = ["sweep", f"runs_root={tmp_path}", "sweep.name=s", f"sweep.storage={storage}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep.storage: cannot open") and "Traceback" not in err


@pytest.mark.parametrize(
    "other_model, named",
    [("projector=resampler", "holds other weights"), ("llm.hidden_size=64", "of another shape")],
    ids=["other parameter names", "same names, other shapes"],
)
def test_a_checkpoint_of_another_model_is_named(finished_run, other_model, named, tmp_path, capsys):
    """Weights saved with another config (another projector; the LLM at another width) do not
    load silently, nor with a traceback: the error names the key and the mismatch."""
    overrides, run_dir = finished_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    other = tmp_path / "other"
    argv = ["train", *overrides, other_model, f"run_dir={other}", f"ckpt_path={ckpt}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"ckpt_path={ckpt} holds other weights" in err and named in err
    assert "Traceback" not in err and not other.exists()
    config = str(run_dir / "config.yaml")
    assert main(["eval", "--config", config, other_model, "--ckpt", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"--ckpt={ckpt} holds other weights" in err and named in err


MORE = {
    "unknown key": (["train", "trainer.max_epoch=2"], "trainer.max_epoch"),
    "a value for a node": (["train", "optim=3"], "optim=3: 'optim' holds settings (grad_clip, lr"),
    "wrong type": (["train", "trainer.max_epochs=many"], "trainer.max_epochs"),
    "unknown projector": (["train", "projector=nope"], "unknown projector 'nope'"),
    "unknown preset": (["train", "preset=huge"], "unknown preset 'huge'"),
    "malformed override": (["train", "trainer.max_epochs"], "key=value"),
    "missing saved config": (["eval", "--config", "/nonexistent/config.yaml"], "config.yaml"),
    "zero trials": (["sweep", "sweep.n_trials=0"], "sweep.n_trials=0"),
    "unknown sweep space": (["sweep", "sweep.space=nope"], "nope"),
    "missing SAM": (
        ["train", "mask_decoder.checkpoint=/nonexistent.pth"],
        "mask_decoder.checkpoint",
    ),
    "bad threads": (["train", "trainer.threads=0"], "trainer.threads"),
    "no sweep jobs": (["sweep", "sweep.n_jobs=0"], "sweep.n_jobs=0"),
    "negative sweep timeout": (["sweep", "sweep.timeout_minutes=-1"], "sweep.timeout_minutes=-1"),
    "a space's misspelled key": (
        ["sweep", "sweep.space=compare_grid", "sweep.overrides=[optim.lrr=1]"],
        "a trial with overrides",
    ),
    "a space's bad value": (["sweep", "sweep.overrides=[optim.lr=-1]"], "optim.lr=-1"),
    "demo with a bad value": (["demo", "optim.lr=-1"], "optim.lr=-1"),
    "demo with no trials": (["demo", "sweep.n_trials=-1"], "sweep.n_trials=-1"),
}


@pytest.mark.parametrize("argv, named", MORE.values(), ids=MORE.keys())
def test_config_and_path_errors_are_one_line(argv, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    assert main([*argv, f"runs_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_mixed_data_set_without_the_train_split_is_named(
    synthref_root, tiny_sam_checkpoint, tmp_path, capsys
):
    """Training checks `data.train_split` in every data set it draws from (`data.mix`), not in
    `data.dataset` alone, before it writes anything."""
    import pickle

    from refer_fixture import write_synthref_as_refcoco

    root = write_synthref_as_refcoco(synthref_root, tmp_path / "refer")
    refs = root / "refcocog" / "refs(umd).p"
    kept = [r for r in pickle.loads(refs.read_bytes()) if r["split"] != "train"]
    refs.write_bytes(pickle.dumps(kept))
    overrides = tiny_run_overrides(root, tiny_sam_checkpoint, tmp_path / "runs", "mlp")
    overrides += ["data.dataset=refcoco", "data.mix={refcoco: 1, refcocog: 1}"]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.train_split: refcocog (umd)") and "'train'" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "tiny").exists()


def test_a_corrupt_alignment_is_named(finished_run, tmp_path, capsys):
    import shutil

    overrides, finished = finished_run
    folder = tmp_path / "aligned"
    shutil.copytree(finished / "tokenizer", folder / "tokenizer")
    (folder / "aligned.pt").write_text("not a checkpoint")
    run_dir = tmp_path / "fresh"
    assert main(["train", *overrides, f"run_dir={run_dir}", f"align.checkpoint={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: align.checkpoint='{folder}': aligned.pt is not readable")
    assert "Traceback" not in err and not run_dir.exists()


def test_paths_in_the_way_and_damaged_run_metrics_are_named(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["synth", "--root", str(a_file / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(a_file) in err and "Traceback" not in err
    runs = tmp_path / "runs"
    for name, text in (("truncated", '{"val_ciou": 0.'), ("a list", "[]")):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(text)
        assert main(["report", "--runs", str(runs)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {runs / name / 'metrics.json'}") and "Traceback" not in err
        (runs / name / "metrics.json").unlink()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["eval", "--config", str(empty)]) == 2
    assert f"config file {empty} is empty" in capsys.readouterr().err
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert main(["eval", "--config", str(binary)]) == 2
    assert "not a text (UTF-8) file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--limit", "-3"], ["--count", "0"]])
def test_counts_below_one_are_refused(argv, capsys):
    command = "quality" if argv[0] == "--limit" else "show"
    with pytest.raises(SystemExit) as stop:
        main(["superpixels", command, *argv])
    assert stop.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
