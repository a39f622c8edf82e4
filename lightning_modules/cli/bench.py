"""`svp bench`: trivial baselines and per-projector efficiency (tokens, train step, tokens per
second, latency, peak memory), on the device and precision of `trainer`."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError
from common.sam import RANDOM_WEIGHTS
from lightning_modules.metrics import ciou, giou

BASELINES = ("whole_image", "largest_object", "random_object")


def baseline_predictions(refer, name: str, seed: int = 0) -> tuple[list, list]:
    """Predictions of a trivial baseline for every sentence of `refer` (a ReferDataset)."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    instance_cache: dict[int, np.ndarray] = {}
    for i in range(len(refer)):
        item = refer[i]
        gt = item["mask"]
        if name == "whole_image":
            pred = np.ones_like(gt)
        else:
            image_id = item["image_id"]
            if image_id not in instance_cache:
                instance_cache[image_id] = refer.instance_masks(image_id)
            masks = instance_cache[image_id]
            if len(masks) == 0:
                pred = np.zeros_like(gt)
            elif name == "largest_object":
                pred = masks[int(np.argmax(masks.reshape(len(masks), -1).sum(1)))]
            elif name == "random_object":
                pred = masks[int(rng.integers(len(masks)))]
            else:
                raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        preds.append(torch.from_numpy(np.ascontiguousarray(pred)))
        targets.append(torch.from_numpy(np.ascontiguousarray(gt)))
    return preds, targets


def trivial_baselines(cfg: DictConfig, splits: list[str] | None = None) -> list[dict]:
    from datamodules.refer import ReferDataset

    rows = []
    for split in splits or list(cfg.data.eval_splits):
        refer = ReferDataset(cfg.data.root, cfg.data.dataset, cfg.data.split_by, split)
        for name in BASELINES:
            preds, targets = baseline_predictions(refer, name, cfg.seed)
            rows.append(
                {
                    "split": split,
                    "baseline": name,
                    "ciou": ciou(preds, targets),
                    "giou": giou(preds, targets),
                }
            )
    return rows


def format_baselines(rows: list[dict]) -> str:
    lines = ["| split | baseline | cIoU | gIoU |", "|---|---|---|---|"]
    lines += [
        f"| {r['split']} | {r['baseline']} | {r['ciou']:.4f} | {r['giou']:.4f} |" for r in rows
    ]
    return "\n".join(lines)


PRECISIONS = ("32-true", "32", "bf16-mixed")


