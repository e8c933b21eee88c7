"""Train Prompt-RIS (§4.2), nanoGPT style: the knobs, the two-stage schedule, then `main` with the loop.

    python train.py                                   # demo: built-in data, tiny model, CPU
    python train.py --config paper --clip-weights clip_vit_b16.safetensors \\
        --sam-weights sam_vit_b.safetensors --vocab bpe_simple_vocab_16e6.txt.gz --data-root data/refer
    torchrun --nproc_per_node=8 train.py --config paper ...       # DDP: the global batch is split
    python train.py --resume --out runs/paper         # continue a killed run, bitwise exactly (CPU)
    python train.py --help                            # every knob, its paper value and section

§4.2: AdamW, lr 1e-4 with polynomial decay (power 0.9), 50 epochs of 16 images x b = 4 sentences (an epoch is
one pass over the training images); the first 20 epochs train CLIP + CMP + ICL on the coarse mask, the last 30
the whole model end to end; CLIP and SAM stay frozen. The demo starts from random towers (no official weights),
which learn nothing frozen, so it trains them too. Each step: micro-batches -> forward -> Eq. (9) -> backward
(train_step) -> clip, AdamW -> log, validate, keep the best, save (main). Every random draw of a training sample is
keyed by (seed, epoch, image, sentence), and a step's images are the same for any number of processes, so one
process, N processes and any --micro-batch train the same model up to float rounding (docs/determinism.md).
Process setup, checkpoints, the run log and the SAM cache live in runtime.py, checkpoints.py and sam_cache.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import synth
from checkpoints import (TrainState, init_from_run, keep_best, load_checkpoint, restore, resumed_best, rng_untouched,
                         save_checkpoint, save_metrics, save_run_model, seed_everything)
from clip_vit import Tokenizer
from coco import has_refs
from eval import evaluate
from keyed_random import combine_keys
from load_weights import load_clip, load_sam
from prompt_ris import LossConfig, PromptRIS, PromptRISConfig, total_loss
from runtime import (STOP, OutOfMemory, Processes, RunLog, autocast, autocast_dtype, barrier, check_inputs,
                     dataset_specs, gather_metrics, last_checkpoint, loader_workers, mean_over_ranks, open_run_folder,
                     out_of_memory_message, parse_config, peak_memory_mb, reset_peak_memory, setup_processes, shutdown,
                     stop_if_not_finite, stop_if_signalled, wrap_model)
from sam_cache import sam_cache_dir, sam_embeddings

# ---------------------------------------------------------------------------------------------
# Knobs: one dataclass, defaults = the paper (§4.2); --help lists each with its section
# ---------------------------------------------------------------------------------------------


_MODEL_DEFAULTS = PromptRISConfig()  # prompt dropout and Gumbel temperature live in the model config


def knob(default, help: str, section: str = "", **argparse_kwargs):
    """A TrainConfig field: its default, help text, the paper section it comes from, argparse extras; a numeric
    knob's allowed range as min= / max= (inclusive) and above= / below= (exclusive), checked at parse time."""
    return field(default=default, metadata={"help": help, "section": section, **argparse_kwargs})


