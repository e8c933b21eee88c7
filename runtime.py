"""What train.py runs on, beside the method: the inputs a run checks before any work, numeric flag ranges, the run
folder (one run per folder, locked; temporary files of dead writers), processes and devices (DDP under torchrun,
autocast), the guards of a training step (out of memory, non-finite values, SIGTERM and SIGINT, the mean over ranks)
and the run log (train.log, log.jsonl, config.json, curves.png).

Nothing here is in the paper; train.py imports it, never the reverse.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import re
import resource
import sys
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import BEST_WEIGHTS, atomic_write, read_json, save_checkpoint
from coco import only_split_by
from viz import draw_curves

if TYPE_CHECKING:  # annotations only
    from checkpoints import TrainState
    from prompt_ris import PromptRIS
    from train import Schedule, TrainConfig


# ---- Inputs and flags: what a run needs, checked before any work ----


HOW_TO_GET = {
    "clip_weights": "run `python load_weights.py download clip` (OpenAI's ViT-B-16.pt, SHA-256 checked, converted; "
                    "it prints the path), or pass Hugging Face's openai/clip-vit-base-patch16 model.safetensors",
    "sam_weights": "run `python load_weights.py download sam` (segment-anything's sam_vit_b_01ec64.pth, converted; "
                   "it prints the path), or pass Hugging Face's facebook/sam-vit-base model.safetensors",
    "vocab": "run `python load_weights.py download vocab` (OpenAI's bpe_simple_vocab_16e6.txt.gz), or pass a "
             "Hugging Face vocab.json with merges.txt beside it",
    "data_root": "run `python data.py download --data-root DATA_ROOT --images` (the refer annotations and COCO "
                 "train2014 in the refer layout; --from DIR takes zips fetched by hand)",
}


DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "synth": "unc"}


def dataset_specs(names: str, data_root: str | None = None) -> list[tuple[str, str]]:
    """'refcoco,refcocog:google' -> [('refcoco', 'unc'), ('refcocog', 'google')]; a dataset without a default
    split (one imported by `data.py import`) takes the only refs(SPLIT_BY) file it has under data_root."""
    specs = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        dataset, _, split_by = name.partition(":")
        if not split_by and dataset not in DEFAULT_SPLIT_BY:
            if data_root is None:
                raise ValueError(f"--datasets: no default split for '{dataset}'; write it as {dataset}:SPLIT_BY")
            split_by = only_split_by(data_root, dataset)
        specs.append((dataset, split_by or DEFAULT_SPLIT_BY[dataset]))
    if not specs:
        raise ValueError("--datasets is empty")
    return specs


def check_inputs(tc: TrainConfig) -> None:
    """Fail before any work if a file the run needs is missing; the message says how to get it."""
    if tc.config == "paper" and not (tc.clip_weights and tc.sam_weights and tc.data_root):
        missing = [f"--{k.replace('_', '-')}" for k in ("clip_weights", "sam_weights", "data_root")
                   if not getattr(tc, k)]
        raise ValueError(f"--config paper needs {', '.join(missing)}: "
                         + "; ".join(HOW_TO_GET[k] for k in ("clip_weights", "sam_weights", "data_root")
                                     if not getattr(tc, k))
                         + ". Without them run the demo (`python train.py`).")
    if tc.resume and not os.path.isfile(os.path.join(tc.out, "ckpt.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint {os.path.join(tc.out, 'ckpt.pt')}; "
                                "start without --resume")
    for key in ("clip_weights", "sam_weights"):
        path = getattr(tc, key)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{key.replace('_', '-')} {path}: no such file; {HOW_TO_GET[key]}")
    if tc.vocab is not None and not os.path.exists(tc.vocab):
        raise FileNotFoundError(f"--vocab {tc.vocab}: no such file; {HOW_TO_GET['vocab']}")
    root = tc.data_root or ""
    specs = dataset_specs(tc.datasets, root) + dataset_specs(tc.val_dataset, root)
    built_in = all(name == "synth" for name, _ in specs)  # the built-in data is written when absent
    for name, split_by in [] if built_in else specs:
        folder = os.path.join(root, name)
        refs = [os.path.join(folder, f"refs({split_by}).{ext}") for ext in ("p", "json")]
        needed = [" or ".join(refs)] if not any(map(os.path.isfile, refs)) else []
        needed += [p for p in [os.path.join(folder, "instances.json")] if not os.path.isfile(p)]
        if needed:
            raise FileNotFoundError(f"--data-root {root}: missing {'; '.join(needed)}; {HOW_TO_GET['data_root']}")
    if tc.clip_weights is not None and tc.vocab is None:  # the byte-level fallback is for random CLIP towers only
        raise ValueError(f"--clip-weights {tc.clip_weights} without --vocab: CLIP's text tower was trained on BPE "
                         f"token ids and would read byte-level ids it never learned; pass --vocab: {HOW_TO_GET['vocab']}")


def parse_config(cls, presets: dict, argv, doc: str, per_run_flags: tuple, conflict, compared: tuple):
    """The config dataclass `cls` from the command line: a preset of `presets` (--config; auto: "paper" when weights
    or a data root are given, else "demo"), then every flag on top of it. With --resume the run's config.json is
    the base instead (its `per_run_flags` reset), and the flags `compared` may not differ from it.
    conflict(config) -> a usage error or None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early = argparse.ArgumentParser(add_help=False)
    for name in ("--config", "--clip-weights", "--sam-weights", "--data-root", "--out"):
        early.add_argument(name)
    early.add_argument("--resume", action="store_true")
    known, _ = early.parse_known_args(argv)
    preset = known.config or "auto"
    if preset == "auto":
        preset = "paper" if (known.clip_weights or known.sam_weights or known.data_root) else "demo"
    defaults = saved = presets[preset]
    if known.resume:
        config_path = os.path.join(known.out or defaults.out, "config.json")
        run_config = read_json(config_path, "--resume needs the run's config.json")
        unknown = sorted(set(run_config.get("train", {})) - {f.name for f in fields(cls)})
        if unknown or "train" not in run_config:
            raise ValueError(f"{config_path}: no 'train' entry or unknown keys {unknown}")
        saved = cls(**run_config["train"])
        defaults = replace(saved, **{k: getattr(cls(), k) for k in per_run_flags})
    parser = build_parser(defaults, presets, doc)
    tc = cls(**vars(parser.parse_args(argv)))
    if known.resume:
        refuse_changed_run_flags(config_path, saved, tc, compared)
    error = conflict(tc)
    if error:
        parser.error(error)
    return tc if tc.config != "auto" else replace(tc, config=preset)


