"""Referring image segmentation data for Prompt-RIS (§3.3, §4.1, §4.2), in the order a reader meets it:

1. Referring records: `load_refs` reads one dataset of the refer-API layout every RIS codebase uses,
   DATA_ROOT/<dataset>/refs(<split_by>).p (or .json) and instances.json, with COCO train2014 images found in
   DATA_ROOT/images/train2014/, DATA_ROOT/images/mscoco/images/train2014/ or DATA_ROOT/<dataset>/images/.
   EVAL_SPLITS names the splits each benchmark reports (§4.1), OV_SEEN_CATEGORIES the open-vocabulary
   setting (Table 2).
2. The training set (§4.2): `combine_for_training` joins RefCOCO, RefCOCO+ and G-Ref and removes every image
   of their val/test splits (`eval_image_ids`; `hold_out_counts` says what that costs).
3. Datasets (§3.3): `epoch_batches` samples each step's images, `RefTrainSet` gives one image with b
   sentences (the group ICL compares), `RefEvalSet` one image with every sentence of a split, `collate` the batch.
4. Preprocessing: one letterbox geometry for both encoders (CLIP at Hc, SAM at S).
5. `python data.py stats | synth | download | import` (synth.py, fetch.py and own_data.py do the work).

The files are read by coco.py (restricted unpickler, field checks, COCO polygons and RLEs as pycocotools
decodes them) and images.py. Training, as train.py drives it:

    train_set = RefTrainSet([load_refs(root, "refcoco", "unc"), load_refs(root, "refcoco+", "unc"),
                             load_refs(root, "refcocog", "umd")], Tokenizer(), sentences_per_image=4)
    for epoch in range(epochs):
        train_set.set_epoch(epoch, stage=1 if epoch < 20 else 2)  # sentence draws: (seed, epoch, index)
        steps = epoch_batches(len(train_set), epoch, seed, 16, rank, world)  # this rank's share of each step
        for batch in DataLoader(train_set, batch_sampler=steps, collate_fn=collate):
            ...  # 16 images x 4 sentences = 64 sentences

Evaluation: DataLoader(RefEvalSet(load_refs(root, "refcoco", "unc"), "val", Tokenizer()), batch_size=16,
collate_fn=collate).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Collection, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

import synth
from clip_vit import CLIP_MEAN, CLIP_STD, cut_tokens
from coco import check_ids_agree, decode_mask, only_split_by, parse_ref, read_instances, read_refs_file
import fetch
from fetch import DOWNLOAD_SPLIT_BY
from images import open_rgb
from sam import SAM_MEAN, SAM_STD, resize_longest_side_shape
from sam_cache import sam_cache_path

logger = logging.getLogger("data")


# ---------------------------------------------------------------------------------------------
# 1. Referring records (refer API layout)
# ---------------------------------------------------------------------------------------------
# A refer-API record ("ref") names one COCO instance and the expressions written for it:
#   {"ref_id": int, "ann_id": int, "image_id": int, "category_id": int,
#    "split": "train" | "val" | "test" | "testA" | "testB",
#    "sentences": [{"sent": str, "raw": str, "tokens": [str], "sent_id": int}, ...],
#    "sent_ids": [int], "file_name": "COCO_train2014_..._<ann_id>.jpg"}
# coco.parse_ref reads ref_id, ann_id, image_id, category_id, split and each sentence's "sent" (lower-cased,
# tokenized text; "raw" when "sent" is absent) and "sent_id": G-Ref's umd and google partitions split
# the same expressions under different ref_ids, and the sentence ids are what tells that two refs are
# one (combine_for_training). file_name is not needed.

# The splits each benchmark reports (§4.1): RefCOCO/RefCOCO+ (UNC), G-Ref (UMD and Google).
EVAL_SPLITS = {
    ("refcoco", "unc"): ("val", "testA", "testB"),
    ("refcoco+", "unc"): ("val", "testA", "testB"),
    ("refcocog", "umd"): ("val", "test"),
    ("refcocog", "google"): ("val",),
    ("synth", "unc"): ("val", "testA", "testB"),
}

# Table 2's "test" column on RefCOCO / RefCOCO+ (as in CGFormer): their two test splits together. A split
# that exists under this name (G-Ref umd's "test") is itself.
SPLIT_UNIONS = {"test": ("testA", "testB")}

# Open-vocabulary setting (Table 2): CGFormer's split, which follows OVR-CNN's OV-COCO benchmark, COCO
# categories by id. Checked name for name against OVR-CNN's own lists, github.com/alirezazareian/ovr-cnn
# files mscoco_seen_classes.json (these 48, plus "background") and mscoco_unseen_classes.json (the 17);
# OVR-CNN writes "tv" for COCO's "tv". The other 15 COCO categories (traffic light, fire hydrant, stop
# sign, parking meter, sports ball, baseball bat, baseball glove, tennis racket, wine glass, hot dog,
# potted plant, dining table, cell phone, teddy bear, hair drier) are in neither split: not trained on,
# not evaluated.
OV_SEEN_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 7: "train", 8: "truck", 9: "boat", 15: "bench",
    16: "bird", 19: "horse", 20: "sheep", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    31: "handbag", 33: "suitcase", 34: "frisbee", 35: "skis", 38: "kite", 42: "surfboard", 44: "bottle",
    48: "fork", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange",
    56: "broccoli", 57: "carrot", 59: "pizza", 60: "donut", 62: "chair", 65: "bed", 70: "toilet", 72: "tv",
    73: "laptop", 74: "mouse", 75: "remote", 78: "microwave", 79: "oven", 80: "toaster", 82: "refrigerator",
    84: "book", 85: "clock", 86: "vase", 90: "toothbrush",
}
OV_UNSEEN_CATEGORIES = {
    5: "airplane", 6: "bus", 17: "cat", 18: "dog", 21: "cow", 22: "elephant", 28: "umbrella",
    32: "tie", 36: "snowboard", 41: "skateboard", 47: "cup", 49: "knife", 61: "cake",
    63: "couch", 76: "keyboard", 81: "sink", 87: "scissors",
}

@dataclass
class RefData:
    """One referring dataset (or several combined): records plus the COCO data they point at.

    refs:       validated refer records: ref_id, ann_id, image_id, category_id, split, sentences
                (a list of strings) and sent_ids (each sentence's sent_id, None where it has none).
    anns:       {ann_id: {"id", "image_id", "category_id", "segmentation", "source"}}, only the
                instances some ref points at; "source" is the instances.json it came from.
    images:     {image_id: {"id", "file_name", "height", "width", "path"}}, referred images only.
    categories: {category_id: name}.
    """

    dataset: str
    split_by: str
    refs: list
    anns: dict
    images: dict
    categories: dict = field(default_factory=dict)

    def splits(self) -> list[str]:
        """Split names present, in order of first appearance."""
        return list(dict.fromkeys(r["split"] for r in self.refs))

    def split_refs(self, split: str) -> list[dict]:
        """Refs of one split ("test" without a split of that name: testA + testB, SPLIT_UNIONS); an unknown
        split -> ValueError listing the splits that exist."""
        parts = SPLIT_UNIONS.get(split, ()) if split not in self.splits() else ()
        refs = [r for r in self.refs if r["split"] == split or r["split"] in parts]
        if not refs:
            raise ValueError(f"{self.dataset} ({self.split_by}) has no split '{split}'; "
                             f"available: {self.splits()}")
        return refs

    def mask(self, ann_id: int) -> np.ndarray:
        """(H, W) uint8 mask of one instance at the image's original resolution."""
        ann = self.anns[ann_id]
        image = self.images[ann["image_id"]]
        try:
            return decode_mask(ann["segmentation"], image["height"], image["width"])
        except ValueError as e:
            raise ValueError(f"{ann['source']}: annotation id {ann_id}: {e}") from e


def load_refs(data_root: str, dataset: str, split_by: str) -> RefData:
    """Read DATA_ROOT/<dataset>/refs(<split_by>).{json,p} and instances.json into a RefData.

    Every record is validated; a malformed one raises ValueError naming the file and the record
    (index and ref_id), a missing file raises FileNotFoundError naming the path.
    """
    records, refs_path = read_refs_file(data_root, dataset, split_by)
    refs = [parse_ref(r, refs_path, i) for i, r in enumerate(records)]
    instances_path, anns, images, categories = read_instances(data_root, dataset, refs)
    for i, r in enumerate(refs):
        where = f"{refs_path}: record {i} (ref_id {r['ref_id']})"
        if r["ann_id"] not in anns:
            raise ValueError(f"{where}: ann_id {r['ann_id']} is not in {instances_path}")
        if r["image_id"] not in images:
            raise ValueError(f"{where}: image_id {r['image_id']} is not in {instances_path}")
        if anns[r["ann_id"]]["image_id"] != r["image_id"]:
            raise ValueError(f"{where}: ann_id {r['ann_id']} belongs to image "
                             f"{anns[r['ann_id']]['image_id']}, not {r['image_id']}")
    return RefData(dataset, split_by, refs, anns, images, categories)


def split_seen_unseen(refs: Sequence[dict]) -> dict[str, list[dict]]:
    """Open-vocabulary setting (Table 2): {"seen": refs of OV_SEEN_CATEGORIES, "unseen": refs of
    OV_UNSEEN_CATEGORIES}; refs of the other 15 COCO categories are in neither.

    Training keeps the "seen" part (RefTrainSet(category_ids=OV_SEEN_CATEGORIES), train.py --seen-only);
    evaluation reports the two parts separately (RefEvalSet(category_ids=...), eval.py --subset).
    """
    return {"seen": [r for r in refs if r["category_id"] in OV_SEEN_CATEGORIES],
            "unseen": [r for r in refs if r["category_id"] in OV_UNSEEN_CATEGORIES]}


def split_stats(data: RefData) -> dict[str, dict[str, int]]:
    """{split: {"refs", "sentences", "images"}} counts."""
    stats = {}
    for split in data.splits():
        refs = [r for r in data.refs if r["split"] == split]
        stats[split] = {"refs": len(refs), "sentences": sum(len(r["sentences"]) for r in refs),
                        "images": len({r["image_id"] for r in refs})}
    return stats


# ---------------------------------------------------------------------------------------------
# 2. The training set (§4.2): the three datasets combined, no evaluation image in it
# ---------------------------------------------------------------------------------------------


def combine_for_training(datas: Sequence[RefData], split: str = "train",
                         held_out_from: Sequence[RefData] = ()) -> RefData:
    """The training set of §4.2: `split` refs of all datasets, minus every image that appears in
    any other split (val/test) of any of them or of `held_out_from` (e.g. the G-Ref google
    partition, whose val the paper also reports), so no evaluation image is ever trained on.

    RefCOCO, RefCOCO+ and G-Ref share COCO ids, so instances (ann_id) and images (image_id)
    coincide across datasets: sentences for the same object from different datasets become
    extra positives for instance contrastive learning (§3.3); RefCOCO and RefCOCO+ describe the same
    objects with different expressions on purpose, so refs of different datasets are never merged.
    Two partitions of one dataset (G-Ref's umd and google) split the same expressions under different
    ref_ids: a ref whose object and sentences (ann_id and sent_ids, the text where a sentence has no
    sent_id) a partition given earlier already holds is kept once, and the log says how many were dropped.
    """
    check_ids_agree([*datas, *held_out_from])
    held_out = set().union(*(eval_image_ids(d, split) for d in (*datas, *held_out_from)))
    refs, anns, images, categories, seen = [], {}, {}, {}, set()
    for d in datas:
        kept, repeated = [], 0
        for r in d.refs:
            if r["split"] != split or r["image_id"] in held_out:
                continue
            key = (d.dataset, r["ann_id"], frozenset(
                i if i is not None else text for i, text in zip(r["sent_ids"], r["sentences"])))
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            kept.append(r)
        if repeated:
            logger.warning("%s (%s): %d refs already given by another partition of %s (same ann_id and "
                           "sentences), kept once", d.dataset, d.split_by, repeated, d.dataset)
        refs += kept
        anns.update({r["ann_id"]: d.anns[r["ann_id"]] for r in kept})
        images.update({r["image_id"]: d.images[r["image_id"]] for r in kept})
        categories.update(d.categories)
    name = ",".join(d.dataset for d in datas)
    return RefData(name, ",".join(d.split_by for d in datas), refs, anns, images, categories)


def eval_image_ids(data: RefData, split: str = "train") -> set[int]:
    """Images of every split of `data` other than `split`: those the training hold-out removes (§4.2)."""
    return {r["image_id"] for r in data.refs if r["split"] != split}


def hold_out_counts(data: RefData, sources: Sequence[tuple[str, Collection[int]]], split: str = "train") -> dict:
    """What holding out images costs the `split` of one dataset, per reason, as combine_for_training removes them.

    sources: (reason, image ids) in order; an image held out for several reasons counts under the first.
    Returns {"images", "refs": the split's totals, "removed": {reason: {"images", "refs"}}, "kept": {...}}.
    """
    refs = [r for r in data.refs if r["split"] == split]
    removed, taken = {}, set()
    for reason, image_ids in sources:
        lost = [r for r in refs if r["image_id"] in image_ids and r["image_id"] not in taken]
        images = {r["image_id"] for r in lost}
        taken |= images
        removed[reason] = {"images": len(images), "refs": len(lost)}
    kept = [r for r in refs if r["image_id"] not in taken]
    return {"images": len({r["image_id"] for r in refs}), "refs": len(refs), "removed": removed,
            "kept": {"images": len({r["image_id"] for r in kept}), "refs": len(kept)}}


def hold_out_report(specs, val_spec, loaded: dict, partitions: dict, hold_out_partitions: bool) -> dict:
    """{"name:split_by": hold_out_counts} per training set: its train images and refs, those removed per
    reason (an image counts under its first reason, so G-Ref's other partition, last, shows what holding it out
    costs), those kept; with --no-hold-out-other-partition, "not_held_out": what it trains on of that partition."""
    label = ":".join
    eval_ids = {spec: eval_image_ids(d) for spec, d in (loaded | partitions).items()}
    other_partitions = [(f"G-Ref {split_by} val/test", eval_ids[(name, split_by)]) for name, split_by in partitions]
    report = {}
    for spec in dict.fromkeys(specs):
        sources = [("val/test of the same dataset", eval_ids[spec])]
        if val_spec != spec:
            sources.append((f"val/test of {label(val_spec)}, the validation set", eval_ids[val_spec]))
        sources += [(f"val/test of {label(o)}, another training set", eval_ids[o])
                    for o in dict.fromkeys(specs) if o not in (spec, val_spec)]
        counts = hold_out_counts(loaded[spec], sources + other_partitions if hold_out_partitions else sources)
        if not hold_out_partitions and other_partitions:
            removed = hold_out_counts(loaded[spec], sources + other_partitions)["removed"]
            counts["not_held_out"] = {reason: removed[reason] for reason, _ in other_partitions}
        report[label(spec)] = counts
    return report


# ---------------------------------------------------------------------------------------------
# 3. Datasets and the batch dict (§3.3 instance contrastive sampling)
# ---------------------------------------------------------------------------------------------


def _open_image(path: str) -> Image.Image:
    """A dataset image as stored (no EXIF turn: the annotations are drawn on these pixels), in RGB."""
    return open_rgb(path)


def drop_words(sentence: str, rng: np.random.Generator, p: float) -> str:
    """§4.2 repeat-and-mask: remove each word with probability p.

    At least one word is removed when there are two or more (so a repeat never duplicates its
    source verbatim) and at least one is kept.
    """
    words = sentence.split()
    keep = rng.random(len(words)) >= p
    if keep.all() and len(words) > 1:
        keep[rng.integers(len(words))] = False
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def epoch_batches(n_images: int, epoch: int, seed: int, images_per_batch: int, rank: int, world: int
                  ) -> list[list[int]]:
    """This rank's image indices for every step of `epoch`. One shuffle of all images (seed + epoch), cut
    into global batches of images_per_batch (the incomplete last one dropped); rank r takes the r-th
    contiguous share of each. The global batch of a step is the same images, in the same order, for any
    number of processes: the ranks' shares laid end to end are the one-process batch."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = images_per_batch // world
    return [order[start + rank * per_rank:start + (rank + 1) * per_rank]
            for start in range(0, n_images - images_per_batch + 1, images_per_batch)]


class _ImageSet(torch.utils.data.Dataset):
    """Shared part of the train and eval sets: images grouped with their (ref, sentence) pairs."""

    def __init__(self, data: RefData, refs: Sequence[dict], tokenizer, clip_size: int,
                 sam_size: int, context_length: int, image_dtype: torch.dtype):
        self.data = data
        self.tokenizer = tokenizer
        self.clip_size = clip_size
        self.sam_size = sam_size
        self.context_length = context_length
        # bfloat16 under bf16 autocast: half the bytes to the device and exact, since the first layer of either
        # tower (a convolution) rounds its float32 input to exactly these values
        self.image_dtype = image_dtype
        self.with_sam_images = True  # RefTrainSet.set_epoch: training stage 1 never looks at SAM's input
        self.sam_cache: Optional[str] = None  # RefTrainSet.use_sam_cache: a cached F_IS replaces the SAM input
        by_image: dict[int, list] = {}
        for r in refs:
            by_image.setdefault(r["image_id"], []).extend((r, s) for s in r["sentences"])
        self.image_ids = sorted(by_image)
        self.pairs = [by_image[i] for i in self.image_ids]  # per image: [(ref, sentence), ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def read_image(self, index: int) -> Image.Image:
        """Image `index` in RGB; what makes it unusable (unreadable, the wrong size, too thin to resize) raises
        OSError or ValueError in one line naming the file."""
        info = self.data.images[self.image_ids[index]]
        image = _open_image(info["path"])
        if image.size != (info["width"], info["height"]):  # masks would not line up
            raise ValueError(f"{info['path']} is {image.width}x{image.height} but its annotation "
                             f"says {info['width']}x{info['height']} (image id {info['id']})")
        smallest = min(self.clip_size, self.sam_size)
        if min(resize_longest_side_shape(image.height, image.width, smallest)) < 1:
            raise ValueError(f"{info['path']} is {image.width}x{image.height}: its short side would shrink to 0 "
                             f"pixels at the {smallest} px input (image id {info['id']}); crop it or leave it out")
        return image

    def _item(self, index: int, image: Image.Image, picks: Sequence[tuple[dict, str]],
              with_original: bool = False) -> dict:
        """Encode one image (from read_image) and its chosen (ref, sentence) pairs; each instance mask decoded once.

        with_original adds `gt_original`: the (H, W) uint8 mask of every sentence's instance.
        """
        info = self.data.images[self.image_ids[index]]
        cached = self.cached_sam_embedding(info["id"])
        clip_image, sam_image, valid = preprocess_image(image, self.clip_size, self.sam_size,
                                                        self.with_sam_images and cached is None)
        masks = {a: self.data.mask(a) for a in dict.fromkeys(r["ann_id"] for r, _ in picks)}
        # without SAM (training stage 1) the loss needs the masks on CLIP's grid only: frame them at CLIP's size
        # (a whole number of pixels per grid cell), not at SAM's 1024 px
        frame = self.sam_size if self.with_sam_images else self.clip_size
        frame_valid = valid if self.with_sam_images else resize_longest_side_shape(*image.size[::-1], frame)
        framed = {a: mask_to_frame(m, frame_valid, frame) for a, m in masks.items()}
        refs = [r for r, _ in picks]
        sentences = [s for _, s in picks]
        item = {
            "clip_image": clip_image.to(self.image_dtype),
            "sam_image": None if sam_image is None else sam_image.to(self.image_dtype),
            "tokens": self.tokenizer(sentences, context_length=self.context_length),
            "sentences": sentences,
            "masks": np.stack([framed[r["ann_id"]] for r in refs]),  # (n, S, S) uint8; (n, Hc, Hc) without SAM
            "ann_ids": [r["ann_id"] for r in refs], "ref_ids": [r["ref_id"] for r in refs],
            "category_ids": [r["category_id"] for r in refs],
            "image_id": info["id"], "input_size": valid,
            "original_size": (info["height"], info["width"]),
        }
        if self.with_sam_images and self.sam_cache:
            item["sam_embedding"] = cached  # None: not cached yet, the batch carries the SAM input instead
            item["sam_cache_file"] = sam_cache_path(self.sam_cache, info["id"], info["path"])
        if with_original:
            item["gt_original"] = [masks[r["ann_id"]] for r in refs]
        return item

    def cached_sam_embedding(self, image_id: int) -> Optional[torch.Tensor]:
        """F_IS of a frozen SAM from the --cache-sam directory, read here (in a DataLoader worker), or None."""
        if not (self.with_sam_images and self.sam_cache):
            return None
        path = sam_cache_path(self.sam_cache, image_id, self.data.images[image_id]["path"])
        return torch.load(path, weights_only=True) if os.path.isfile(path) else None


class RefTrainSet(_ImageSet):
    """Training items for instance contrastive learning (§3.3, §4.2): one image, b sentences.

    The b sentences are drawn from all training refs of the image, so they may describe the same
    or different instances; their ann_ids become the ICL target (same id -> same instance).
    When the image has fewer than b sentences, all are used and the remainder is filled by
    sampling them again, with each word of a repeat dropped with probability `word_drop`
    (default 0.2, at least one word kept), so repeats are not verbatim copies.

    Randomness comes from numpy's Generator seeded with (seed, epoch, index) only: an item is
    the same whichever worker or rank loads it, and a resumed run replays it exactly. Call
    `set_epoch(epoch, stage)` before each epoch (with `persistent_workers=True` the workers keep the
    copy of the dataset they were started with, so do not combine the two).

    An image that cannot be used (read_image: unreadable, the wrong size, too thin) stops the run with its path,
    unless `skip_bad_images`: then it is replaced by the next index (deterministically), logged, and its path
    listed in the item's "skipped_images" (collate gathers them: DataLoader workers' logs may go unseen, the
    batch reaches the main process); `max_skips` consecutive bad images still raise, so a dataset of bad images
    ends. Every item carries "skipped_images" (empty when none was skipped).

    `category_ids` keeps only refs of those categories (Table 2: OV_SEEN_CATEGORIES). Only refs are
    dropped (`dropped_refs` counts them): an image keeps its pixels, unseen objects included, as long
    as some ref of it is kept.

    Use with a DataLoader whose batch_sampler lists the B image indices of each step
    (epoch_batches, which also gives each rank its share) and `collate`, which flattens the b
    sentences of every image.
    """

    def __init__(self, refs_data: Union[RefData, Sequence[RefData]], tokenizer,
                 clip_size: int = 480, sam_size: int = 1024, sentences_per_image: int = 4,
                 seed: int = 0, split: str = "train", word_drop: float = 0.2,
                 category_ids: Optional[Collection[int]] = None, context_length: int = 77,
                 max_skips: int = 16, held_out_from: Sequence[RefData] = (),
                 image_dtype: torch.dtype = torch.float32, skip_bad_images: bool = False):
        datas = [refs_data] if isinstance(refs_data, RefData) else list(refs_data)
        combined = combine_for_training(datas, split, held_out_from)
        refs = combined.refs
        if category_ids is not None:  # open-vocabulary training (Table 2): seen categories only
            keep = set(category_ids)  # the images stay: other objects' pixels are still seen, unnamed
            refs = [r for r in refs if r["category_id"] in keep]
        self.dropped_refs = len(combined.refs) - len(refs)  # refs of categories not in category_ids
        if not refs:
            raise ValueError(f"no '{split}' refs left in {combined.dataset} after removing "
                             "evaluation images and other categories")
        super().__init__(combined, refs, tokenizer, clip_size, sam_size, context_length, image_dtype)
        self.sentences_per_image = sentences_per_image
        self.seed = seed
        self.word_drop = word_drop
        self.max_skips = max_skips
        self.skip_bad_images = skip_bad_images
        self.epoch = 0

    def set_epoch(self, epoch: int, stage: int = 2) -> None:
        """Before each epoch: the sentence draws of `epoch`; in training stage 1 (§4.2: the coarse mask only) items
        carry no SAM input and their masks are framed at CLIP's size. Read by every loader worker, which gets its
        copy of the dataset when the epoch's DataLoader starts."""
        self.epoch = epoch
        self.with_sam_images = stage == 2

    def use_sam_cache(self, folder: str | None) -> None:
        """train.py --cache-sam: items carry the F_IS a frozen SAM gave their image, read from `folder` (in the
        loader workers), or their SAM input when it is not cached yet. None: no cache."""
        self.sam_cache = folder

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def sample_sentences(self, index: int, rng: np.random.Generator) -> list[tuple[dict, str]]:
        """b (ref, sentence) pairs for image `index`: without replacement, then masked repeats."""
        pairs = self.pairs[index]
        b = self.sentences_per_image
        order = rng.permutation(len(pairs))[:b]
        picks = [pairs[i] for i in order]
        for i in rng.integers(0, len(pairs), size=b - len(picks)):
            ref, sentence = pairs[i]
            picks.append((ref, drop_words(sentence, rng, self.word_drop)))
        return picks

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(self.max_skips + 1 if self.skip_bad_images else 1):
            i = (index + attempt) % len(self)
            try:
                image = self.read_image(i)
            except (OSError, ValueError) as e:
                if not self.skip_bad_images:
                    raise type(e)(f"training image {i}: {e} (skip_bad_images=True, train.py --skip-bad-images, "
                                  "skips such images)") from e
                logger.warning("skipping training image %d: %s; using image %d instead", i, e, (i + 1) % len(self))
                skipped.append(self.data.images[self.image_ids[i]]["path"])
                continue
            return self._item(i, image, self.sample_sentences(i, self.rng(i))) | {"skipped_images": skipped}
        path = self.data.images[self.image_ids[index]]["path"]
        raise OSError(f"{self.max_skips + 1} consecutive training images could not be used, "
                      f"starting at index {index} ({path})")


