"""Train a ViT + GPT-2 captioner: `python -m captioner_train.train ...` or `accelerate launch -m captioner_train.train ...`.

Data: synthetic scenes (default), COCO captions, or Flickr Karpathy splits. Model: a small preset from configs
(the bundled scene model) or pretrained encoder and decoder checkpoints joined by fresh cross-attention.
Staged training: until `--stage-decoder` only the cross-attention layers learn, until `--stage-all` the whole
decoder, then everything. The output folder loads with `captioner.load(folder)`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, broadcast_object_list,
                               set_seed)
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captioner.layout import config_grid

from .architecture import PRESETS, build_model, image_processor, set_special_tokens
from .data import CocoCaptions, Collator, FlickrCaptions, SyntheticScenes
from .synthetic import VOCABULARY
from .vocabulary import word_tokenizer

TRAIN_SEEDS_START = 10_000_000  # training scenes; evaluation and tests use seeds below this
REPLAN_EVERY = 25  # steps between re-estimates of how many steps a --minutes budget allows
SAVE_RESERVE_S = 20.0  # kept back from a --minutes budget for saving (validations are planned for apart)
_clock = time.monotonic  # tests replace it to run a budget on a simulated clock


@dataclass
class TrainConfig:
    out: str = "runs/scenes"  # output model folder (checkpoints go to out/checkpoint)
    data: str = "synthetic"  # synthetic | coco | flickr
    train_json: str = ""  # coco: captions_train2017.json; flickr: dataset_flickr8k.json
    val_json: str = ""  # coco: captions_val2017.json (flickr uses the same JSON's "val" split)
    image_dir: str = ""  # coco train images / flickr images
    val_image_dir: str = ""  # coco val images
    train_size: int = 200_000  # synthetic scenes per epoch, or a cap on real data samples
    val_size: int = 1_000  # validation samples
    preset: str = "scenes"  # model config from captioner_train.architecture.PRESETS, when not pretrained
    encoder: str = ""  # pretrained encoder, e.g. google/vit-base-patch16-224-in21k
    decoder: str = ""  # pretrained decoder, e.g. gpt2
    epochs: int = 1
    max_steps: int = 0  # train for this many optimizer steps in all (0: run all epochs); sets the LR schedule
    minutes: float = 0.0  # end within this many minutes of starting, rendering included (0: no limit); see plan_steps
    # (--resume keeps the end step planned before, re-planned from then on if --minutes is given again)
    stop_after: int = 0  # end this run at this step (0: at the end); --resume carries on with the same schedule
    batch_size: int = 64
    lr: float = 1.5e-3  # peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 300
    stage_decoder: int = 0  # step at which the whole decoder starts learning (before: cross-attention only)
    stage_all: int = 0  # step at which the encoder starts learning too
    ema: float = 0.999  # decay of the weight average that is saved (0: save the raw weights)
    max_tokens: int = 24  # caption tokens kept per sample, EOS included
    workers: int = 0  # data loader processes (on 2 cores, rendering in-process beats a competing worker)
    render_processes: int = 0  # synthetic: render every scene once up front on this many processes (0: per step)
    ground_weight: float = 0.0  # synthetic: weight of the grounding loss on the words that name an object
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    resume: bool = False  # continue from out/checkpoint
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16 (passed to accelerate)


def _datasets(cfg: TrainConfig):
    if cfg.data == "synthetic":
        grounded = cfg.ground_weight > 0
        train = SyntheticScenes(range(TRAIN_SEEDS_START, TRAIN_SEEDS_START + cfg.train_size),
                                cfg.render_processes, objects=grounded)
        val = SyntheticScenes(range(TRAIN_SEEDS_START - cfg.val_size, TRAIN_SEEDS_START), cfg.render_processes,
                              objects=grounded)
    elif cfg.data == "coco":
        train = CocoCaptions(cfg.train_json, cfg.image_dir, limit=cfg.train_size)
        val = CocoCaptions(cfg.val_json, cfg.val_image_dir or cfg.image_dir, limit=cfg.val_size)
    elif cfg.data == "flickr":
        train = FlickrCaptions(cfg.train_json, cfg.image_dir, "train", limit=cfg.train_size)
        val = FlickrCaptions(cfg.train_json, cfg.image_dir, "val", limit=cfg.val_size)
    else:
        raise ValueError(f"unknown --data {cfg.data!r}; use synthetic, coco or flickr")
    if cfg.ground_weight and cfg.data != "synthetic":
        raise ValueError("--ground-weight needs object boxes, which only --data synthetic has")
    return train, val


def grounding_loss(cross_attentions: tuple[torch.Tensor, ...], ground: torch.Tensor) -> torch.Tensor:
    """Mean over layers and supervised rows of -log(share of the row's head-mean cross-attention that falls on the
    named object), the share weighting each patch by how much of it the object's box covers.

    cross_attentions: L tensors (B, H, T, P + gh*gw), P prefix keys (CLS) first; ground: (B, T, gh*gw) from
    `Collator` (all-zero rows are not supervised). Attention that goes to the CLS key counts as off the object.
    """
    rows = ground.sum(-1) > 0  # (B, T)
    if not rows.any():
        return ground.new_zeros(())
    n = ground.shape[-1]
    losses = []
    for a in cross_attentions:
        on_object = (a.mean(1)[..., -n:] * ground).sum(-1)  # (B, T): head-mean attention mass on the object
        losses.append(-torch.log(on_object[rows] + 1e-6).mean())
    return torch.stack(losses).mean()


def lr_factor(step: int, warmup: int, horizon: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then a half cosine that reaches 0 at `horizon`
    (transformers' get_cosine_schedule_with_warmup, with a horizon that a time budget may move). A horizon under
    twice the warm-up halves it, so that even a run a budget cuts very short ends annealed."""
    warmup = min(warmup, horizon // 2)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, horizon - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def validations_to_come(step: int, horizon: int, steps_per_epoch: int) -> int:
    """Validation passes left once `step` has been trained, for a run that ends at `horizon`: one per epoch end up
    to it (this step's own, if it ends an epoch), and a last one if the horizon does not end an epoch."""
    spe = steps_per_epoch
    return horizon // spe - step // spe + (horizon % spe != 0) + (step % spe == 0 and horizon > step)


def plan_steps(step: int, cap: int, steps_per_s: float, seconds_left: float, steps_per_epoch: int = 1,
               validation_s: float = 0.0) -> int:
    """The step at which to end: the last one, at most `cap` (the epochs or --max-steps) and at least `step`, whose
    training at the rate measured so far plus the validations up to it fit in `seconds_left`.

    Why a budget rather than a step count: CPUs differ by 2x and more (1.6 steps/s on one 2-core AMD EPYC, 3.1 on an
    AMX Xeon), so no fixed count fits an hour on every machine. The cosine schedule ends at the planned step, so a
    slower machine trains fewer steps but still anneals to a small learning rate instead of being cut mid-decay.
    """
    def cost(h: int) -> float:  # seconds from now to the end of a run that stops at h; grows with h
        return (h - step) / steps_per_s + validations_to_come(step, h, steps_per_epoch) * validation_s

    lo, hi = step, cap  # binary search for the largest h with cost(h) <= seconds_left
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid - 1)
    return lo