def build_parser(defaults, presets: dict, doc: str) -> argparse.ArgumentParser:
    """One flag per field of the config dataclass `defaults`; help = what it does, the paper section, the paper and
    demo values (presets["paper"], presets["demo"]); `doc` gives the description and the epilog."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(defaults):
        meta = dict(f.metadata)
        help_text, section = meta.pop("help"), meta.pop("section")
        paper, demo = getattr(presets["paper"], f.name), getattr(presets["demo"], f.name)
        help_text += f" [{section}]" if section else ""
        help_text += f" (paper: {paper}" + (f"; demo: {demo})" if demo != paper else ")")
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text.replace("%", "%%"))
        elif f.type in ("int", "float"):  # the allowed range, checked at parse time and shown by --help
            allowed = NumberRange(int if f.type == "int" else float, **meta)
            parser.add_argument(flag, type=allowed, default=default, help=f"{help_text} [{allowed}]".replace("%", "%%"))
        else:
            kind = meta.pop("type", type(default))
            parser.add_argument(flag, type=kind, default=default, help=help_text.replace("%", "%%"), **meta)
    return parser

def refuse_changed_run_flags(config_path: str, saved: TrainConfig, given: TrainConfig, names: tuple) -> None:
    """--resume: the flags `names` define the run (its images, step count, LR schedule, random draws); one given
    now that differs from the run's config.json would continue another run from this one's position."""
    changed = [f"--{n.replace('_', '-')} {getattr(given, n)} (saved {getattr(saved, n)})" for n in names
               if getattr(given, n) != getattr(saved, n)]
    if changed:
        raise ValueError(f"--resume: {config_path} was saved with other flags that define the run: "
                         f"{', '.join(changed)}; drop them to continue the run, or start a new run in another --out")


@dataclass(frozen=True)
class NumberRange:
    """argparse `type=` of a numeric flag: a value that is not a number, not finite or outside the range is a
    one-line usage error naming the flag (exit code 2), never a traceback later in the run."""
    kind: type = int
    min: float | None = None  # inclusive bounds
    max: float | None = None
    above: float | None = None  # exclusive bounds
    below: float | None = None

    def __str__(self) -> str:
        bounds = [f"{op} {v}" for op, v in ((">=", self.min), (">", self.above), ("<=", self.max), ("<", self.below))
                  if v is not None]
        return ("an integer" if self.kind is int else "a number") + (" " + " and ".join(bounds) if bounds else "")

    def __contains__(self, value) -> bool:
        return (not (isinstance(value, float) and not math.isfinite(value))  # inf passes a lower bound
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            value = math.nan
        if value not in self:
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}")
        return value


# ---- The run folder: one run at a time, never mixed with an earlier one ----


LOCK = "train.lock"  # flock'ed by the run in the folder; the file stays, the lock dies with its holder
RUN_FILES = ("config.json", "ckpt.pt", "model.safetensors", BEST_WEIGHTS, "metrics.json", "log.jsonl", "train.log",
             "curves.png")
_held_lock = None  # this process's locked LOCK file (one run at a time per process)


def _forget_lock_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the lock: a killed run's workers, which outlive it by
    a few seconds, must not keep its folder locked (closing a copy does not unlock it for the parent)."""
    global _held_lock
    if _held_lock is not None:
        _held_lock.close()
        _held_lock = None