class RefEvalSet(_ImageSet):
    """Evaluation items: one image with every (ref, sentence) pair of `split` (each ref x each
    sentence), plus `gt_original` masks at the original resolution for the metrics (§4.1).

    `category_ids` optionally keeps only refs of those categories (e.g. the unseen split of the
    open-vocabulary setting). An image that cannot be used raises OSError or ValueError naming the file.
    """

    def __init__(self, refs_data: RefData, split: str, tokenizer, clip_size: int = 480,
                 sam_size: int = 1024, category_ids: Optional[Collection[int]] = None,
                 context_length: int = 77, image_dtype: torch.dtype = torch.float32):
        refs = refs_data.split_refs(split)
        if category_ids is not None:
            keep = set(category_ids)
            refs = [r for r in refs if r["category_id"] in keep]
        super().__init__(refs_data, refs, tokenizer, clip_size, sam_size, context_length, image_dtype)
        self.split = split

    def __getitem__(self, index: int) -> dict:  # never skips: that would change the metrics' denominator
        return self._item(index, self.read_image(index), self.pairs[index], with_original=True)


def collate(items: Sequence[dict]) -> dict:
    """Items of RefTrainSet / RefEvalSet -> one batch dict (B images, N sentences; keys and shapes below).

    Sentences of all images are flattened in item order; `image_index[n]` says which image
    sentence n belongs to, `instance_ids[n]` which instance it refers to (the ICL target, §3.3).
    `category_ids` (N,) serves the seen/unseen report of the open-vocabulary setting.

    Whatever a training step would otherwise read back from the device is settled here, on the CPU:
    tokens are cut after the longest sentence (to a multiple of 8, clip_vit.cut_tokens) and image_index
    is valid by construction, so the model runs with `prepared=True`. Masks stay uint8 (a quarter of
    float32's bytes on the way to the device; the loss converts them there).

    `skipped_images` lists the images RefTrainSet(skip_bad_images=True) skipped to make these items.
    With a SAM embedding cache (items with "sam_embedding"), `sam_embeddings` lists each image's cached F_IS
    or None, `sam_cache_files` where each is kept (sam_cache_path), and `sam_images` holds the SAM inputs of the
    uncached images only, in order (None if all are).
    """
    counts = torch.tensor([len(it["sentences"]) for it in items])
    batch = {
        "clip_images": torch.stack([it["clip_image"] for it in items]),  # (B, 3, Hc, Hc)
        "sam_images": _stack_present([it["sam_image"] for it in items], "sam_embedding" in items[0]),
        "tokens": cut_tokens(torch.cat([it["tokens"] for it in items])),  # (N, L <= 77)
        "image_index": torch.repeat_interleave(torch.arange(len(items)), counts),  # (N,)
        "instance_ids": torch.tensor([a for it in items for a in it["ann_ids"]]),
        "masks": torch.from_numpy(np.concatenate([it["masks"] for it in items])),  # (N, S, S) uint8
        "image_ids": torch.tensor([it["image_id"] for it in items]),
        "input_sizes": torch.tensor([it["input_size"] for it in items]),  # (B, 2)
        "original_sizes": torch.tensor([it["original_size"] for it in items]),  # (B, 2)
        "sentences": [s for it in items for s in it["sentences"]],
        "ref_ids": torch.tensor([r for it in items for r in it["ref_ids"]]),
        "ann_ids": torch.tensor([a for it in items for a in it["ann_ids"]]),
        "category_ids": torch.tensor([c for it in items for c in it["category_ids"]]),
        # paths of the training images skipped for this batch (RefTrainSet skip_bad_images), to count per epoch
        "skipped_images": [p for it in items for p in it.get("skipped_images", ())],
    }
    if "sam_embedding" in items[0]:
        batch["sam_embeddings"] = [it["sam_embedding"] for it in items]
        batch["sam_cache_files"] = [it["sam_cache_file"] for it in items]  # where new embeddings are stored
    if all("gt_original" in it for it in items):
        batch["gt_original"] = [m for it in items for m in it["gt_original"]]
    return batch


