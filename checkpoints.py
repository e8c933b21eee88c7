"""What a run folder holds, how it is written and read: ckpt.pt (weights, optimizer, position, every random state),
model.safetensors and best.safetensors, written atomically so that a crash at any moment leaves the old file or
the new one; and resuming from them bitwise.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from load_weights import check_and_load, read_safetensors

if TYPE_CHECKING:  # annotations only
    from prompt_ris import PromptRIS
    from runtime import Processes, RunLog
    from train import TrainConfig


@dataclass
class TrainState:
    """Where the run is: what a checkpoint stores besides weights, optimizer and RNG states."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    untrained: dict | None = None  # val metrics before training (fresh runs)
    last_saved: int = 0
    best: dict | None = None  # the best validation so far (--keep-best): {"step", "metric", "score", "expressions"}

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


def write_then_rename(path: str, write) -> None:
    """write(f) into `path`.tmp<pid>, then os.replace: readers see the whole file or none. No fsync: after a
    crash a cache file is at worst missing (recomputed), and a leftover .tmp file is never read."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file beside `path`, fsync, then os.replace: a crash at any moment leaves
    either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def rng_state(device: torch.device) -> dict:
    """Every random state of this process: python, numpy, torch CPU (Gumbel noise, prompt dropout), and its
    own GPU's only (a list of one, or empty), so that a run resumes on a machine with fewer GPUs."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and device.type == "cuda":  # checkpoints before this format hold every GPU's state: take ours
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[device.index], device)


@contextlib.contextmanager
def rng_untouched(device: torch.device):
    """Validation in the middle of training must not shift the training's random streams."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_checkpoint(out: str, model: PromptRIS, optimizer, state: TrainState, procs: Processes,
                    tc: TrainConfig) -> None:
    """ckpt.pt with the unwrapped module (no DDP / compile prefixes) and every rank's RNG state."""
    states = [None] * procs.world
    if procs.ddp:
        dist.all_gather_object(states, rng_state(procs.device))
    else:
        states = [rng_state(procs.device)]
    path = os.path.join(out, "ckpt.pt")
    if procs.master:
        try:
            atomic_write(path, lambda f: torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "rng": states,
                "untrained": state.untrained, "best": state.best, "model_config": model.config.to_dict(),
                "train_config": asdict(tc)}, f))
        except (OSError, RuntimeError) as e:  # torch.save's writer reports a full disk as a RuntimeError
            kept = (f"The step {state.last_saved} checkpoint is kept" if os.path.isfile(path)
                    else "No checkpoint was saved before")
            raise OSError(f"step {state.step}: could not write {path} ({type(e).__name__}: {e}); disk full? "
                          f"{kept}") from e
    state.last_saved = state.step


def restore(ckpt: dict, model: PromptRIS, optimizer, procs: Processes, out: str, steps_per_epoch: int) -> TrainState:
    """Weights, optimizer, position and this rank's RNG state from a checkpoint of the same model and world, whose
    position lies inside an epoch of `steps_per_epoch` steps."""
    path = os.path.join(out, "ckpt.pt")
    if ckpt["batch_in_epoch"] >= steps_per_epoch:  # its epoch would never end: the loop would wait forever
        raise CheckpointError(f"{path}: saved after step {ckpt['batch_in_epoch']} of epoch {ckpt['epoch']}, but the "
                              f"training set now gives {steps_per_epoch} steps per epoch: its data changed since the "
                              "run started; restore the data, or start a new run in another --out")
    if ckpt["model_config"] != model.config.to_dict():
        differ = sorted(k for k, v in model.config.to_dict().items() if ckpt["model_config"].get(k) != v)
        raise CheckpointError(f"{path}: saved for a different model (config keys {differ} differ from the flags)")
    if len(ckpt["rng"]) != procs.world:
        raise CheckpointError(f"{path}: written by {len(ckpt['rng'])} processes, resumed with {procs.world}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][procs.rank], procs.device)
    if procs.master:  # log lines after the checkpoint belong to the lost part of the run
        _truncate_log(os.path.join(out, "log.jsonl"), ckpt["step"])
    return TrainState(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["untrained"], ckpt["step"],
                      ckpt.get("best"))  # checkpoints written before --keep-best have none


CKPT_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch", "rng", "model_config", "train_config")


def load_checkpoint(path: str) -> dict:
    """torch.load with weights_only (plain tensors and containers, no code), or a CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, garbage bytes, foreign pickle
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e}). Checkpoints "
                              "are replaced atomically, so this file was damaged after it was written; "
                              "delete it to start over") from e
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint, missing {missing}")
    return ckpt


def _truncate_log(path: str, step: int) -> None:
    """Drop log.jsonl lines past `step` (written after the checkpoint a resumed run starts from), and a torn last
    line: the checkpoint, not the log, says where the run is."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
            if n == len(lines) and not line.endswith("\n"):  # torn: the run was killed while writing it
                break
            raise ValueError(f"{path}: line {n} is not a log record ({type(e).__name__}: {e}); delete that line "
                             "to resume") from None
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")  # the next record starts on a line of its own
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def save_run_model(model: PromptRIS, path: str, metadata: dict | None = None) -> None:
    """model.safetensors (or best.safetensors): the full PromptRIS state dict (CLIP and SAM included), for
    eval.load_run; `metadata` {str: str} goes into the file's header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(safetensors_bytes(state, metadata)))


def save_metrics(out: str, metrics: dict) -> None:
    """metrics.json: the final validation, the untrained and the best scores (what eval.py's table compares)."""
    atomic_write(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=1).encode()))