os.register_at_fork(after_in_child=_forget_lock_in_child)


def open_run_folder(tc: TrainConfig, procs: Processes, demo_out: str) -> RunLog:
    """The run log of --out once rank 0 (the only rank that writes there) holds the folder's lock, has removed the
    temporary files of writers that died, and, for a fresh run, found the folder empty: else it refuses, or with
    --overwrite deletes the earlier run's files; the demo's own folder `demo_out` keeps the earlier demo run in
    previous-N/ instead, so `python train.py` runs twice."""
    note = None
    if procs.master:
        os.makedirs(tc.out, exist_ok=True)
        lock_run_folder(tc.out)
        remove_stale_temporary_files(tc.out, locked=True)
        if not tc.resume and tc.out == demo_out:
            note = keep_earlier_run(tc.out)
        elif not tc.resume and not tc.overwrite:
            refuse_used_folder(tc.out)
    log = RunLog(tc.out, procs.master, fresh=not tc.resume)  # fresh: --overwrite deletes the earlier run's files
    if note:
        log(note)
    return log


def lock_run_folder(out: str) -> None:
    """An exclusive flock on out/train.lock for this process's lifetime: the OS releases it when the process dies,
    so a killed run's folder can be resumed at once. The file holds the holder's pid, for the message."""
    global _held_lock
    if _held_lock is not None:  # an earlier train.main of this process raised (its traceback keeps the file open)
        _held_lock.close()
    f = open(os.path.join(out, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise BlockingIOError(f"--out {out}: train.py (pid {holder}) is running in this folder; wait for it to end or "
                              "stop it (`kill PID` saves a checkpoint first), or choose another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_lock = f


def release_run_folder() -> None:
    global _held_lock
    if _held_lock is not None:
        _held_lock.close()
        _held_lock = None


def refuse_used_folder(out: str) -> None:
    found = sorted(name for name in os.listdir(out) if name != LOCK)
    if found:
        listed = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise FileExistsError(f"--out {out} is not empty ({listed}): continue its run with --resume, or pass "
                              "--overwrite to delete the run's files first, or choose another --out")


def keep_earlier_run(out: str) -> str | None:
    """Move what an earlier run left in `out` (all but the lock and earlier previous-N folders) to out/previous-N."""
    numbered = [int(m[1]) for name in os.listdir(out) if (m := re.fullmatch(r"previous-(\d+)", name))]
    found = [name for name in os.listdir(out) if name != LOCK and not re.fullmatch(r"previous-\d+", name)]
    if not found:
        return None
    folder = os.path.join(out, f"previous-{max(numbered, default=0) + 1}")
    os.makedirs(folder)
    for name in found:
        os.replace(os.path.join(out, name), os.path.join(folder, name))
    return f"the earlier demo run in {out} moved to {folder}"


TEMPORARY = re.compile(r"\.tmp(\d+)$")  # checkpoints.atomic_write and write_then_rename: NAME.tmp<pid>


def remove_stale_temporary_files(folder: str, locked: bool) -> None:
    """The NAME.tmp<pid> files of writers that died before their rename (SIGKILL, power loss): all of them in a
    folder whose lock we hold; elsewhere (the SAM cache, shared by runs) those whose pid is no live process here
    and that nobody wrote to for a minute (a writer on another machine of a shared file system)."""
    for entry in os.scandir(folder):
        match = TEMPORARY.search(entry.name)
        if match and (locked or (not pid_alive(int(match[1])) and time.time() - entry.stat().st_mtime > 60)):
            with contextlib.suppress(FileNotFoundError):  # another rank removed it first
                os.remove(entry.path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---- SIGTERM and SIGINT: a checkpoint at the next step boundary, then exit ----


STOP_EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal, as a shell reports a killed process


class StopRequest:
    """The signal this process received (SIGTERM from a scheduler or torchrun, SIGINT from Ctrl-C), and whether
    the ranks agreed to stop at this step (mean_over_ranks folds it into the step's all_reduce, so all stop at
    the same step and the checkpoint's collective cannot hang). A second signal acts at once."""

    def __init__(self):
        self.received, self.agreed, self.previous = None, False, {}

    def listen(self) -> None:
        self.received, self.agreed = None, False
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self.previous = {s: signal.signal(s, self.note) for s in STOP_EXIT_CODES}

    def note(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
        self.received = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


STOP = StopRequest()


def stop_if_signalled(model: PromptRIS, optimizer, state: TrainState, procs: Processes, tc: TrainConfig,
                      log: RunLog) -> None:
    """After the step's validation: when the ranks agreed on a signal, ckpt.pt of this step, then exit 143
    (SIGTERM) or 130 (SIGINT; a rank stopped by another rank's signal exits 143)."""
    if not STOP.agreed:
        return
    if state.last_saved != state.step:
        save_checkpoint(tc.out, model, optimizer, state, procs, tc)
    name = signal.Signals(STOP.received or signal.SIGTERM).name
    log(f"stopped by {name} at step {state.step}: {os.path.join(tc.out, 'ckpt.pt')} saved; continue with "
        f"`python train.py --resume --out {tc.out}`")
    code = STOP_EXIT_CODES[STOP.received or signal.SIGTERM]
    shutdown(procs)
    raise SystemExit(code)


# ---- Processes and devices (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) ----


@dataclass
class Processes:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def ddp(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_processes(tc: TrainConfig) -> Processes:
    """One process per GPU under torchrun (NCCL on cuda:LOCAL_RANK; gloo on CPU), else a single process."""
    under_torchrun = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if under_torchrun:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if tc.device == "auto" else tc.device)
    if device.type == "cuda":
        device = cuda_device(device, under_torchrun, local_rank)
        torch.cuda.set_device(device)  # before NCCL starts, so its communicator lives on this GPU
        # TF32 tensor cores for float32 matmuls. What must stay exact is not rounded: SAM's positional encodings
        # are computed where the weights load (CPU) and cached, Eq. (3) reads E's row without a matmul
        torch.set_float32_matmul_precision("high")
    if under_torchrun:
        # long timeout: a rank that finishes its validation shard early waits for the others in a collective
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)
    if tc.images_per_batch % world:
        raise ValueError(f"--images-per-batch {tc.images_per_batch} must be divisible by the {world} processes")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # AdamW's second moments of rarely used rows decay into slow denormals
    return Processes(rank, local_rank, world, device)


def cuda_device(asked: torch.device, under_torchrun: bool, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK under torchrun (an explicit index there is an error), else the GPU asked for."""
    if under_torchrun and asked.index is not None:
        raise ValueError(f"--device {asked}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                         "(or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", local_rank if under_torchrun else (asked.index or 0))
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
                         + (f" (LOCAL_RANK={local_rank}: start at most that many processes per node)"
                            if under_torchrun else ""))
    return device


def autocast_dtype(tc: TrainConfig, device: torch.device):
    """bfloat16 where it runs natively (or when asked), else None = float32 without autocast.
    auto: bfloat16 on a GPU with bfloat16 support (torch.cuda.is_bf16_supported()), float32 elsewhere."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if tc.dtype == "bfloat16" and device.type == "cuda" and not bf16_gpu:
        raise ValueError(f"--dtype bfloat16: {device} does not support bfloat16; use --dtype float32 (or auto)")
    return torch.bfloat16 if tc.dtype == "bfloat16" or (tc.dtype == "auto" and bf16_gpu) else None


def describe_dtype(tc: TrainConfig, device: torch.device, amp_dtype) -> str:
    """What the run header says about precision, and why when auto fell back to float32 on a GPU."""
    if amp_dtype is not None:
        return f"autocast {amp_dtype}"
    if tc.dtype == "auto" and device.type == "cuda":
        return "float32: this GPU does not support bfloat16 (torch.cuda.is_bf16_supported() is False)"
    return "float32"


def autocast(device, amp_dtype):
    """Autocast to amp_dtype on `device` (a torch.device or its name); None: float32, no autocast."""
    return torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def sync(device) -> None:
    """Wait for the queued work of the GPU `device` (cuda:N too), so that wall-clock timings measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wrap_model(raw_model: PromptRIS, tc: TrainConfig, procs: Processes):
    """torch.compile and DDP around the model; the unwrapped raw_model is what checkpoints hold."""
    model = torch.compile(raw_model) if tc.compile else raw_model
    if procs.ddp:  # unused parameters: SAM's side in stage 1, a dropped prompt type in stage 2
        model = DDP(model, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None,
                    find_unused_parameters=True,
                    broadcast_buffers=False)  # the buffers (E table, SAM constants) never change: no 64 MiB per step
    return model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(procs: Processes) -> None:
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    STOP.restore()
    release_run_folder()


def peak_memory_mb(device: torch.device) -> dict:
    """{"peak_memory_mb": peak GPU memory allocated by tensors, "peak_reserved_mb": held by the caching
    allocator (what nvidia-smi shows)}, since reset_peak_memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Training's peak, not the untrained validation's (its batches are whole images' sentences)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def loader_workers(tc: TrainConfig, device: torch.device) -> int:
    """--num-workers, auto (-1): 0 on CPU, where a worker takes cores from the model; on CUDA, enough
    processes to decode and resize a paper batch faster than a step (README, "Memory and time")."""
    if tc.num_workers >= 0:
        return tc.num_workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# ---- The guards of a training step ----


class OutOfMemory(MemoryError):
    """The device ran out of memory in a training step; the message says what lowers memory."""


def out_of_memory_message(state: TrainState, micro_batches: list[dict], tc: TrainConfig, procs: Processes,
                          amp_dtype, kept: str) -> str:
    """One paragraph: where it happened, the memory in use, and the flags that lower it."""
    if procs.device.type == "cuda":
        gib = [torch.cuda.memory_allocated(procs.device) / 2**30, torch.cuda.memory_reserved(procs.device) / 2**30,
               torch.cuda.get_device_properties(procs.device).total_memory / 2**30]
        in_use = f"{gib[0]:.1f} GiB allocated by tensors, {gib[1]:.1f} GiB reserved by PyTorch, of {gib[2]:.1f} GiB"
    else:
        in_use = f"peak resident memory {peak_memory_mb(procs.device)['peak_memory_mb'] / 1024:.1f} GiB"
    chunk = max(len(b["clip_images"]) for b in micro_batches)
    lower = []
    if chunk > 1:
        lower.append(f"--micro-batch {chunk // 2} (the same gradient from smaller forward passes)")
    if not tc.grad_checkpoint:
        lower.append("--grad-checkpoint (CLIP's activations recomputed in backward)")
    if amp_dtype != torch.bfloat16:
        lower.append("--dtype bfloat16 (half the activation memory)")
    if not tc.cache_sam:
        lower.append("--cache-sam DIR (a frozen SAM's image embeddings read from disk)")
    return (f"step {state.step + 1}: out of memory on {procs.device} ({in_use}) running {chunk} images x "
            f"{tc.sentences_per_image} sentences per forward pass. Lower the memory with "
            f"{', '.join(lower) or 'fewer --images-per-batch'}; see the README, 'Memory and time on one GPU'. "
            f"Stopped before the update, {kept}.")


def mean_over_ranks(terms: dict, procs: Processes) -> dict:
    """{name: float} of the loss terms, averaged over the DDP ranks in one all_reduce, which also carries whether
    a rank received SIGTERM or SIGINT (STOP.agreed: every rank then stops after this step)."""
    values = torch.stack([v.detach().float() for v in terms.values()])
    values = torch.cat([values, values.new_tensor([STOP.received is not None])])
    if procs.ddp:
        dist.all_reduce(values)  # sum (gloo has no average)
        values /= procs.world
    *means, signalled = values.tolist()
    STOP.agreed = signalled > 0
    return dict(zip(terms, means))


def last_checkpoint(state: TrainState, tc: TrainConfig) -> str:
    """What a run that stops before an update keeps: its last checkpoint, named, or none yet."""
    path = os.path.join(tc.out, "ckpt.pt")
    return (f"last good checkpoint kept at {path} (step {state.last_saved})" if os.path.isfile(path)
            else "no checkpoint was saved yet")


def stop_if_not_finite(values: dict, state: TrainState, tc: TrainConfig) -> None:
    """A NaN or inf loss term (checked first, "loss" last) or gradient norm stops every rank at once."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        what = "gradient norm" if bad[0] == "grad_norm" else f"loss term '{bad[0]}'"
        kept = last_checkpoint(state, tc)
        raise FloatingPointError(f"step {state.step + 1}: {what} is {values[bad[0]]}; stopped before the update, "
                                 f"{kept}")


def gather_metrics(metrics, procs: Processes):
    """Every rank's RISMetrics (per-expression integer pixel counts and ids, a few MB) merged on every rank."""
    if not procs.ddp:
        return metrics
    parts = [None] * procs.world
    dist.all_gather_object(parts, metrics)
    return parts[0].merge(parts[1:])


# ---- The run log: train.log, log.jsonl, config.json, curves.png (rank 0 writes) ----


class RunLog:
    def __init__(self, out: str, master: bool, fresh: bool):
        self.out, self.master = out, master
        self.started = self.t_log = time.time()
        self.run_config: dict = {}  # config.json
        self.images_since_log, self.wait_since_log = 0, 0.0
        self.skipped: list[str] = []  # training images skipped (--skip-bad-images) in this epoch, this rank
        os.makedirs(out, exist_ok=True)
        if master and fresh:  # nothing of an earlier run stays beside a fresh one (train.py: --overwrite)
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))

    def __call__(self, message: str) -> None:
        if self.master:
            tqdm.write(message)
            with open(os.path.join(self.out, "train.log"), "a") as f:
                f.write(message + "\n")

    def json(self, record: dict) -> None:
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def final_metrics(self, step: int, metrics: dict, untrained: dict | None) -> None:
        untrained_miou = untrained["mIoU"] if untrained else float("nan")
        precision = " ".join(f"P@{x} {metrics[f'P@{x}']:.1f}" for x in (0.5, 0.6, 0.7, 0.8, 0.9))
        self(f"step {step}: val {metrics['output']} mIoU {metrics['mIoU']:.2f} (untrained {untrained_miou:.2f}) "
             f"oIoU {metrics['oIoU']:.2f} {precision}")

    def best(self, best: dict) -> None:
        self(f"best val {best['metric']} {best['score']:.2f} at step {best['step']} ({best['expressions']} "
             f"expressions): {BEST_WEIGHTS}, eval.py's default (--weights last: model.safetensors)")

    def wall_time(self, result: dict, device: torch.device) -> None:
        reserved = f", {result['peak_reserved_mb']:.0f} MiB reserved" if "peak_reserved_mb" in result else ""
        self(f"wall time {result['wall_s']:.0f} s, peak memory {result['peak_memory_mb']:.0f} MiB "
             f"({'GPU allocated' + reserved if device.type == 'cuda' else 'max RSS'})")

    def curves(self) -> None:
        """curves.png: every loss term and val mIoU against the step, redrawn from log.jsonl."""
        if self.master:
            draw_curves(os.path.join(self.out, "log.jsonl"), os.path.join(self.out, "curves.png"))

    def run_header(self, tc: TrainConfig, model: PromptRIS, train_towers: bool, procs: Processes, amp_dtype) -> None:
        """What runs where, what trains, and config.json (the model config, vocabulary and every flag)."""
        self(f"{'resuming' if tc.resume else 'starting'} {tc.config} run in {tc.out} on {procs.device} x "
             f"{procs.world} ({describe_dtype(tc, procs.device, amp_dtype)})")
        self(f"trainable parameters: {model.count_parameters():,} of {model.count_parameters(False):,}")
        self("CLIP and SAM towers are trained too: no official weights were given and frozen random towers learn "
             "nothing" if train_towers else "CLIP and SAM towers are frozen (§4.2); CMP, the decoder and the text "
                                            "prompter train")
        self.run_config = {"model": model.config.to_dict(), "vocab": tc.vocab, "train": asdict(tc)}
        self.write_config()

    def write_config(self) -> None:
        if self.master:
            atomic_write(os.path.join(self.out, "config.json"),
                         lambda f: f.write(json.dumps(self.run_config, indent=1).encode()))

    def held_out(self, report: dict) -> None:
        """build_data's hold-out report (§4.2) per training set, in train.log and config.json ("held_out")."""
        for name, c in report.items():
            removed = ", ".join(f"{n['images']} images / {n['refs']} refs ({reason})"
                                for reason, n in c["removed"].items())
            self(f"{name} train: {c['images']} images, {c['refs']} refs; held out {removed}; trained on "
                 f"{c['kept']['images']} images, {c['kept']['refs']} refs")
            for reason, n in c.get("not_held_out", {}).items():
                self(f"{name} train: {n['images']} images / {n['refs']} refs of {reason} are trained on "
                     f"(--no-hold-out-other-partition): a score on that partition is not held out")
        self.run_config["held_out"] = report
        self.write_config()

    def step(self, pbar, state: TrainState, values: dict, lr: float, stage: int, step_s: float, wait_s: float,
             tc: TrainConfig, schedule: Schedule) -> None:
        """The progress bar every step, a log.jsonl record every --log-every steps ("data_wait": the fraction
        of the time since the last record spent waiting for the loader)."""
        self.images_since_log += tc.images_per_batch
        self.wait_since_log += wait_s
        if self.master:
            pbar.update(1)
            pbar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {
                "lr": f"{lr:.2e}", "stage": stage, "img/s": significant(tc.images_per_batch / step_s)})
        if state.step % tc.log_every == 0 or state.step == schedule.max_steps:
            now = time.time()
            self.json({"step": state.step, "epoch": state.epoch, "stage": stage, "lr": lr, **values,
                       "images_per_s": self.images_since_log / (now - self.t_log),
                       "data_wait": self.wait_since_log / (now - self.t_log), "elapsed_s": now - self.started})
            self.t_log, self.images_since_log, self.wait_since_log = now, 0, 0.0


    def skipped_images(self, micro_batches: list[dict], state: TrainState, tc: TrainConfig, procs: Processes) -> None:
        """--skip-bad-images: the training images this step's batches skipped (data.RefTrainSet), counted over every
        rank and written to train.log and log.jsonl when the step ends an epoch."""
        if not tc.skip_bad_images:
            return
        self.skipped += [path for batch in micro_batches for path in batch["skipped_images"]]
        if state.batch_in_epoch:  # the epoch goes on
            return
        ranks = [self.skipped]
        if procs.ddp:  # once per epoch, on every rank at the same step
            ranks = [None] * procs.world
            dist.all_gather_object(ranks, self.skipped)
        paths = [path for rank in ranks for path in rank]
        self(f"epoch {state.epoch - 1}: {len(paths)} training images skipped (--skip-bad-images)"
             + (f": {', '.join(paths)}" if paths else ""))
        self.json({"step": state.step, "epoch": state.epoch - 1, "skipped_images": paths})
        self.skipped = []


def significant(x: float, digits: int = 2) -> str:
    """At least `digits` significant digits, no exponent: 0.025, 1.2, 16, 123 (a paper step on CPU is not 0)."""
    return f"{x:.0f}" if x >= 10 ** (digits - 1) else f"{x:.{digits}g}"
