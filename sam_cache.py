"""SAM image embeddings F_IS: once per image per batch, and with --cache-sam on disk across epochs.

SAM's image encoder is frozen in the paper (§4.2), so an image's embedding never changes while it trains: it is
computed once and read back by the DataLoader workers in later epochs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import TYPE_CHECKING

import torch

from checkpoints import write_then_rename
from runtime import remove_stale_temporary_files

if TYPE_CHECKING:  # annotations only
    from prompt_ris import PromptRIS
    from train import TrainConfig


def sam_cache_path(folder: str, image_id: int, image_path: str) -> str:
    """One file per image id and version of the image file: its size, modification time and inode (os.stat, no
    pixel read) are in the name, so a file replaced under the same id (a re-import with --overwrite) is never served
    the old file's embedding. Written to a temporary name and renamed, so a crash leaves no torn file here."""
    st = os.stat(image_path)
    version = hashlib.sha256(f"{st.st_size}/{st.st_mtime_ns}/{st.st_ino}".encode()).hexdigest()[:12]
    return os.path.join(folder, f"{int(image_id)}-{version}.pt")


def sam_weights_hash(model: PromptRIS, amp_dtype, data_root: str = "") -> str:
    """Key of the embedding cache: SAM image-encoder weights, input size, autocast dtype and the data root
    (image ids of another dataset would name other images); each file's name adds its image's version."""
    h = hashlib.sha256(f"{model.config.sam.image_size}/{amp_dtype}/{os.path.abspath(data_root)}".encode())
    for name, tensor in sorted(model.sam.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def sam_cache_dir(tc: TrainConfig, model: PromptRIS, train_towers: bool, amp_dtype, n_images: int,
                  log) -> str | None:
    """--cache-sam DIR/<hash of SAM's encoder weights, dtype, data root>: only a frozen SAM's embeddings can be
    cached. Says how much disk the cache takes, and stops before training when the disk lacks it."""
    if not tc.cache_sam or train_towers:
        return None
    folder = os.path.join(tc.cache_sam, sam_weights_hash(model, amp_dtype, tc.data_root or ""))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporary_files(folder, locked=False)  # other runs may be writing here
    c, (h, w) = model.config.sam.prompt_dim, model.sam.prompt_encoder.image_embedding_size
    per_image = c * h * w * (amp_dtype or torch.float32).itemsize  # stored as the encoder gives it
    cached = sum(e.stat().st_size for e in os.scandir(folder) if e.name.endswith(".pt"))
    needed, free = max(n_images * per_image - cached, 0), shutil.disk_usage(folder).free
    log(f"--cache-sam {folder}: {n_images} images x {per_image / 2**20:.1f} MiB = "
        f"{n_images * per_image / 2**30:.2f} GiB ({cached / 2**30:.2f} GiB cached, {free / 2**30:.1f} GiB free)")
    if needed > free:
        raise OSError(f"--cache-sam {tc.cache_sam}: the cache needs {needed / 2**30:.2f} GiB more, the disk has "
                      f"{free / 2**30:.2f} GiB free; free space, choose another directory or drop --cache-sam")
    return folder


def sam_embeddings(model: PromptRIS, batch: dict, device, cache_dir: str | None) -> torch.Tensor:
    """F_IS (B, C, h, w) for the batch's images. SAM's encoder is frozen, so no graph is kept and an
    image's embedding never changes: computed once per image (not per sentence) and, with a cache
    directory, read back in later epochs by the DataLoader workers (batch["sam_embeddings"]; images are not
    augmented, so this is exact). New embeddings are stored as the encoder gives them (bf16 under autocast)."""
    if cache_dir is None:
        return model.encode_sam_image(batch["sam_images"].to(device, non_blocking=True))
    embeddings = batch["sam_embeddings"]
    missing = [b for b, e in enumerate(embeddings) if e is None]
    fresh = model.encode_sam_image(batch["sam_images"].to(device, non_blocking=True)) if missing else []
    for b, embedding in zip(missing, fresh):
        path = batch["sam_cache_files"][b]  # sam_cache_path, named in the loader worker
        write_then_rename(path, lambda f, e=embedding: torch.save(e.cpu().clone(), f))
    fresh = dict(zip(missing, fresh))
    return torch.stack([fresh[b] if e is None else e.to(device, non_blocking=True) for b, e in enumerate(embeddings)])