@dataclass
class TrainConfig:
    # -- what to train on --
    config: str = knob("auto", "preset: 'paper' (§4.2) or 'demo' (tiny model, built-in data, CPU); "
                       "'auto' = paper when weights or a data root are given, else demo",
                       choices=("auto", "paper", "demo"))
    out: str = knob("runs/paper", "run directory: config.json, ckpt.pt, model.safetensors, log.jsonl, "
                    "curves.png, train.log, metrics.json")
    clip_weights: str | None = knob(None, "CLIP ViT-B/16 safetensors (OpenAI or Hugging Face naming)", "§4.2",
                                    type=str)
    sam_weights: str | None = knob(None, "SAM ViT-B safetensors (segment_anything or Hugging Face naming)",
                                   "§4.2", type=str)
    vocab: str | None = knob(None, "CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, or a Hugging Face "
                             "vocab.json with merges.txt beside it); none = byte-level tokens", "§3.1", type=str)
    data_root: str | None = knob(None, "refer-API data root (see data.py); the demo writes its built-in "
                                 "data there when absent", "§4.1", type=str)
    datasets: str = knob("refcoco,refcoco+,refcocog", "training sets, combined with every val/test image "
                         "removed; name or name:split_by (default splits unc, unc, umd)", "§4.2")
    hold_out_other_partition: bool = knob(True, "also remove from training the val/test images of G-Ref's other "
                                          "partition (google when training on umd, and vice versa) when its refs "
                                          "file is present; off, a val(G) score is not held out", "§4.2")
    val_dataset: str = knob("refcoco", "validation set (name or name:split_by)", "§4.1")
    val_split: str = knob("val", "validation split", "§4.1")
    val_images: int = knob(0, "images used by the periodic validation (0 = all; the final one uses all)", min=0)
    seen_only: bool = knob(False, "train on refs of the 48 seen COCO categories only (data.OV_SEEN_CATEGORIES, "
                           "CGFormer's split after OVR-CNN); images stay, refs of other categories are dropped",
                           "§4.1, Table 2")
    skip_bad_images: bool = knob(False, "skip training images that cannot be read (each counted, the count printed at "
                                 "each epoch's end) instead of stopping at the first, naming it; evaluation never "
                                 "skips (it would change the metric's denominator)")
    # -- model (sizes and the ablation switches of Tables 3-5) --
    clip_size: int = knob(480, "CLIP input size H_C x W_C (patch 16 -> 30 x 30 grid)", "§4.2", min=16)
    sam_size: int = knob(1024, "SAM input size (must match SAM weights when given)", "§4.2", min=16)
    n_prompts: int = knob(16, "prompt tokens n per layer and direction", "§4.2", min=1)
    cmp: str = knob("both", "Cross-Modal Prompting: both | v2l | l2v | none", "Table 4",
                    choices=("both", "v2l", "l2v", "none"))
    prompts: str = knob("mask,point,text", "prompt types given to SAM", "Table 5")
    use_sam: bool = knob(True, "train and evaluate the SAM branch (--no-use-sam: coarse mask only)", "Table 3")
    icl: bool = knob(True, "Instance Contrastive Learning: L_icl of Eq. (9) on both masks (--no-icl: Table 3 rows "
                     "1, 2, 4, Table 4, §4.4 w/o ICL)", "§3.3, Table 3")
    prompt_dropout: float = knob(_MODEL_DEFAULTS.prompt_dropout, "drop rate of each prompt type in training "
                                 "(rate not given in the paper)", "§4.2", min=0, below=1)
    gumbel_tau: float = knob(_MODEL_DEFAULTS.gumbel_tau, "Gumbel-softmax temperature", "Eq. (3)", above=0)
    init_from: str | None = knob(None, "start from a trained run's weights (its directory: best.safetensors, else "
                                 "model.safetensors, as eval.py picks; or one of its .safetensors files), e.g. a "
                                 "RefCOCO run fine-tuned on your own data; its model config must equal this one",
                                 type=str)
    train_towers: bool | None = knob(None, "also train the CLIP and SAM towers; default: only when no official "
                                     "weights are given (random towers must learn)", "§3.1")
    # -- optimisation --
    images_per_batch: int = knob(16, "images per global batch (split across DDP ranks)", "§4.2", min=1)
    sentences_per_image: int = knob(4, "sentences b per image for ICL (batch = images x b)", "§3.3, §4.2", min=1)
    epochs: int = knob(50, "training epochs; one epoch = one pass over the training images (each with b sentences), "
                       "i.e. images // images-per-batch steps (paper data: ~1,800, an estimate: README)", "§4.2",
                       min=1)
    stage1_epochs: int = knob(20, "first epochs train CLIP + CMP + ICL only (coarse masks, no SAM); "
                              "at most --epochs (equal: a stage-1-only run)", "§4.2", min=0)
    lr: float = knob(1e-4, "AdamW initial learning rate", "§4.2", above=0)
    lr_power: float = knob(0.9, "polynomial decay power: lr * (1 - step / total) ** power", "§4.2", min=0)
    warmup_steps: int = knob(0, "linear warm-up steps (not in the paper)", min=0)
    weight_decay: float = knob(0.01, "AdamW weight decay (not given; PyTorch's AdamW default)", min=0)
    grad_clip: float = knob(0.0, "clip the gradient norm at this value (0 = off; not in the paper)", min=0)
    # -- running for days --
    seed: int = knob(0, "seed of every random choice (init, sampler, sentences, Gumbel noise, dropout)",
                     min=0, max=2**32 - 1)  # numpy's seed range
    device: str = knob("auto", "cpu | cuda | cuda:N | auto")
    dtype: str = knob("auto", "autocast dtype: bfloat16 | float32 | auto (bfloat16 on a GPU that supports it, "
                      "else float32)",
                      choices=("auto", "bfloat16", "float32"))
    micro_batch: int = knob(0, "images per forward/backward; the step's gradient is accumulated over its "
                            "micro-batches, then one update (0 = the whole per-process batch at once). The "
                            "same training up to float rounding, in less memory", min=0)
    grad_checkpoint: bool = knob(False, "recompute CLIP residual blocks in backward (less memory)")
    compile: bool = knob(False, "torch.compile the model")
    cache_sam: str | None = knob(None, "directory caching SAM image embeddings across epochs (frozen SAM only), "
                                 "keyed by image id + SAM weights, dtype and data root; read by the loader", type=str)
    num_workers: int = knob(-1, "DataLoader workers; -1 = auto: 0 on CPU (a worker competes with the model "
                            "for the cores), min(8, CPUs per GPU) with pinned memory on CUDA", min=-1)
    threads: int = knob(0, "CPU threads for PyTorch (0 = its default); the demo's tiny tensors gain nothing "
                        "from a second thread, which only spins and slows down on a busy machine", min=0)
    resume: bool = knob(False, "continue the run in --out from ckpt.pt (weights, optimizer, step, sampler "
                        "position, RNG states); flags not given are taken from its config.json, and one that "
                        "defines the run (RUN_DEFINING_FLAGS) may not differ from it")
    overwrite: bool = knob(False, "start a fresh run in an --out that holds an earlier run, deleting that run's "
                           "files first (without it such an --out is refused; the demo's own runs/demo keeps the "
                           "earlier run in runs/demo/previous-N instead)")
    max_steps: int = knob(0, "stop after this global step (0 = run all epochs); the LR schedule still "
                          "spans all epochs, so a stopped run resumes exactly", min=0)
    save_every: int = knob(1000, "write ckpt.pt every N steps (and at the end)", min=1)
    eval_every: int = knob(0, "validate every N steps (0 = only at the end)", min=0)
    keep_best: str = knob("oIoU", "score of each validation whose best writes best.safetensors and metrics.json's "
                          "'best' (as LAVT and CGFormer; CRIS keeps the best mIoU; the paper does not say); none: "
                          "only the last weights", choices=("oIoU", "mIoU", "none"))
    log_every: int = knob(10, "write a log.jsonl line every N steps", min=1)


