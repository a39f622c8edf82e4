"""`svp` — the suite's command line. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable
from typing import Any

from common.errors import SVPError

OVERRIDES_HELP = textwrap.dedent(
    """\
    Config overrides are `key=value` words, before or after the options:
      group selections  preset=tiny|llava7b  projector=mlp|pool|resampler|c_abstractor|ldpv2|
                        tokenpacker|semantic  superpixels=sam|slic|felzenszwalb|grid|oracle
                        data=...  model=...  trainer=cpu|gpu|ddp|ddp_cpu
      dotted values     projector.k=4  optim.lr=3e-4  trainer.max_epochs=2  seed=1
    Unknown keys and wrong types are errors that name the key. `--show-config` prints the resolved
    config and exits. Group files live under configs/<group>/<choice>.yaml.
    """
)


# `svp sweep sweep=<space>` and `svp report study=<name>` read naturally; they set these keys.
_ALIASES = {"sweep": "sweep.space", "study": "sweep.name"}


def _expand_alias(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{_ALIASES.get(key, key)}{sep}{value}"


def _config_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved config and exit"
    )


def _load(args: argparse.Namespace):
    from omegaconf import OmegaConf

    from lightning_modules.cli.config import load_config, load_saved_config

    overrides = [_expand_alias(o) for o in args.overrides]
    if getattr(args, "config", None):
        cfg = load_saved_config(args.config, overrides)
    else:
        cfg = load_config(overrides)
    if args.show_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        raise SystemExit(0)
    return cfg


def _add_dataclass_options(parser: argparse.ArgumentParser, schema: type) -> None:
    """One `--field-name` option per field of a flat dataclass, documented with its default."""
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, type) else type(default)
        doc = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{doc} (default: {default})".strip(),
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind if kind in (int, float, str) else str,
                default=default,
                help=f"{doc} (default: {default})".strip(),
            )


# ---------------------------------------------------------------------------------------------
# commands


def cmd_synth(args: argparse.Namespace) -> int:
    from datamodules.synthetic import SynthConfig, ensure_synthref, generate_synthref

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)}
    cfg = SynthConfig(**values)
    if args.skip_existing and not args.overwrite:
        if ensure_synthref(cfg, root_keys="--root", progress=not args.quiet):
            print(f"SynthRef written to {cfg.root}/synthref")
        else:
            print(f"SynthRef already exists under {cfg.root}/synthref; skipping (use --overwrite).")
        return 0
    out = generate_synthref(cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"SynthRef written to {out}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from datamodules.refer import stats_table

    print(stats_table(args.root, args.dataset, args.split_by, args.splits or None))
    return 0


def cmd_train_sam(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_train_sam

    run_train_sam(_load(args), force=args.force)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_precompute

    run_precompute(_load(args), splits=args.splits)
    return 0


def cmd_superpixels_quality(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_superpixel_quality

    # `--sources sam key=value` : argparse's nargs="*" swallows the overrides; hand them back
    args.overrides = [*[s for s in args.sources if "=" in s], *args.overrides]
    sources = [s for s in args.sources if "=" not in s]
    run_superpixel_quality(_load(args), sources=sources, split=args.split, limit=args.limit)
    return 0


def cmd_superpixels_show(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_superpixel_show

    run_superpixel_show(_load(args), split=args.split, count=args.count, out=args.out)
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from pytorch_lightning.utilities import rank_zero_only

    from lightning_modules.cli.align import align

    metrics = align(_load(args))
    if rank_zero_only.rank == 0:  # one line, not one per process
        loss = metrics.get("align/val_ce")
        held = "no held-out conversations" if loss is None else f"val text loss {loss:.3f}"
        print(f"aligned: {metrics['out']} ({held})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lightning_modules.cli.train import train

    train(_load(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.table:
        from lightning_modules.cli.table import refer_table

        refer_table(_load(args), ckpt=args.ckpt)
        return 0
    from lightning_modules.cli.train import evaluate

    evaluate(_load(args), ckpt=args.ckpt)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_sweep_command

    run_sweep_command(_load(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_report, run_runs_report

    if args.runs:
        run_runs_report(_load(args), args.runs, args.out)
        return 0
    run_report(_load(args))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import run_bench

    projectors = [p for p in args.projectors.split(",") if p] if args.projectors else None
    run_bench(_load(args), projectors, args.repeats, not args.no_baselines, args.profile)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from lightning_modules.probes.grounding import diagnose_grounding

    diagnose_grounding(
        _load(args),
        mode=args.mode,
        steps=args.steps,
        eval_every=args.eval_every,
        out=args.out,
        select_steps=args.select_steps,
    )
    return 0


def cmd_pointing(args: argparse.Namespace) -> int:
    from lightning_modules.probes.pointing import pointing_probe

    pointing_probe(
        _load(args),
        steps=args.steps,
        batch_size=args.batch_size,
        out=args.out,
        pointer=args.pointer,
        train_fraction=args.train_fraction,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_modules.cli.stages import DEMO_OVERRIDES, run_demo

    # The demo's own settings first; the user's overrides come after, so they can replace them.
    args.overrides = [*DEMO_OVERRIDES, *args.overrides]
    run_demo(_load(args))
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def _positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svp",
        description="SVP suite: compare token-compressing visual projectors for MLLM-based "
        "referring image segmentation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `svp <command> --help` for a command's options.\n\n" + OVERRIDES_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    def add(
        name: str,
        help_: str,
        func: Callable,
        config: bool = True,
        under: Any = None,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        """A (sub)command `name` of `under` (default: `svp` itself); `description` defaults to
        `help_`."""
        p = (under or sub).add_parser(
            name,
            help=help_,
            description=description or help_,
            epilog=OVERRIDES_HELP if config else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if config:
            _config_command(p)
        return p

    from datamodules.synthetic import SynthConfig

    p = add("synth", "Generate the offline SynthRef data set (REFER layout).", cmd_synth, False)
    _add_dataclass_options(p, SynthConfig)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing SynthRef")
    existing.add_argument(
        "--skip-existing", action="store_true", help="do nothing if SynthRef already exists"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    data = sub.add_parser("data", help="Data set utilities.", description="Data set utilities.")
    data_sub = data.add_subparsers(dest="data_command", metavar="<data command>", required=True)
    p = data_sub.add_parser(
        "stats",
        help="Print per-split statistics of a REFER-layout data set.",
        description="Print images, refs, sentences, mean objects per image and mean mask area "
        "fraction for each split of a REFER-layout data set (RefCOCO/+/g or SynthRef).",
    )
    p.set_defaults(func=cmd_data_stats)
    p.add_argument("--root", default="data", help="data root holding <dataset>/ (default: data)")
    p.add_argument("--dataset", default="synthref", help="refcoco|refcoco+|refcocog|synthref")
    p.add_argument("--split-by", default="unc", help="unc|google|umd (default: unc)")
    p.add_argument("--splits", nargs="*", help="splits to show (default: all in the refs file)")

    p = add(
        "train-sam",
        "Train the small SAM (segment-anything architecture) on SynthRef instance masks.",
        cmd_train_sam,
    )
    p.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")

    p = add(
        "precompute",
        "Precompute superpixels for the configured source into the sharded cache "
        "(Lightning predict loop; each rank writes its own shards).",
        cmd_precompute,
    )
    p.add_argument("--splits", nargs="*", help="splits to cover (default: train + eval splits)")

    sp = sub.add_parser(
        "superpixels",
        help="Superpixel quality figures and overlays.",
        description="Superpixel quality figures and overlays.",
    )
    sp_sub = sp.add_subparsers(dest="sp_command", metavar="<superpixels command>", required=True)
    for name, help_, func in (
        ("quality", "Mean K, ASA and boundary recall per source.", cmd_superpixels_quality),
        ("show", "Write PNG overlays of superpixels for a few images.", cmd_superpixels_show),
    ):
        p = add(name, help_, func, under=sp_sub)
        p.add_argument("--split", default="val", help="split to use (default: val)")
        if name == "quality":
            p.add_argument(
                "--sources",
                nargs="*",
                default=["sam", "slic", "felzenszwalb", "grid", "oracle"],
                help="sources to compare (default: all five)",
            )
            p.add_argument("--limit", type=_positive, default=None, help="at most this many images")
        else:
            p.add_argument(
                "--count", type=_positive, default=6, help="number of images (default: 6)"
            )
            p.add_argument(
                "--out", default=None, help="output folder (default: runs/superpixels/<source>)"
            )

    p = add(
        "align",
        "Stage 1, as LLaVA's: align the projector (align.train_llm: and the LLM) on image-text "
        "conversations in LLaVA's JSON format (align.data); `svp train "
        "align.checkpoint=<align.out>` starts from it.",
        cmd_align,
    )
    p.add_argument("--config", help="start from a saved run config.yaml")
    p = add("train", "Train the RIS model (resume with ckpt_path=last).", cmd_train)
    p.add_argument("--config", help="start from a saved run config.yaml")
    p = add("eval", "Evaluate a trained RIS checkpoint on the eval splits.", cmd_eval)
    p.add_argument("--config", help="the run's saved config.yaml")
    p.add_argument(
        "--ckpt",
        required=False,
        help="checkpoint path (default: the run's best.ckpt, else its last.ckpt)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="evaluate on every RefCOCO val/testA/testB, RefCOCO+ val/testA/testB and RefCOCOg "
        "val/test split under data.root and write refer-table.md/.csv into the run folder",
    )
    add("sweep", "Run an Optuna sweep (sweep.space=<name>).", cmd_sweep)
    p = add(
        "report",
        "Write the Pareto report of a study (sweep.name=<study>), or with --runs a summary over "
        "seeds of the runs under a folder.",
        cmd_report,
    )
    p.add_argument(
        "--runs",
        default=None,
        help="a folder of runs (e.g. runs/<name>): a table per projector and budget, mean and "
        "min-max over the seeds, and a plot",
    )
    p.add_argument("--out", default=None, help="where --runs writes (default: that folder)")
    p = add(
        "bench",
        "Measure tokens, train step, tokens/s, latency and peak memory per projector.",
        cmd_bench,
        description="Trivial baselines, then per projector on one eval batch: visual tokens, LLM "
        "sequence length, train step time, LLM tokens per second in it, inference latency, peak "
        "memory and projector parameters. Runs on trainer.accelerator (gpu: cuda) at "
        "trainer.precision (32-true or bf16-mixed). `model=shape7b` builds the llava7b shape "
        "with random weights (LLaMA-7B, CLIP-L/336, SAM ViT-H); reduce it with overrides, e.g. "
        "llm.num_hidden_layers=1.",
    )
    p.add_argument(
        "--projectors",
        help="comma-separated projectors to measure, e.g. mlp,semantic (default: every one)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measure (default: 3)")
    p.add_argument("--no-baselines", action="store_true", help="skip the trivial baselines table")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time the parts of each projector's train step (forward stages, backward, "
        "optimizer, the LLM alone)",
    )
    add("demo", "The offline end-to-end demo (what `make demo` runs).", cmd_demo)
    dg = sub.add_parser(
        "diagnose",
        help="Learning diagnostics (oracle prompts) for a RIS config.",
        description="Learning diagnostics for a RIS config.",
    )
    dg_sub = dg.add_subparsers(dest="diagnose_command", metavar="<diagnose command>", required=True)
    p = add(
        "grounding",
        "Train the mask path with the [SEG] prompt from the LLM or from an oracle.",
        cmd_diagnose,
        under=dg_sub,
        description="Train the mask path for --steps with the [SEG] prompt from the LLM (llm) or "
        "an oracle (oracle_point, oracle_token, text_only, oracle_select), or the grounding "
        "pointer's loss alone (pointing), and print val cIoU, pointing accuracy and "
        "the spread of the [SEG] hidden state; writes "
        "<runs_root>/diagnose/<projector>-<mode>/diagnose.json.",
    )
    # checked by diagnose_grounding: importing its MODES here would load torch for every command
    p.add_argument("--mode", default="llm", help="prompt source, one of the above (default: llm)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    p.add_argument("--eval-every", type=int, default=200, help="val every N steps (default: 200)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument(
        "--select-steps",
        type=int,
        default=0,
        help="first N steps as oracle_select (curriculum; semantic only; default: 0)",
    )
    p = add(
        "pointing",
        "How well a pointer without the LLM finds the target superpixel from the tower features.",
        cmd_pointing,
        under=dg_sub,
        description="Train a pointer without the LLM (a bag of words, or a small bidirectional "
        "transformer over words and superpixels) to pick the target's superpixel from its "
        "mask-pooled vision-tower features, without and with its geometry, and print the val "
        "top-1 accuracy of each, overall and per SynthRef expression kind; writes "
        "<runs_root>/diagnose/pointing/pointing.json. A quick yardstick for a tower layer, a "
        "superpixel source or the amount of training data.",
    )
    p.add_argument(
        "--pointer",
        default="bow",
        help="bow (mean word embedding · superpixel MLP) or transformer (default: bow)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train on the first fraction of the training images only (default: 1.0)",
    )
    p.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per step (default: 64)")
    p.add_argument("--out", default=None, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    # matplotlib (imported by several libraries) keeps a font cache in MPLCONFIGDIR, else under
    # $HOME; `svp` writes nothing under $HOME
    os.environ.setdefault(
        "MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), f"svp-matplotlib-{os.getuid()}")
    )
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` words after an option are overrides too
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except SVPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that is a file where a folder goes, no permission, a full disk
        print(f"error: {err}. Check that path.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