def _model_and_preprocessing(cfg: TrainConfig):
    if cfg.encoder or cfg.decoder:
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
        if not (cfg.encoder and cfg.decoder):
            raise ValueError("--encoder and --decoder go together")
        tokenizer = AutoTokenizer.from_pretrained(cfg.decoder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; masking uses lengths, not this id
        model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(cfg.encoder, cfg.decoder)
        set_special_tokens(model, tokenizer)
        return model, tokenizer, AutoImageProcessor.from_pretrained(cfg.encoder)
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown --preset {cfg.preset!r}; available: {sorted(PRESETS)}")
    tokenizer = word_tokenizer(VOCABULARY)
    return build_model(PRESETS[cfg.preset], tokenizer, cfg.seed), tokenizer, image_processor(PRESETS[cfg.preset])


# The parameters a VisionEncoderDecoderModel adds between encoder and decoder, by decoder family: GPT-2's
# `crossattention` + `ln_cross_attn`, BERT's and RoBERTa's `crossattention` (its LayerNorm inside), TrOCR's and
# MBart's `encoder_attn` + `encoder_attn_layer_norm`, and the projection used when encoder and decoder widths differ.
CROSS_ATTENTION_NAMES = ("crossattention", "ln_cross_attn", "encoder_attn", "enc_to_dec_proj")


def cross_attention_parameters(model) -> list[str]:
    """Names of the parameters that join the encoder to the decoder; raises if this decoder family has none we know."""
    names = [n for n, _ in model.named_parameters() if any(key in n for key in CROSS_ATTENTION_NAMES)]
    if not names:
        raise RuntimeError(f"No cross-attention parameters found in {type(model.decoder).__name__} (looked for names "
                           f"containing {', '.join(CROSS_ATTENTION_NAMES)}): the first training stage would train "
                           "nothing. Set --stage-decoder 0.")
    return names


def _set_stage(model, step: int, cfg: TrainConfig) -> str:
    """Freeze by stage; parameters without gradients are skipped by AdamW, so one optimizer serves all stages."""
    stage = "all" if step >= cfg.stage_all else "decoder" if step >= cfg.stage_decoder else "cross"
    cross = set(cross_attention_parameters(model)) if stage != "all" else set()
    for name, p in model.named_parameters():
        p.requires_grad_(stage == "all" or (stage == "decoder" and name.startswith("decoder.")) or name in cross)
    return stage


class _Ema:
    """Exponential moving average of the weights: a cheap, reliable gain in final accuracy."""

    def __init__(self, model, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm up, so the early random weights fade quickly
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


class _Budget:
    """Re-plans the last step of a --minutes run every REPLAN_EVERY steps from the training rate seen so far.

    Kept back from the time left: one validation pass per epoch end still to come (timed once one has run; before
    that, priced as one training step per validation batch, an overestimate) and SAVE_RESERVE_S for saving.
    """

    def __init__(self, cfg: TrainConfig, started: float, step: int, steps_per_epoch: int, val_batches: int):
        self.deadline = started + 60 * cfg.minutes if cfg.minutes else None
        self.steps_per_epoch, self.val_batches, self.val_s = steps_per_epoch, val_batches, None
        self.first_step, self.train_s, self.last = step, 0.0, _clock()

    def stepped(self) -> None:
        now = _clock()
        self.train_s, self.last = self.train_s + now - self.last, now

    def due(self, step: int) -> bool:  # the same on every process: it depends on the step and the config only
        return self.deadline is not None and step % REPLAN_EVERY == 0 and step - self.first_step >= REPLAN_EVERY

    def plan(self, step: int, cap: int) -> int:
        rate = (step - self.first_step) / max(self.train_s, 1e-9)  # steps/s
        val_s = self.val_s if self.val_s is not None else self.val_batches / rate
        left = self.deadline - _clock() - SAVE_RESERVE_S
        return plan_steps(step, cap, rate, left, self.steps_per_epoch, val_s)

    @contextlib.contextmanager
    def validating(self):
        t = _clock()
        yield
        now = _clock()
        self.val_s, self.last = now - t, now  # validation time is not training time


@torch.no_grad()
def _validate(model, loader, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch.pop("ground", None)  # validation loss: the captions alone
        n = (batch["labels"] != -100).sum()
        loss = model(**batch).loss * n
        total += accelerator.gather(loss.detach()).sum().item()
        count += accelerator.gather(n).sum().item()
    model.train()
    return total / max(count, 1)


class _Progress:
    """Where the run is: the steps taken, the step the schedule anneals to and the run ends at (`horizon`: the cap,
    or less when --minutes plans so) and the cap it was planned under. Travels with the checkpoint as a plain dict."""

    def __init__(self, cap: int):
        self.state = {"step": 0, "horizon": cap, "cap": cap}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state.update(state)


@dataclass
class _Run:
    """What the training loop works on, once accelerate has prepared it."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    schedule: LambdaLR
    ema: _Ema | None
    progress: _Progress
    steps_per_epoch: int  # per process, after prepare() has split the batches among the processes
    cap: int  # the epochs' steps, or --max-steps if fewer

    def end(self, cfg: TrainConfig) -> int:  # horizon <= cap always: plans never pass it, a resume resets it
        return min(self.progress.state["horizon"], cfg.stop_after or self.cap)


def _accelerator(cfg: TrainConfig) -> Accelerator:
    # A seedable sampler reshuffles from seed + epoch, so a resumed run sees the same order as an unbroken one.
    # Several processes without a GPU (torchrun --nproc_per_node N): accelerate joins them over gloo only when told
    # cpu=True; otherwise each would train alone on all the data.
    several_on_cpu = not torch.accelerator.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # find_unused_parameters: parameters the loss does not reach (ViT's pooler, the stages' frozen ones) would
    # otherwise stop DDP at the second step.
    return Accelerator(cpu=several_on_cpu, mixed_precision=cfg.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _build_data(cfg: TrainConfig, model, tokenizer, processor) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders; the training order is seeded."""
    train_set, val_set = _datasets(cfg)
    grid = config_grid(model.config.encoder) if cfg.ground_weight else None
    collate = Collator(processor, tokenizer, cfg.max_tokens, grid)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                              num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_set, cfg.batch_size, collate_fn=collate, num_workers=0)
    return train_loader, val_loader


def _prepare(cfg: TrainConfig, accelerator: Accelerator, model, train_loader, val_loader) -> _Run:
    """Optimizer, schedule and weight average, handed to accelerate and registered with the checkpoint; with
    --resume, loaded from out/checkpoint."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # Steps are counted per process, after prepare() has split the batches among the processes; the schedule is
    # stepped here once per optimizer step (accelerate would step a prepared one once per process).
    steps_per_epoch = len(train_loader)
    cap = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        cap = min(cap, cfg.max_steps)
    progress = _Progress(cap)
    schedule = LambdaLR(optimizer, lambda step: lr_factor(step, cfg.warmup_steps, progress.state["horizon"]))
    accelerator.register_for_checkpointing(schedule)
    ema = _Ema(accelerator.unwrap_model(model), cfg.ema) if cfg.ema else None
    if ema:
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(progress)
    if cfg.resume:
        accelerator.load_state(str(Path(cfg.out) / "checkpoint"))
        accelerator.print(f"resumed at step {progress.state['step']}")
        if progress.state.get("cap") != cap:  # other --epochs, --max-steps or processes: aim at the new cap
            progress.state.update(horizon=cap, cap=cap)
    return _Run(model, optimizer, train_loader, val_loader, schedule, ema, progress, steps_per_epoch, cap)


def _train_step(cfg: TrainConfig, run: _Run, accelerator: Accelerator, batch: dict) -> tuple[float, str]:
    """One optimizer step on `batch` at the stage its step is in; (its loss, the stage)."""
    model = run.model
    stage = _set_stage(accelerator.unwrap_model(model), run.progress.state["step"], cfg)
    ground = batch.pop("ground", None)
    if ground is None:
        loss = model(**batch).loss
    else:
        outputs = model(**batch, output_attentions=True)
        loss = outputs.loss + cfg.ground_weight * grounding_loss(outputs.cross_attentions, ground)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.state["step"] += 1
    if run.ema:
        run.ema.update(accelerator.unwrap_model(model), run.progress.state["step"])
    return loss.item(), stage


def _train_epoch(cfg: TrainConfig, run: _Run, accelerator: Accelerator, budget: _Budget, bar) -> tuple[int, list,
                                                                                                         float]:
    """Train from the current step to the end of its epoch or of the run; (the epoch, its losses, the last rate)."""
    progress = run.progress.state
    epoch, skip = divmod(progress["step"], run.steps_per_epoch)
    run.train_loader.set_epoch(epoch)  # a new, reproducible order each epoch
    loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    running = []
    for batch in loader:
        loss, stage = _train_step(cfg, run, accelerator, batch)
        running.append(loss)
        budget.stepped()
        if budget.due(progress["step"]):  # before schedule.step(), which sets the next step's rate from it
            progress["horizon"] = broadcast_object_list([budget.plan(progress["step"], run.cap)])[0]
            bar.total = progress["horizon"]
        last_lr = run.schedule.get_last_lr()[0]  # the rate this step used
        run.schedule.step()
        bar.update(1)
        bar.set_postfix(loss=f"{sum(running[-50:]) / len(running[-50:]):.3f}", stage=stage)
        if progress["step"] % cfg.checkpoint_every == 0:
            accelerator.save_state(str(Path(cfg.out) / "checkpoint"))
        if progress["step"] >= run.end(cfg):
            break
    return epoch, running, last_lr


def _epoch_record(epoch: int, step: int, running: list, val_loss: float, start: float, last_lr: float) -> dict:
    """One line of the training card's history."""
    record = {"epoch": epoch + 1, "step": step, "train_loss": sum(running) / max(len(running), 1),
              "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)),
              "minutes": (time.time() - start) / 60, "lr": last_lr}
    record["train_perplexity"] = math.exp(min(record["train_loss"], 50))
    return record


def _save(cfg: TrainConfig, run: _Run, accelerator: Accelerator, tokenizer, processor, history: list,
          started: float) -> None:
    """A last checkpoint, then (main process) the model folder: weights (the average, if kept), tokenizer,
    processor and the training card."""
    out = Path(cfg.out)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out / "checkpoint"))
    if accelerator.is_main_process:
        final = run.ema.model if run.ema else accelerator.unwrap_model(run.model)
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
        card = {"config": asdict(cfg), "history": history, "final": history[-1] if history else {},
                "parameters": sum(p.numel() for p in final.parameters()), "torch_threads": torch.get_num_threads(),
                "steps": run.progress.state["step"], "step_cap": run.cap, "minutes": (_clock() - started) / 60}
        (out / "training_card.json").write_text(json.dumps(card, indent=2))