def demo_preset() -> TrainConfig:
    """`python train.py` with nothing else: tiny model on the built-in data, < 10 min on 2 CPU cores."""
    return TrainConfig(
        config="demo", out="runs/demo", data_root="data/synth", datasets="synth", val_dataset="synth",
        clip_size=128, sam_size=192, images_per_batch=8, sentences_per_image=4, epochs=20, stage1_epochs=4,
        lr=2e-3, warmup_steps=30, grad_clip=1.0, threads=1, save_every=200, eval_every=0, log_every=10)


PRESETS = {"paper": TrainConfig(config="paper"), "demo": demo_preset()}


PER_RUN_FLAGS = ("resume", "overwrite", "max_steps")  # never taken over from a resumed run's config.json

# --resume: the flags that define a run (the images it trains on, its step count and LR schedule, its model, loss
# and random draws) may not change; parse_args compares them with config.json, and checkpoints.restore the model's
# (MODEL_FLAGS) with ckpt.pt's model config. The free ones change where and how fast it runs, what it logs, saves
# and validates, or where its inputs are (the checkpoint holds every weight; the data and weights may move)
MODEL_FLAGS = ("config", "clip_size", "sam_size", "n_prompts", "cmp", "prompts", "use_sam", "prompt_dropout",
               "gumbel_tau")
RUN_DEFINING_FLAGS = MODEL_FLAGS + (
    "datasets", "hold_out_other_partition", "val_dataset",  # the validation set's images are held out of training
    "seen_only", "icl", "train_towers", "images_per_batch", "sentences_per_image", "epochs", "stage1_epochs", "lr",
    "lr_power", "warmup_steps", "weight_decay", "grad_clip", "seed",
    "dtype")  # bfloat16 autocast computes every step differently, not only in another order