def bench_device(cfg: DictConfig) -> tuple[torch.device, bool]:
    """The device `trainer.accelerator` names (gpu: cuda) and whether `trainer.precision` asks for
    bf16 autocast."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}: `svp bench` runs on cpu or gpu (cuda)"
        )
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA device; run on a GPU "
            "machine or pass trainer=cpu"
        )
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r}: `svp bench` measures {' or '.join(PRECISIONS)}"
        )
    return torch.device("cuda" if gpu else "cpu"), precision == "bf16-mixed"


def bench_tokenizer(cfg: DictConfig):
    """The run's tokenizer, padded with unused tokens to `llm.vocab_size` when that is set, so a
    random LLM's embeddings and lm_head take a real model's shape."""
    from lightning_modules.llm import tokenizer_for

    tokenizer = tokenizer_for(cfg)
    size = cfg.llm.vocab_size
    if size is None:
        return tokenizer
    if cfg.llm.path:
        raise ConfigError(
            f"llm.vocab_size={size} sizes a random LLM, but llm.path={cfg.llm.path!r} brings its "
            "own vocabulary; leave llm.vocab_size null"
        )
    if size < len(tokenizer):
        raise ConfigError(
            f"llm.vocab_size={size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            f"set it to at least {len(tokenizer)}, or null"
        )
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(size - len(tokenizer))])
    return tokenizer


# Peak memory: the most memory in use from the first timed inference to the last train step (the
# optimizer's state included), above what the process held before the projector's model was
# built. On CUDA torch's allocator counts it; on CPU the kernel's high-water mark of the resident
# set (VmHWM), reset through /proc/self/clear_refs.
def memory_measure(device: torch.device) -> str:
    """What the peak memory column measures on `device`."""
    return "CUDA allocated" if device.type == "cuda" else "process RSS"


def _memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> bool:
    """Start a new peak; False where the peak cannot be measured (CPU without Linux's /proc)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        _proc_status_bytes("VmHWM")
    except OSError:
        return False
    return True


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _release_memory(device: torch.device) -> None:
    """Free what earlier models left, so the next one's memory is measured from a clean start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _projector_row(
    cfg: DictConfig,
    name: str,
    batch,
    tokenizer,
    repeats: int,
    device: torch.device,
    bf16: bool,
    profile: bool = False,
) -> dict:
    from pytorch_lightning.utilities import move_data_to_device

    from common.sam import random_weights_allowed
    from lightning_modules.cli.config import rebase_config
    from lightning_modules.ris_model import RISModel

    # the command's own settings (dotted overrides included), with this projector's defaults
    # unless the command chose this projector (then its projector.* overrides hold, e.g.
    # `projector=tokenpacker projector.s=4`); a random SAM's features are kept in memory only,
    # never in the disk cache that runs share
    overrides = [] if cfg.projector.name == name else [f"projector={name}"]
    if cfg.mask_decoder.checkpoint == RANDOM_WEIGHTS:
        overrides.append("cache.features=false")
    pcfg = rebase_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    _release_memory(device)
    before = _memory_in_use(device)
    torch.manual_seed(cfg.seed)
    with random_weights_allowed():
        model = RISModel(pcfg, tokenizer).to(device)
    batch = move_data_to_device(batch, device)
    model.eval()
    with torch.no_grad(), _autocast(device, bf16):
        model(batch)  # warm-up: the frozen encoders run once, their features stay in memory
        measured = _reset_peak(device)
        start = _clock(device)
        for _ in range(repeats):
            out = model(batch)
        latency = (_clock(device) - start) / repeats
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        with _autocast(device, bf16):
            loss = model.losses(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()  # warm-up: the optimizer's state, the allocator's and autograd's first use
    start = _clock(device)
    for _ in range(repeats):
        train_step()
    step = (_clock(device) - start) / repeats
    peak = (_peak(device) - before) / 1024**3 if measured else None
    parts = step_parts(model, batch, opt, repeats, device, bf16) if profile else None
    tokens = out["num_tokens"].float()
    bs = len(batch["images"])
    return {
        "parts": parts,
        "projector": name,
        "budget": model.projector.token_budget,
        "tokens_mean": float(tokens.mean()),
        "seq_len_mean": float(out["seq_len"].float().mean()),
        "train_step_s": step,
        "tokens_per_s": float(out["seq_len"].sum()) / step,
        "latency_ms_per_sample": 1000 * latency / bs,
        "peak_gib": peak,
        "params_m": sum(p.numel() for p in model.projector.parameters()) / 1e6,
    }


# the parts of a train step `svp bench --profile` times, in the order it prints them
STEP_PARTS = {
    "forward": "forward and the losses",
    "candidates": "– grounding: the re-ranker's candidate masks (SAM decoder, no gradient)",
    "grounding": "– grounding: the rest (scores, pointer, re-ranker)",
    "llm": "– LLM",
    "projector": "– projector",
    "mask_decoder": "– the final mask decoding",
    "backward": "backward",
    "optimizer": "optimizer step",
    "step": "the whole step",
    "llm_alone": "the LLM's forward and backward alone",
}


def step_parts(
    model, batch, opt, repeats: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """Seconds per train step (mean of `repeats`) in each of `STEP_PARTS`: the forward's parts
    timed around the stages' calls, and the LLM's forward and backward alone on the step's own
    inputs (what no change outside the LLM can make faster)."""
    from lightning_modules.llm import llm_precision

    spent = dict.fromkeys(STEP_PARTS, 0.0)
    started, inside, llm_inputs = {}, [], {}

    def enter(name):
        def hook(module, args, kwargs):
            if name == "llm" and not llm_inputs:
                llm_inputs.update(kwargs)
            inside.append(name)
            started[name] = _clock(device)

        return hook

    def leave(name):
        def hook(module, args, output):
            spent[name] += _clock(device) - started[name]
            inside.pop()

        return hook

    decoder = model.mask_decoder
    low_res = decoder.low_res

    def timed_low_res(*args):
        start = _clock(device)
        out = low_res(*args)
        if inside and inside[-1] == "grounding":  # the candidates, not the final decoding
            spent["candidates"] += _clock(device) - start
        return out

    handles = []
    for name in ("projector", "llm", "grounding", "mask_decoder"):
        module = getattr(model, name)
        handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
        handles.append(module.register_forward_hook(leave(name)))
    decoder.low_res = timed_low_res
    try:
        for _ in range(repeats):
            t0 = _clock(device)
            with _autocast(device, bf16):
                loss = model.losses(model(batch), batch)["loss"]
            t1 = _clock(device)
            opt.zero_grad()
            loss.backward()
            t2 = _clock(device)
            opt.step()
            t3 = _clock(device)
            spent["forward"] += t1 - t0
            spent["backward"] += t2 - t1
            spent["optimizer"] += t3 - t2
            spent["step"] += t3 - t0
    finally:
        for handle in handles:
            handle.remove()
        del decoder.low_res  # the method again
    spent["grounding"] -= spent["candidates"]
    embeds = llm_inputs.pop("inputs_embeds").detach()
    for _ in range(repeats):
        start = _clock(device)
        with _autocast(device, bf16), llm_precision(model.llm_dtype, device):
            out = model.llm(inputs_embeds=embeds.requires_grad_(), **llm_inputs)
            total = out.logits.float().sum() + out.hidden_states[-1].float().sum()
        total.backward()
        spent["llm_alone"] += _clock(device) - start
    opt.zero_grad()
    return {k: v / repeats for k, v in spent.items()}


def format_step_parts(rows: list[dict]) -> list[str]:
    """The `--profile` table (a column per projector) and the most a faster step could gain
    without changing the LLM's work (whole step ÷ the LLM's part)."""
    names = [r["projector"] for r in rows]
    out = [
        "| part of the train step (s) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in STEP_PARTS.items():
        out.append(f"| {label} | " + " | ".join(f"{r['parts'][key]:.3f}" for r in rows) + " |")
    bound = ", ".join(
        f"{r['projector']} {r['parts']['step'] / r['parts']['llm_alone']:.1f}×" for r in rows
    )
    return [*out, "", f"most speed-up without changing the LLM's work (step ÷ LLM alone): {bound}"]


def format_projector_rows(rows: list[dict], device: torch.device) -> list[str]:
    """The projector table, then semantic's train step as a fraction of mlp's when both ran."""
    out = [
        "| projector | budget | tokens/image | LLM seq len | train step (s) | "
        "LLM tokens/s (train) | latency (ms/sample) | "
        f"peak memory (GiB, {memory_measure(device)}) | projector params (M) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        out.append(
            f"| {r['projector']} | {r['budget']} | {r['tokens_mean']:.1f} | "
            f"{r['seq_len_mean']:.1f} | {r['train_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['latency_ms_per_sample']:.2f} | {peak} | {r['params_m']:.3f} |"
        )
    by_name = {r["projector"]: r for r in rows}
    if "mlp" in by_name and "semantic" in by_name:
        ratio = by_name["semantic"]["train_step_s"] / by_name["mlp"]["train_step_s"]
        out += ["", f"train step, semantic / mlp: {ratio:.2f}×"]
    return out


def model_summary(cfg: DictConfig, vocab: int) -> str:
    """One line on the shape the projectors were measured at."""
    v, llm, md = cfg.vision, cfg.llm, cfg.mask_decoder
    vision = f"{v.name} from {v.path}"
    if not v.path:
        size = f", {v.image_size} px / patch {v.patch_size}" if v.image_size else ""
        vision = f"random {v.name}, {v.num_hidden_layers} layers of {v.hidden_size}{size}"
    layers = f"{llm.num_hidden_layers} layer{'s' if llm.num_hidden_layers != 1 else ''}"
    lm = llm.path or f"random LLaMA, {layers} of {llm.hidden_size}"
    lora = f", LoRA r {llm.lora.r}" if llm.lora.enabled else ""
    sam = "random weights" if md.checkpoint == RANDOM_WEIGHTS else md.checkpoint
    return (
        f"Vision: {vision}. LLM: {lm}, vocabulary {vocab}, {llm.dtype}{lora}. "
        f"SAM: {md.model_type}, {sam}."
    )


def projector_bench(
    cfg: DictConfig,
    projectors: list[str] | None = None,
    repeats: int = 3,
    baselines: bool = True,
    profile: bool = False,
) -> str:
    """Baselines on the eval splits, then one row per projector (all by default) on one eval
    batch, each model built at the config's shape on `trainer`'s device and precision; with
    `profile`, where each projector's train step goes (`step_parts`)."""
    from common.threads import use_threads
    from datamodules.ris import RISDataModule
    from lightning_modules.projectors import PROJECTORS

    names = sorted(PROJECTORS) if projectors is None else list(projectors)
    unknown = [n for n in names if n not in PROJECTORS]
    if unknown or not names:
        raise ConfigError(
            f"--projectors {','.join(names)}: unknown or none; choose from "
            f"{', '.join(sorted(PROJECTORS))}"
        )
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats} must be at least 1")
    if not cfg.data.eval_splits:
        raise ConfigError("data.eval_splits is empty; the bench measures one batch of the first")
    device, bf16 = bench_device(cfg)
    threads = use_threads(cfg.trainer.threads, "trainer.threads")
    sp = cfg.superpixels
    if "semantic" in names and getattr(sp, "checkpoint", None) == RANDOM_WEIGHTS:
        raise ConfigError(
            f"superpixels.checkpoint={RANDOM_WEIGHTS} (it follows mask_decoder.checkpoint): SAM "
            "superpixels need a trained SAM. Pass superpixels.checkpoint=<a SAM checkpoint> "
            "superpixels.model_type=<its type> (e.g. runs/sam/sam_small.pth and custom), or "
            "another source such as superpixels=slic"
        )
    out = []
    if baselines:
        out += ["## Trivial baselines", "", format_baselines(trivial_baselines(cfg)), ""]
    tokenizer = bench_tokenizer(cfg)
    # one batch of the first eval split is all the bench reads: superpixels for that split only
    split = cfg.data.eval_splits[0]
    one_split = OmegaConf.merge(cfg, {"data": {"train_split": split, "eval_splits": [split]}})
    dm = RISDataModule(one_split, tokenizer)
    dm.needs_superpixels = "semantic" in names
    dm.prepare_data()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()[0]))
    rows = [_projector_row(cfg, n, batch, tokenizer, repeats, device, bf16, profile) for n in names]
    where = f"{device.type}, {cfg.trainer.precision}" + (
        f", {threads} threads" if device.type == "cpu" else f", {torch.cuda.get_device_name()}"
    )
    out += [
        f"## Projectors (one eval batch of {len(batch['images'])}; {repeats} timed repeats after "
        f"one warm-up; {where})",
        "",
        model_summary(cfg, len(tokenizer)),
        "Peak memory: the most in use from the first timed inference to the last train step, "
        "above what the process held before the projector's model was built.",
        "",
        *format_projector_rows(rows, device),
    ]
    if profile:
        out += ["", f"## Where a train step goes (mean of {repeats} steps)", ""]
        out += format_step_parts(rows)
    return "\n".join(out)
