"""Small tools that several test files share."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file


def pin_point_prompt(model, margin: float = 10.0):
    """Make the point of Eq. (3) an exact tie instead of a near one, for tests that compare two runs.

    A random model's coarse logits are nearly equal, so the point (an argmax over S_C) of two runs
    that differ only in float rounding (batch sizes, process counts, recomputation) can land on another
    cell and change the whole SAM side. A forward hook on the coarse decoder adds `margin` to the
    top-left CLIP cell of every sentence; bilinear upsampling copies a corner cell exactly (weights 1
    and 0) onto the corner cells of S_C, and argmax breaks that exact tie by its first index: the point
    is cell 0 in every run. The gradient is untouched (a constant is added). Returns the hook handle.
    """
    def add_margin(module, inputs, logits):  # S'_C: (N, N_C)
        return logits + margin * (torch.arange(logits.shape[-1], device=logits.device) == 0)

    return model.decoder.register_forward_hook(add_margin)


# ---- micro train.py runs ----


def micro_args(root, out, *extra):
    """2 steps per epoch, stage 1 (coarse mask only) in epoch 0, end to end from epoch 1."""
    return ["--config", "demo", "--data-root", root, "--out", str(out), "--clip-size", "32", "--sam-size", "32",
            "--images-per-batch", "4", "--sentences-per-image", "2", "--epochs", "4", "--stage1-epochs", "1",
            "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", *extra]


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_state(out):
    """Weights (model.safetensors) and the optimizer's moments of a finished run."""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    moments = {f"{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}
    return load_file(os.path.join(out, "model.safetensors")), moments, ckpt


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