FREE_FLAGS = (
    "out", "clip_weights", "sam_weights", "vocab", "init_from", "data_root", "val_split", "val_images", "keep_best",
    "skip_bad_images",  # what a run without it would have done: stop at the bad image
    "device", "micro_batch", "grad_checkpoint", "compile", "cache_sam",  # the same training up to float rounding
    "num_workers", "threads", "resume", "overwrite", "max_steps", "save_every", "eval_every", "log_every")


def parse_args(argv=None) -> TrainConfig:
    """The preset (--config; auto: paper when weights or a data root are given, else demo), then every flag on top
    of it. With --resume the run's saved config.json is the base instead, so `--resume --out DIR` alone continues a
    run with its own settings; a flag given now that defines the run may not differ from it (the model's flags are
    compared with ckpt.pt's model config by checkpoints.restore)."""
    return parse_config(TrainConfig, PRESETS, argv, __doc__, PER_RUN_FLAGS, flag_conflict,
                        compared=tuple(n for n in RUN_DEFINING_FLAGS if n not in MODEL_FLAGS))


def flag_conflict(tc: TrainConfig) -> str | None:
    """What flags contradict each other, checked before any work (divisibility of --images-per-batch by the
    number of processes is checked when they start)."""
    if tc.resume and tc.overwrite:
        return "--resume continues the run in --out, --overwrite deletes it: pass one of them"
    if tc.use_sam and tc.stage1_epochs > tc.epochs:
        return (f"--stage1-epochs {tc.stage1_epochs} > --epochs {tc.epochs}: stage 2 (§4.2) would never run; "
                f"--stage1-epochs {tc.epochs} trains stage 1 only, --no-use-sam the coarse mask alone")
    return None