def main(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the metrics written to the training card."""
    started = _clock()  # a --minutes budget counts from here: rendering and validation are part of it
    accelerator = _accelerator(cfg)
    set_seed(cfg.seed)
    model, tokenizer, processor = _model_and_preprocessing(cfg)
    train_loader, val_loader = _build_data(cfg, model, tokenizer, processor)
    if cfg.ground_weight:  # the grounding loss reads the decoder's attention weights, which SDPA does not return
        model.set_attn_implementation({"encoder": model.config.encoder._attn_implementation, "decoder": "eager"})
    run = _prepare(cfg, accelerator, model, train_loader, val_loader)
    card = Path(cfg.out) / "training_card.json"
    history, start = [], time.time()
    if cfg.resume and card.exists():  # one card for the whole run, across sessions
        history = json.loads(card.read_text())["history"]
    budget = _Budget(cfg, started, run.progress.state["step"], run.steps_per_epoch, len(run.val_loader))
    bar = tqdm(total=run.progress.state["horizon"], initial=run.progress.state["step"],
               disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)
    run.model.train()
    while run.progress.state["step"] < run.end(cfg):
        epoch, running, last_lr = _train_epoch(cfg, run, accelerator, budget, bar)
        with budget.validating():
            val_loss = _validate(run.ema.model if run.ema else run.model, run.val_loader, accelerator)
        history.append(_epoch_record(epoch, run.progress.state["step"], running, val_loss, start, last_lr))
        accelerator.print(json.dumps(history[-1]))
    bar.close()
    _save(cfg, run, accelerator, tokenizer, processor, history, started)
    return history[-1] if history else {}


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