BEST_WEIGHTS = "best.safetensors"  # train.py --keep-best: the weights of the run's best validation


def read_best(path: str) -> dict | None:
    """The record {"step", "metric", "score", "expressions"} that train.py writes into best.safetensors' header."""
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return json.loads(metadata["best"]) if "best" in metadata else None


def keep_best(model: PromptRIS, metrics: dict, state: TrainState, tc: TrainConfig, log: "RunLog") -> None:
    """best.safetensors beside model.safetensors when this validation's --keep-best score beats every earlier
    validation of the run's final output (untrained and stage-1 scores excluded), the checkpoint LAVT, CGFormer
    and CRIS report. Its record {"step", "metric", "score", "expressions"} goes into TrainState and the file."""
    score = metrics[tc.keep_best] if tc.keep_best != "none" else None
    if score is None or (state.best is not None and not score > state.best["score"]):  # ties keep the earlier
        return
    best = {"step": state.step, "metric": tc.keep_best, "score": score, "expressions": metrics["n"]}
    if log.master:  # every rank validated (the same gathered metrics); one writes
        save_run_model(model, os.path.join(tc.out, BEST_WEIGHTS), metadata={"best": json.dumps(best)})
    state.best = best
    log(f"step {state.step}: best val {tc.keep_best} so far ({best['score']:.2f}), saved as {BEST_WEIGHTS}")


def resumed_best(state: TrainState, tc: TrainConfig, log: "RunLog") -> dict | None:
    """The best validation a resumed run has to beat: the checkpoint's, unless best.safetensors was written after the
    checkpoint's step (in the part of the run now replayed) or at it (checkpoints written before train.py saved
    after the step's validation): then the file's own record, so the record always describes the file. None when --keep-best now names another
    score (a none run also drops the file, which eval.py would otherwise take)."""
    path = os.path.join(tc.out, BEST_WEIGHTS)
    on_disk = read_best(path) if os.path.isfile(path) else None
    best = on_disk if on_disk is not None and on_disk["step"] >= state.step else state.best
    if best is not None and best["metric"] != tc.keep_best:
        log(f"--keep-best {tc.keep_best}: the run kept its best by {best['metric']} so far; that record is dropped")
        if tc.keep_best == "none" and log.master:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return None
    return best


def read_json(path: str, why: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found ({why})")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        except RecursionError:
            raise ValueError(f"{path}: not valid JSON (nested too deeply to read)") from None


def run_files(path) -> tuple[str, str]:
    """(config.json, model.safetensors) of a run directory or of a model.safetensors path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if path.endswith(".safetensors"):
        return os.path.join(os.path.dirname(path), "config.json"), path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run directory; train one with `python train.py --out {path}` "
                                "(the default `python train.py` writes runs/demo)")
    raise ValueError(f"{path}: expected a run directory or a .safetensors file beside its config.json")


def run_weights(path, choice: str | None = None) -> tuple[str, str]:
    """(weights file, what it holds) of a run directory: --weights best (best.safetensors) or last
    (model.safetensors); by default best when the run has it. A file path is used as it is."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if choice is not None and os.path.isfile(path):
            raise ValueError(f"--weights {choice} chooses a file of a run directory; --checkpoint {path} is a file")
        return path, "the given file"
    best, last = os.path.join(path, BEST_WEIGHTS), os.path.join(path, "model.safetensors")
    if choice == "best" and not os.path.isfile(best):
        raise FileNotFoundError(f"--weights best: {best} not found; train.py writes it at a validation that beats "
                                "the run's best (not with --keep-best none); --weights last takes model.safetensors")
    if choice == "best" or (choice is None and os.path.isfile(best)):
        record = read_best(best)
        return best, "the best validation of the run" + (
            f" ({record['metric']} {record['score']:.2f} at step {record['step']})" if record else "")
    return last, "the last weights of the run" + ("" if choice else f" (it has no {BEST_WEIGHTS})")


def init_from_run(model: PromptRIS, run: str) -> None:
    """--init-from: every weight of a trained run, strictly, into a model whose config equals the run's (else a
    ValueError naming each differing key with both values)."""
    weights, _ = run_weights(run, None)
    config_path = os.path.join(os.path.dirname(weights), "config.json")
    saved = read_json(config_path, "--init-from needs the run's config.json").get("model")
    theirs = _flat(saved if isinstance(saved, dict) else {})
    ours = _flat(json.loads(json.dumps(model.config.to_dict())))  # tuples as lists, as config.json holds them
    differing = [f"{k}: run {theirs.get(k, 'absent')} vs now {ours.get(k, 'absent')}"
                 for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    if differing:
        raise ValueError(f"--init-from {run}: the run's model config ({config_path}) differs from this one in "
                         f"{len(differing)} keys: {'; '.join(differing[:8])}{' ...' if len(differing) > 8 else ''}; "
                         "give the flags (and weights) the run was trained with")
    check_and_load(model, read_safetensors(weights), weights)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"sam": {"image_size": 1024}} -> {"sam.image_size": 1024}."""
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out