# ---------------------------------------------------------------------------------------------
# The schedule (§4.2): two stages, polynomial LR decay over all epochs, counted in global steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Two stages and a polynomial LR decay over all epochs (§4.2), counted in global steps."""
    steps_per_epoch: int
    total_steps: int
    max_steps: int
    stage1_epochs: int
    use_sam: bool
    tc: TrainConfig

    @classmethod
    def of(cls, tc: TrainConfig, n_images: int, world: int) -> "Schedule":
        steps_per_epoch = n_images // tc.images_per_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{n_images} training images give no full batch of {tc.images_per_batch}")
        total = tc.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(tc.max_steps or total, total), tc.stage1_epochs, tc.use_sam, tc)

    def stage(self, epoch: int) -> int:
        """1: CLIP + CMP + ICL on the coarse mask; 2: the whole model end to end."""
        return 1 if epoch < self.stage1_epochs or not self.use_sam else 2

    @property
    def final_stage(self) -> int:
        return self.stage(self.tc.epochs - 1)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.tc)

    def describe(self) -> str:
        stop = f", stopping at {self.max_steps}" if self.max_steps < self.total_steps else ""
        return (f"{self.steps_per_epoch} steps per epoch x {self.tc.epochs} epochs = {self.total_steps} steps{stop}; "
                f"stage 2 (end to end) from epoch {self.stage1_epochs}")


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """§4.2 polynomial decay lr * (1 - step / total) ** 0.9, after an optional linear warm-up."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr * (1 - step / total) ** tc.lr_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------
# The training run, in the paper's order
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Train as the flags say; returns {"metrics": final val metrics, "untrained": metrics before training
    (fresh runs), "step", "wall_s", "peak_memory_mb", "out"}."""
    started = time.time()
    tc = parse_args(argv)
    check_inputs(tc)
    procs = setup_processes(tc)  # one process per GPU under torchrun, else one
    amp_dtype = autocast_dtype(tc, procs.device)
    log = open_run_folder(tc, procs, demo_out=PRESETS["demo"].out)  # locked; a fresh run never mixes with an old one
    ckpt = load_checkpoint(os.path.join(tc.out, "ckpt.pt")) if tc.resume else None  # validated before any work
    STOP.listen()  # SIGTERM / SIGINT: a checkpoint at the next step boundary (stop_if_signalled), then exit

    # -- model (§3): what Prompt-RIS adds trains; CLIP and SAM stay frozen (§4.2) --
    seed_everything(tc.seed)  # the same initial weights on every rank
    raw_model, train_towers = build_model(tc)
    raw_model.to(procs.device).train()
    raw_model.cmp.grad_checkpoint = tc.grad_checkpoint  # recompute CLIP blocks in backward
    tokenizer = Tokenizer(tc.vocab)
    log.run_header(tc, raw_model, train_towers, procs, amp_dtype)

    # -- data (§4.1, §4.2): images with b sentences each; the global batch is split across ranks --
    train_set, val_set, held_out = build_data(tc, tokenizer, procs.master, amp_dtype or torch.float32)
    log.held_out(held_out)  # how many images and refs each training set lost to the hold-out, and why
    if tc.seen_only:  # Table 2
        log(f"--seen-only: {train_set.dropped_refs} training refs of unseen or other categories dropped, "
            f"{sum(map(len, train_set.pairs))} sentences of {len(train_set)} images kept")
    schedule = Schedule.of(tc, len(train_set), procs.world)
    periodic_val = periodic_val_set(val_set, tc)

    # -- optimizer (§4.2): AdamW over what trains; the LR is a function of the step (nothing to save) --
    params = raw_model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,  # fused: one kernel, ~4x
                                  fused=procs.device.type in ("cpu", "cuda"))       # faster than per tensor
    sam_cache = sam_cache_dir(tc, raw_model, train_towers, amp_dtype, len(train_set), log)
    train_set.use_sam_cache(sam_cache)

    # -- resume (weights, optimizer, data position, every random state), or score the untrained model --
    if ckpt is not None:
        state = restore(ckpt, raw_model, optimizer, procs, tc.out, schedule.steps_per_epoch)
        state.best = resumed_best(state, tc, log)
        log(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch} of "
            f"{schedule.steps_per_epoch})")
    else:
        state = TrainState()
        # every rank scores its shard of --val-images (the whole split is scored at the end)
        state.untrained = validate(raw_model, periodic_val, schedule.final_stage, tc, procs, amp_dtype)
        log(f"untrained model: val {state.untrained['output']} mIoU {state.untrained['mIoU']:.2f} "
            f"oIoU {state.untrained['oIoU']:.2f}")
    reset_peak_memory(procs.device)
    model = wrap_model(raw_model, tc, procs)  # compile and DDP; checkpoints keep raw_model
    del ckpt

    # -- the loop (§4.2): stage 1 trains the coarse mask (CLIP + CMP + ICL), stage 2 the whole model --
    log(schedule.describe())
    pbar = tqdm(total=schedule.max_steps, initial=state.step, disable=not procs.master, dynamic_ncols=True,
                desc="train")
    while state.step < schedule.max_steps:
        t_ready = time.time()
        for micro_batches in epoch_loader(train_set, state, schedule, tc, procs):
            t_step, stage = time.time(), schedule.stage(state.epoch)
            lr = set_lr(optimizer, schedule.lr(state.step))
            values = train_step(model, raw_model, micro_batches, optimizer, params, stage, tc, procs, amp_dtype,
                                sam_cache, train_towers, state)
            state.advance(schedule.steps_per_epoch)
            log.step(pbar, state, values, lr, stage, time.time() - t_step, t_step - t_ready, tc, schedule)
            log.skipped_images(micro_batches, state, tc, procs)  # --skip-bad-images: counted at each epoch's end
            if tc.eval_every and state.step % tc.eval_every == 0:
                metrics = validate(raw_model, periodic_val, stage, tc, procs, amp_dtype)
                log(f"step {state.step}: val {metrics['output']} mIoU {metrics['mIoU']:.2f} "
                    f"oIoU {metrics['oIoU']:.2f}")
                log.json({"step": state.step, "val": metrics})
                log.curves()
                if stage == schedule.final_stage:  # in stage 1 the score is the coarse mask's, not the output's
                    keep_best(raw_model, metrics, state, tc, log)
            # saved after the step's validation: a resume from this checkpoint never skips one (nor its best)
            if state.step % tc.save_every == 0:
                save_checkpoint(tc.out, raw_model, optimizer, state, procs, tc)
            stop_if_signalled(raw_model, optimizer, state, procs, tc, log)
            if state.step >= schedule.max_steps:
                break
            t_ready = time.time()  # from here until the next batch arrives the step waits for data
    pbar.close()
    if state.last_saved != state.step:
        save_checkpoint(tc.out, raw_model, optimizer, state, procs, tc)

    # -- final evaluation on the whole validation split, and the files eval.py reads --
    result = {"step": state.step, "untrained": state.untrained, "out": tc.out}
    result |= final_evaluation(raw_model, val_set, schedule, state, tc, procs, amp_dtype, log, started)
    shutdown(procs)
    return result


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def build_model(tc: TrainConfig) -> tuple[PromptRIS, bool]:
    """PromptRIS from official weights (paper) or randomly initialised tiny towers (demo).

    Returns the model and whether the CLIP and SAM towers train (--train-towers, default: only
    without official weights). Freezing is decided here, in PromptRIS.freeze_backbones.
    """
    base = PromptRISConfig.paper() if tc.config == "paper" else PromptRISConfig.tiny()
    clip = load_clip(tc.clip_weights) if tc.clip_weights else None
    sam = load_sam(tc.sam_weights) if tc.sam_weights else None
    if sam is not None and sam.config.image_size != tc.sam_size:
        raise ValueError(f"--sam-size {tc.sam_size} differs from the image size of {tc.sam_weights} "
                         f"({sam.config.image_size})")
    config = replace(base, clip=clip.config if clip else base.clip,
                     sam=sam.config if sam else replace(base.sam, image_size=tc.sam_size),
                     clip_image_size=tc.clip_size, n_prompts=tc.n_prompts, cmp=tc.cmp, use_sam=tc.use_sam,
                     prompts=tuple(p for p in tc.prompts.split(",") if p), prompt_dropout=tc.prompt_dropout,
                     gumbel_tau=tc.gumbel_tau)
    model = PromptRIS(config, clip, sam)
    if tc.init_from:
        init_from_run(model, tc.init_from)
    train_towers = tc.train_towers if tc.train_towers is not None else (clip is None and sam is None)
    model.freeze_backbones(clip=not train_towers, sam=not train_towers)
    return model, train_towers


