"""Load the official CLIP and SAM weights from safetensors files, in either official naming.

Two namings exist for each model: the original one (OpenAI CLIP's state dict, `segment_anything`'s
checkpoint) and the Hugging Face one (`openai/clip-vit-base-patch16`, `facebook/sam-vit-base`).
Our modules use the original names, so the original files load with a plain strict
`load_state_dict`; each Hugging Face naming is one readable rename table below.

    python load_weights.py convert IN.pth|IN.pt OUT.safetensors
    python load_weights.py inspect FILE.safetensors
"""
import argparse
import os
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class WeightsError(ValueError):
    """A weights file that cannot be loaded as asked; the message names the file and the keys."""


def read_safetensors(path) -> dict:
    """Every tensor of a safetensors file, or a WeightsError that says what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def check_and_load(module: torch.nn.Module, state: dict, path, ignore=()) -> None:
    """Strict load: every missing, unexpected or mis-shaped tensor is listed in one error."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.endswith(s) for s in ignore)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise WeightsError(f"{path}: cannot load into {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


# ---- CLIP ----


# ---- SAM ----


# ---- command line ----