def _stack_present(images: list, cached: bool) -> Optional[torch.Tensor]:
    """(B, 3, S, S) when every item has its SAM input; with a cache, those of the uncached images (K, ...)."""
    present = [x for x in images if x is not None]
    if not present or (len(present) < len(images) and not cached):
        return None
    return torch.stack(present)


# ---------------------------------------------------------------------------------------------
# 4. Preprocessing: one letterbox geometry for CLIP and SAM (§4.2)
# ---------------------------------------------------------------------------------------------
# Both encoders see the same frame: longest side resized to the encoder's size with SAM's
# rounding rule, padded bottom/right. A mask on CLIP's grid therefore maps onto SAM's frame by a
# plain resize, which is what turns the coarse CLIP mask into SAM prompts (§3.1).


def _resize_longest_side(image: Image.Image, size: int) -> np.ndarray:
    """(new_h, new_w, 3) uint8: longest side -> size, bilinear (as SAM's ResizeLongestSide)."""
    new_h, new_w = resize_longest_side_shape(image.height, image.width, size)
    return np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BILINEAR))


def letterbox(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the longest side to `size` and pad bottom/right.

    Returns:
        (3, size, size) float32 in 0..255, zero in the padding, and the valid (new_h, new_w).
    """
    resized = _resize_longest_side(image, size)
    h, w = resized.shape[:2]
    out = np.zeros((3, size, size), np.float32)
    out[:, :h, :w] = resized.transpose(2, 0, 1)  # (h, w, 3) -> (3, h, w)
    return torch.from_numpy(out), (h, w)


def _normalized_letterbox(image: Image.Image, size: int, mean: Sequence[float],
                          std: Sequence[float]) -> tuple[torch.Tensor, tuple[int, int]]:
    """letterbox with (x - mean) / std applied to the image only: the padding stays exactly 0."""
    pixels, (h, w) = letterbox(image, size)
    valid = pixels[:, :h, :w]  # a view: normalize in place
    valid -= torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    valid /= torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels, (h, w)


def preprocess_image(image: Image.Image, clip_size: int = 480, sam_size: int = 1024, with_sam: bool = True
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[int, int]]:
    """The two encoder inputs of one image, same letterbox geometry (batch dict layout).

    Returns:
        clip_image (3, clip_size, clip_size) CLIP-normalized, sam_image (3, sam_size, sam_size)
        SAM-normalized (None without with_sam), both 0 in the padding, and the valid (h', w') at sam_size.
    """
    clip_image, _ = _normalized_letterbox(image, clip_size, [255 * m for m in CLIP_MEAN],
                                          [255 * s for s in CLIP_STD])
    if not with_sam:  # e.g. training stage 1 (no SAM): skip the 1024 x 1024 resize
        return clip_image, None, resize_longest_side_shape(image.height, image.width, sam_size)
    sam_image, valid = _normalized_letterbox(image, sam_size, SAM_MEAN, SAM_STD)
    return clip_image, sam_image, valid


def mask_to_frame(mask: np.ndarray, valid_hw: tuple[int, int], size: int) -> np.ndarray:
    """(H, W) {0,1} mask at original resolution -> (size, size) uint8 in the letterboxed frame.

    Bilinear resize of the 0/1 mask then threshold 0.5: the boundary lands where the resized
    image's boundary is (nearest-neighbour would shift it by up to half an original pixel).
    """
    h, w = valid_hw
    resized = Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BILINEAR)
    out = np.zeros((size, size), np.uint8)
    out[:h, :w] = np.asarray(resized) >= 0.5
    return out


# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------


def print_stats(data_root: str, dataset: str, split_by: str, as_json: bool = False) -> None:
    """The `stats` table: refs, sentences and images per split (and the counts as one JSON line)."""
    data = load_refs(data_root, dataset, split_by)
    counts = split_stats(data)
    print(f"{dataset} ({split_by}): {len(data.refs)} refs, "
          f"{len(data.images)} images, {len(data.categories)} categories")
    for split, c in counts.items():
        print(f"  {split:>6}: {c['refs']:7d} refs {c['sentences']:7d} sentences "
              f"{c['images']:6d} images")
    if as_json:
        print(json.dumps({"dataset": dataset, "split_by": split_by, "splits": counts}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python data.py stats|synth|download|import ...` (callable from tests with argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="refs, sentences and images per split")
    stats.add_argument("name", nargs="?", metavar="DATASET", help="as --dataset")
    stats.add_argument("--data-root", required=True)
    stats.add_argument("--dataset", help="refcoco | refcoco+ | refcocog | synth | an imported NAME")
    stats.add_argument("--split-by", help="unc | umd | google (default: the download's, else the dataset's only "
                                          "refs file)")
    stats.add_argument("--json", action="store_true", help="also print the counts as one JSON line")
    synth.add_arguments(sub.add_parser("synth", help="write the built-in referring dataset (synth.py)"))
    fetch.add_arguments(sub.add_parser("download", help="fetch the refer annotations (and COCO train2014) into the "
                                                        "refer layout; what is complete is skipped (fetch.py)"))
    import own_data  # here: it reads images and prints stats with this file's functions
    own_data.add_arguments(sub.add_parser("import", help="your own referring data, a JSON Lines file, into the "
                                                         "refer layout (own_data.py, docs/own-data.md)"))
    args = parser.parse_args(argv)

    if args.command == "stats":
        dataset = args.name or args.dataset
        if not dataset or (args.name and args.dataset):
            parser.error("stats: name one dataset, as DATASET or --dataset")
        split_by = args.split_by or DOWNLOAD_SPLIT_BY.get(dataset) or only_split_by(args.data_root, dataset)
        print_stats(args.data_root, dataset, split_by, args.json)
    elif args.command == "download":
        fetch.download_refer(args.data_root, args.datasets, images=args.images, from_dir=args.from_dir)
        for name in args.datasets:
            print_stats(args.data_root, name, DOWNLOAD_SPLIT_BY[name])
    elif args.command == "import":
        return own_data.run(args)
    else:
        return synth.run(args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:  # the message names the file and the record
        sys.exit(f"data.py: error: {e}")