def build_data(tc: TrainConfig, tokenizer: Tokenizer, master: bool, image_dtype: torch.dtype = torch.float32):
    """(train set, val set, hold-out report) from the refer-API layout; the demo's built-in data is written first.
    The report (data.hold_out_report) says how many images and refs each training set lost to the hold-out, and why.
    image_dtype: of the pixels the sets give (bfloat16 under bf16 autocast: exact, half the bytes)."""
    specs, (val_spec,) = dataset_specs(tc.datasets, tc.data_root), dataset_specs(tc.val_dataset, tc.data_root)
    if all(name == "synth" for name, _ in specs + [val_spec]):
        if master and not os.path.isfile(os.path.join(tc.data_root, "synth", "refs(unc).p")):
            tqdm.write(f"writing the built-in referring dataset (synth.py; also `python data.py synth`) to "
                       f"{tc.data_root}")
            synth.make_synth(tc.data_root, seed=0)  # refs(unc).p is written last: present = complete
        barrier()  # other ranks wait for the data
    loaded = {spec: data.load_refs(tc.data_root, *spec) for spec in dict.fromkeys(specs + [val_spec])}
    # §4.2: no evaluation image is trained on: every val/test image of the training sets and of the validation
    # set leaves training, and with --hold-out-other-partition those of G-Ref's other partition (umd and google
    # split the same images differently; the paper reports both), when its refs file is present
    partitions = {("refcocog", other): data.load_refs(tc.data_root, "refcocog", other)
                  for name, split_by in specs if name == "refcocog" for other in ("umd", "google")
                  if ("refcocog", other) not in loaded and has_refs(tc.data_root, "refcocog", other)}
    held_out = [loaded[val_spec]] + (list(partitions.values()) if tc.hold_out_other_partition else [])
    train_set = data.RefTrainSet([loaded[s] for s in specs], tokenizer, clip_size=tc.clip_size,
                                 sam_size=tc.sam_size, sentences_per_image=tc.sentences_per_image, seed=tc.seed,
                                 held_out_from=held_out, category_ids=data.OV_SEEN_CATEGORIES if tc.seen_only else None,
                                 image_dtype=image_dtype, skip_bad_images=tc.skip_bad_images)
    val_set = data.RefEvalSet(loaded[val_spec], tc.val_split, tokenizer, clip_size=tc.clip_size,
                              sam_size=tc.sam_size, image_dtype=image_dtype)
    return train_set, val_set, data.hold_out_report(specs, val_spec, loaded, partitions, tc.hold_out_other_partition)


def epoch_loader(train_set, state: TrainState, schedule: Schedule, tc: TrainConfig,
                 procs: Processes) -> DataLoader:
    """The rest of the current epoch's steps for this rank, each a list of micro-batches (a resumed run
    skips what was consumed)."""
    batches = data.epoch_batches(len(train_set), state.epoch, tc.seed, tc.images_per_batch, procs.rank,
                            procs.world)[state.batch_in_epoch:]
    train_set.set_epoch(state.epoch, schedule.stage(state.epoch))  # stage 1 never looks at SAM's 1024 px input
    workers = loader_workers(tc, procs.device)
    return DataLoader(train_set, batch_sampler=batches, num_workers=workers, pin_memory=procs.device.type == "cuda",
                      collate_fn=partial(collate_micro_batches, size=tc.micro_batch, seed=tc.seed, epoch=state.epoch),
                      prefetch_factor=4 if workers else None,  # keep the next steps' images ready
                      generator=torch.Generator().manual_seed(tc.seed))  # not the global RNG


def collate_micro_batches(items: list[dict], size: int, seed: int, epoch: int) -> list[dict]:
    """One step's items -> its micro-batches of `size` images (0 = all), each a data.collate batch with
    "sample_keys" (N,) int64: the key of each sentence's Gumbel noise and prompt dropout, a function of
    (seed, epoch, image id, sentence within the image) only, so every layout draws the same."""
    size = size or len(items)
    chunks = [data.collate(items[i:i + size]) for i in range(0, len(items), size)]
    length = max(chunk["tokens"].shape[1] for chunk in chunks)  # one text length per step, whatever the chunks
    for chunk in chunks:
        chunk["tokens"] = torch.nn.functional.pad(chunk["tokens"], (0, length - chunk["tokens"].shape[1]))
        index = chunk["image_index"]  # (N,), sorted: an image's sentences are contiguous
        sentence = torch.arange(len(index)) - torch.searchsorted(index, index)  # j-th sentence of its image
        chunk["sample_keys"] = combine_keys(seed, epoch, chunk["image_ids"][index], sentence)
    return chunks


# ---------------------------------------------------------------------------------------------
# One training step: micro-batches -> forward -> Eq. (9) -> backward -> clip -> AdamW
# ---------------------------------------------------------------------------------------------


def train_step(model, raw_model: PromptRIS, micro_batches: list[dict], optimizer, params, stage: int,
               tc: TrainConfig, procs: Processes, amp_dtype, sam_cache: str | None, train_towers: bool,
               state: TrainState) -> dict:
    """One AdamW update on the global batch: forward, Eq. (9) and backward of each micro-batch, each term weighted
    by the micro-batch's share of the batch (so the summed gradient is the whole batch's), then clip and update.
    Returns the loss terms of the global batch and "grad_norm", averaged over the ranks. A non-finite loss or
    gradient norm stops the run before the update, an out-of-memory error with what lowers memory (the last
    checkpoint stays)."""
    images = sum(len(b["clip_images"]) for b in micro_batches)
    sentences = sum(len(b["tokens"]) for b in micro_batches)
    summed = {}
    try:
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1  # DDP averages the gradients over the ranks once, after the last
            with contextlib.nullcontext() if last or not procs.ddp else model.no_sync():
                with autocast(procs.device, amp_dtype):
                    features = None
                    if stage == 2 and not train_towers:  # frozen SAM: F_IS once per image, no graph
                        with torch.no_grad():
                            features = sam_embeddings(raw_model, batch, procs.device, sam_cache)
                    terms = forward_losses(model, batch, procs.device, use_sam=stage == 2, sam_features=features,
                                           icl=tc.icl, image_share=len(batch["clip_images"]) / images,
                                           sentence_share=len(batch["tokens"]) / sentences)
                terms["loss"].backward()
            summed = {k: summed.get(k, 0) + v.detach() for k, v in terms.items()}
        summed["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        values = mean_over_ranks(summed, procs)  # the step's one host sync; every rank sees the same values
        stop_if_not_finite(values, state, tc)  # before the update: the last checkpoint stays good
        optimizer.step()
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(state, micro_batches, tc, procs, amp_dtype,
                                                last_checkpoint(state, tc))) from None
    optimizer.zero_grad(set_to_none=True)
    return values


def forward_losses(model, batch: dict, device, use_sam: bool, sam_features=None, icl: bool = True,
                   image_share: float = 1.0, sentence_share: float = 1.0) -> dict:
    """The model on one batch and the loss terms of Eq. (9) ("loss" = their sum; icl=False: without L_icl), each
    weighted by the batch's share of a larger batch (total_loss).
    Without given SAM features (stage 1, or SAM's encoder training) the model encodes batch["sam_images"].
    The batch's "sample_keys" (training batches) key its Gumbel noise and prompt dropout. Copies are
    asynchronous (pinned batches on CUDA) and the collated batch needs no host sync."""
    def to(key):
        return batch[key].to(device, non_blocking=True)
    sam_images = to("sam_images") if use_sam and sam_features is None else None
    index = to("image_index")
    keys = to("sample_keys") if "sample_keys" in batch else None
    tokens = to("tokens")
    torch._dynamo.mark_dynamic(tokens, 1)  # --compile: the text length (a multiple of 8) varies, one graph for all
    out = model(to("clip_images"), tokens, index, sam_embeddings=sam_features, sam_images=sam_images,
                use_sam=use_sam, prepared=True, sample_keys=keys)
    return total_loss(out, to("masks"), to("instance_ids"), index, LossConfig(icl=icl), image_share, sentence_share)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate(model: PromptRIS, dataset, stage: int, tc: TrainConfig, procs: Processes, amp_dtype) -> dict:
    """Every rank evaluates the unwrapped model on its shard of the images (rank, rank + world, ...) and the
    pixel counts are gathered, so every rank returns the metrics one process gives over all of them: the
    coarse mask in stage 1, SAM's mask in stage 2. The training's random streams are left where they were."""
    output = "mask" if stage == 2 else "coarse"
    shard = Subset(dataset, range(procs.rank, len(dataset), procs.world)) if procs.ddp else dataset
    loader = DataLoader(shard, batch_size=tc.images_per_batch // procs.world, collate_fn=data.collate,
                        num_workers=loader_workers(tc, procs.device), pin_memory=procs.device.type == "cuda")
    with rng_untouched(procs.device):
        return {"output": output} | evaluate(model, loader, device=procs.device, output=output, amp_dtype=amp_dtype,
                                             gather=lambda metrics: gather_metrics(metrics, procs),
                                             progress=procs.master)


def final_evaluation(model: PromptRIS, val_set, schedule: Schedule, state: TrainState, tc: TrainConfig,
                     procs: Processes, amp_dtype, log: RunLog, started: float) -> dict:
    """The whole validation split on every rank's shard; model.safetensors, the best weights (--keep-best) and
    metrics.json from rank 0."""
    if procs.master:
        save_run_model(model, os.path.join(tc.out, "model.safetensors"))
    metrics = validate(model, val_set, schedule.final_stage, tc, procs, amp_dtype)
    log.final_metrics(state.step, metrics, state.untrained)
    if tc.keep_best != "none":  # compared on the images the periodic validations score (--val-images)
        periodic = periodic_val_set(val_set, tc)
        keep_best(model, metrics if periodic is val_set else validate(model, periodic, schedule.final_stage, tc,
                                                                       procs, amp_dtype), state, tc, log)
        log.best(state.best)
    result = {"metrics": metrics, "best": state.best, "wall_s": time.time() - started, **peak_memory_mb(procs.device)}
    if procs.master:
        save_metrics(tc.out, metrics | {"step": state.step, "untrained": state.untrained, "best": state.best})
    log.json({"step": state.step, "val": metrics})
    log.curves()
    log.wall_time(result, procs.device)
    return result


def periodic_val_set(val_set, tc: TrainConfig):
    """What --eval-every validates: the first --val-images images of the validation split, or all of it."""
    return val_set if not tc.val_images or tc.val_images >= len(val_set) else Subset(val_set, range(tc.val_images))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, OutOfMemory) as e:  # bad inputs name the file; out of memory names the flags
        sys.exit(f"train.py: error: {e}")
