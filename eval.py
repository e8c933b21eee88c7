"""Evaluate a trained Prompt-RIS run with the metrics of the paper (§4.1, §4.4).

    python eval.py                                    # runs/demo on the built-in synth val split
    python eval.py --checkpoint runs/paper --data-root data/refer --dataset refcoco --split val
    python eval.py --output coarse                    # the coarse mask S'_C (of this run: trained with SAM)
    python eval.py --checkpoint runs/clip-only --output coarse   # Table 3 rows 1-3: a --no-use-sam run
    python eval.py --prompts mask,text                # Table 5: any subset of mask,point,text (or none)
    python eval.py --subset unseen                    # Table 2: seen / unseen categories
    python eval.py --checkpoint runs/paper --data-root data/refer --splits all   # Table 1, paper row beside
    python eval.py --image photo.jpg --text "the man on the left" --out pred.png   # Fig. 4-style panel
    python eval.py --image photo.jpg --text "the dog" --mask-out mask.png          # the mask, for other tools

Order of this file: the metrics (RISMetrics: oIoU, mIoU and P@X of §4.1, ImgAcc and InstAcc of §4.4), the
evaluation loop (run_model, evaluate), loading a run and segmenting one image (load_run, predict_image), the
command line (Tables 1 and 2 in one command, main last). The pictures, Fig. 4-style panels (--save-vis,
--image with --out), are drawn by viz.py.

Every prediction is compared with the ground truth at the ORIGINAL image resolution: the logits in
the padded (letterboxed) SAM frame are cropped to the valid region, resized bilinearly to the
original size and thresholded at 0 (SAM's `postprocess_masks`). The coarse CLIP mask goes through
the same function, because CLIP and SAM see the same letterboxed frame (see data.py).

SAM's image embedding F_IS depends on the image only, so it is computed once per image and shared
by all of that image's sentences (RefCOCO val: 7.2 per image). At paper size on CPU (1 thread) the
encoder takes ~13 s per image and everything else ~2.4 s per sentence: 5.0 s per expression with
the embedding reused instead of 13.3 s when recomputed for every expression (2.6x with 5 sentences
per image). Each evaluation prints its own measured numbers.

A photo given with --image is segmented as a viewer shows it (its EXIF orientation applied) and at
its full resolution; only the panel is drawn smaller (longest side viz.DISPLAY_SIDE), so a 12-megapixel
photo costs the model's time plus about a second.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoints import BEST_WEIGHTS, run_files, run_weights
from clip_vit import Tokenizer, cut_tokens
from coco import has_refs, only_split_by
from data import RefEvalSet, collate, load_refs, preprocess_image, split_seen_unseen
from images import MAX_PIXELS_ENV, open_rgb
from load_weights import WeightsError, check_and_load, read_safetensors, safetensors_shapes
from prompt_ris import PROMPT_TYPES, PromptRIS, PromptRISConfig
from runtime import HOW_TO_GET, NumberRange, autocast, sync
from sam import SAM_MEAN, SAM_STD
from viz import DISPLAY_SIDE, render_panel

# ---------------------------------------------------------------------------------------------
# Metrics (§4.1: oIoU, mIoU, P@X; §4.4: ImgAcc, InstAcc)
# ---------------------------------------------------------------------------------------------

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _binary(mask, name: str) -> np.ndarray:
    """A (H, W) bool array from a bool / {0,1} numpy array or tensor; logits are refused."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) mask, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name}: values must be 0/1 or bool (threshold logits at 0 first)")
        mask = mask.astype(bool)
    return mask


class RISMetrics:
    """Accumulates per-expression IoUs and reports the paper's table, in percent.

    oIoU    = sum of intersections / sum of unions over all expressions (big objects weigh more)
    mIoU    = mean of the per-expression IoUs
    P@X     = share of expressions whose IoU is strictly higher than X ("higher than", §4.1)
    ImgAcc  = average over images of the mIoU of that image's expressions (§4.4)
    InstAcc = average over instances (ann_id) of the mIoU of the expressions referring to it (§4.4)

    An empty prediction against an empty ground truth has IoU 1.0 (nothing to find, nothing
    found: a correct answer); it adds 0 to both oIoU sums. RefCOCO's ground truth is never empty,
    so this only matters for synthetic or filtered data. An update without image_id / ann_id
    forms a group of its own for ImgAcc / InstAcc.
    """

    def __init__(self):
        self.intersection = 0
        self.union = 0
        self.ious: list[float] = []
        self.image_keys: list = []
        self.instance_keys: list = []

    def update(self, pred, gt, image_id=None, ann_id=None) -> float:
        """Add one expression: pred and gt are (H, W) bool or 0/1 masks. Returns its IoU."""
        pred, gt = _binary(pred, "pred"), _binary(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        intersection = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        iou = intersection / union if union else 1.0
        own = ("expression", len(self.ious))
        self.intersection += intersection
        self.union += union
        self.ious.append(iou)
        self.image_keys.append(own if image_id is None else int(image_id))
        self.instance_keys.append(own if ann_id is None else int(ann_id))
        return iou

    def merge(self, others: list["RISMetrics"]) -> "RISMetrics":
        """This and other processes' metrics (each its own shard of images) as one. Pixel counts are integers
        and compute() sums exactly (math.fsum), so the result equals one process's over all the images."""
        for other in others:
            self.intersection += other.intersection
            self.union += other.union
            self.ious += other.ious
            self.image_keys += other.image_keys
            self.instance_keys += other.instance_keys
        return self

    def compute(self) -> dict:
        """{"oIoU", "mIoU", "P@0.5".."P@0.9", "ImgAcc", "InstAcc": percent, "n": expressions}."""
        if not self.ious:
            raise ValueError("RISMetrics.compute: no expression was added (empty evaluation set?)")
        ious = np.asarray(self.ious)
        result = {"oIoU": 100.0 * (self.intersection / self.union if self.union else 1.0),
                  "mIoU": 100.0 * math.fsum(self.ious) / len(self.ious)}  # exact sum: the same in any order
        for x in THRESHOLDS:
            result[f"P@{x}"] = 100.0 * float((ious > x).mean())
        result["ImgAcc"] = 100.0 * _mean_of_group_means(ious, self.image_keys)
        result["InstAcc"] = 100.0 * _mean_of_group_means(ious, self.instance_keys)
        result["n"] = len(ious)
        return result


def _mean_of_group_means(values: np.ndarray, keys: list) -> float:
    groups: dict = {}
    for value, key in zip(values.tolist(), keys):
        groups.setdefault(key, []).append(value)
    means = [math.fsum(g) / len(g) for g in groups.values()]
    return math.fsum(means) / len(means)


# ---------------------------------------------------------------------------------------------
# Evaluation: the SAM image embedding once per image, predictions at the original resolution
# ---------------------------------------------------------------------------------------------

OUTPUTS = ("mask", "coarse")  # Table 3: the final SAM mask | the CLIP-only coarse mask S'_C


@dataclass
class Timing:
    """Model time of an evaluation, split so that the saving of the embedding cache is visible."""
    sam_encoder_s: float = 0.0  # F_IS: once per image
    rest_s: float = 0.0  # CLIP + CMP + coarse decoder + prompts + SAM mask decoder: per sentence
    expressions: int = 0
    encoded_images: int = 0  # images that went through SAM's image encoder

    def summary(self) -> dict:
        """Seconds per expression with the embedding reused, and what recomputing it per expression
        would cost: the measured encoder time per image, paid once per expression instead."""
        with_reuse = (self.sam_encoder_s + self.rest_s) / max(self.expressions, 1)
        result = {"s_per_expression": with_reuse}
        if self.encoded_images:  # without reuse each expression would run the encoder on its image
            encoder_per_image = self.sam_encoder_s / self.encoded_images
            without = encoder_per_image + self.rest_s / self.expressions
            result.update(s_per_expression_no_reuse=without, reuse_speedup=without / with_reuse,
                          sam_encoder_s_per_image=encoder_per_image)
        return result


def run_model(model: PromptRIS, batch: dict, *, device="cpu", output: str = "mask", prompts=None,
              amp_dtype=None, timing: Timing | None = None) -> dict:
    """PromptRIS on one collate() batch; SAM's image encoder runs once per image (B), not per
    sentence (N). Returns the model's outputs as float32: "coarse" (N, Hc/16, Hc/16) and, for
    output="mask", "mask" (N, S, S) and "point" (N,)."""
    use_sam = output == "mask"
    clip_images = batch["clip_images"].to(device, non_blocking=True)  # pinned by the loader on CUDA
    tokens = batch["tokens"].to(device, non_blocking=True)
    image_index = batch["image_index"].to(device, non_blocking=True)
    with autocast(device, amp_dtype):
        sync(device)
        start = time.perf_counter()
        sam_embeddings = model.encode_sam_image(batch["sam_images"].to(device, non_blocking=True)) if use_sam else None
        sync(device)
        encoded = time.perf_counter()
        out = model(clip_images, tokens, image_index, sam_embeddings=sam_embeddings, use_sam=use_sam,
                    prompts=prompts, prepared=True)  # cut and checked on the CPU: no host sync
        sync(device)
    if timing is not None:
        timing.sam_encoder_s += encoded - start
        timing.encoded_images += clip_images.shape[0] if use_sam else 0
        timing.rest_s += time.perf_counter() - encoded
        timing.expressions += tokens.shape[0]
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def to_original(model: PromptRIS, logits: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """(n, h, w) logits on the letterboxed frame (SAM's S x S, or CLIP's grid: same geometry)
    -> (n, H, W) logits at the original image size; threshold at 0 for the mask."""
    return model.sam.postprocess_masks(logits[:, None], tuple(input_size), tuple(original_size))[:, 0]


def point_xy(model: PromptRIS, index: int, input_size, original_size) -> tuple[float, float]:
    """The point prompt of Eq. (3), a flat index into the 4h x 4w map, as (x, y) in original pixels.

    Cell (r, c) is the point at ((c + 0.5) S / 4w, (r + 0.5) S / 4h) of the padded S x S frame
    (PromptRIS.point_pe_table); the letterbox scaled the image by input_size / original_size.
    """
    grid_h, grid_w = model.sam.prompt_encoder.mask_input_size
    frame = model.config.sam.image_size
    r, c = divmod(int(index), grid_w)
    x = (c + 0.5) * frame / grid_w * original_size[1] / input_size[1]
    y = (r + 0.5) * frame / grid_h * original_size[0] / input_size[0]
    return x, y


def image_from_frame(sam_image: torch.Tensor, input_size, original_size) -> Image.Image:
    """Undo SAM's normalisation and letterbox of a (3, S, S) batch image -> PIL image (W, H)."""
    h, w = (int(s) for s in input_size)
    mean, std = torch.tensor(SAM_MEAN).view(3, 1, 1), torch.tensor(SAM_STD).view(3, 1, 1)
    pixels = (sam_image[:, :h, :w].float().cpu() * std + mean).clamp(0, 255).round().byte()
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (3, h, w) -> (h, w, 3)
    return image.resize((int(original_size[1]), int(original_size[0])), Image.BILINEAR)


def _save_panels(model, out, batch, b, rows, preds, ious, output, prompts, vis_dir, first: int) -> None:
    """Fig. 4-style panels for sentences `rows` of image b, numbered from `first` (ground truth outlined)."""
    input_size, original_size = batch["input_sizes"][b].tolist(), batch["original_sizes"][b].tolist()
    image = image_from_frame(batch["sam_images"][b], input_size, original_size)
    coarse = to_original(model, out["coarse"][rows], input_size, original_size).sigmoid().cpu().numpy()
    for j, n in enumerate(rows.tolist()):
        point = point_xy(model, out["point"][n], input_size, original_size) \
            if output == "mask" and "point" in prompts else None
        caption = f'"{batch["sentences"][n]}"  IoU {100 * ious[j]:.1f}'
        panel = render_panel(image, preds[j], coarse[j], caption, point, batch["gt_original"][n])
        panel.save(os.path.join(vis_dir, f"{first + j:04d}_image{int(batch['image_ids'][b])}"
                                         f"_ref{int(batch['ref_ids'][n])}.png"))


@torch.no_grad()
def evaluate(model: PromptRIS, loader, *, device="cpu", output: str = "mask", prompts=None,
             amp_dtype=None, vis_dir=None, max_vis: int = 0, gather=None, progress: bool = True) -> dict:
    """Metrics of `model` over a loader of collate()d RefEvalSet batches.

    output: "mask" (final SAM mask) or "coarse" (CLIP-only S'_C, Table 3); prompts: subset of
    mask/point/text given to SAM (Table 5), None = the model's config. Each prediction is compared
    at the original resolution. vis_dir / max_vis: save Fig. 4-style panels of the first max_vis
    expressions (with the ground truth outlined). The model's train/eval mode is restored.
    gather: RISMetrics of this process -> those of all processes (train.validate shards the images over the
    DDP ranks). progress: a tqdm bar over the batches. Logits are thresholded at the original size on the
    device; only bool masks reach the host.

    Returns RISMetrics.compute() plus timings: "s_per_expression" and, for output="mask",
    "s_per_expression_no_reuse", "reuse_speedup", "sam_encoder_s_per_image".
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "mask" and not model.config.use_sam:
        raise ValueError("this model was built without SAM (config use_sam=False): evaluate output='coarse'")
    prompts = tuple(model.config.prompts if prompts is None else prompts)
    metrics, timing, saved = RISMetrics(), Timing(), 0
    if vis_dir and max_vis > 0:
        os.makedirs(vis_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=f"eval {output}", disable=not progress, leave=False, dynamic_ncols=True):
            out = run_model(model, batch, device=device, output=output, prompts=prompts, amp_dtype=amp_dtype,
                            timing=timing)
            for b in range(batch["clip_images"].shape[0]):
                rows = (batch["image_index"] == b).nonzero()[:, 0]  # this image's sentences
                input_size, original_size = batch["input_sizes"][b].tolist(), batch["original_sizes"][b].tolist()
                logits = to_original(model, out[output][rows.to(out[output].device)], input_size, original_size)
                preds = (logits > 0).cpu().numpy()  # (n, H, W) bool: resized and thresholded on the device
                ious = [metrics.update(pred, batch["gt_original"][n], image_id=batch["image_ids"][b],
                                       ann_id=batch["ann_ids"][n]) for pred, n in zip(preds, rows.tolist())]
                if vis_dir and saved < max_vis:
                    keep = slice(0, max_vis - saved)
                    _save_panels(model, out, batch, b, rows[keep], preds[keep], ious[keep], output, prompts,
                                 vis_dir, saved)
                    saved += len(rows[keep])
    finally:
        model.train(was_training)
    return (gather(metrics) if gather else metrics).compute() | timing.summary()


# ---------------------------------------------------------------------------------------------
# Loading a run, one image at a time
# ---------------------------------------------------------------------------------------------


def load_run(path, device="cpu") -> tuple[PromptRIS, Tokenizer, dict]:
    """A trained model from a run directory written by train.py (or its model.safetensors).

    The run holds every weight (CLIP and SAM included), so no other file is needed; the
    tokenizer's vocabulary is the one recorded in config.json ("vocab", null = byte-level).
    Returns (model in eval mode on `device`, tokenizer, the run's config.json as a dict).
    """
    config_path, weights_path = run_files(path)
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: not found; a run directory holds config.json and model.safetensors, "
                                    "both written by train.py (`python train.py --out RUN_DIR`)")
    with open(config_path) as f:
        try:
            run_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        except RecursionError as e:  # Python's JSON reader recurses once per nesting level
            raise ValueError(f"{config_path}: not valid JSON (nested too deeply to read)") from e
    if not isinstance(run_config, dict) or "model" not in run_config:
        raise ValueError(f"{config_path}: no 'model' entry (PromptRISConfig.to_dict()); was it written by train.py?")
    try:
        config = PromptRISConfig.from_dict(run_config["model"])
    except ValueError as e:
        raise ValueError(f"{config_path}: 'model' entry: {e}") from e
    _check_weights_fit(config, config_path, weights_path)  # before a foreign config builds a huge model
    vocab, train = run_config.get("vocab"), run_config.get("train")
    if vocab is not None and not os.path.exists(vocab):
        raise FileNotFoundError(f"{config_path}: the run's tokenizer vocabulary {vocab} is missing")
    if vocab is None and isinstance(train, dict) and train.get("clip_weights"):
        raise ValueError(f"{config_path}: the run was trained from the CLIP weights {train['clip_weights']} without a "
                         "BPE vocabulary ('vocab' is null): its pretrained text tower read byte-level token ids it "
                         "never learned, so the run means nothing; train again with --vocab (" + HOW_TO_GET["vocab"]
                         + ")")
    model = PromptRIS(config)
    check_and_load(model, read_safetensors(weights_path), weights_path)
    return model.to(device).eval(), Tokenizer(vocab), run_config


def _check_weights_fit(config: PromptRISConfig, config_path: str, weights_path: str) -> None:
    """The weights file's tensor shapes (its header) against a model of `config` built on the meta device (no
    memory): a mismatch names both files and the first key that differs."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PromptRIS(config).state_dict().items()}
    found = safetensors_shapes(weights_path)
    differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differing:
        k = differing[0]
        raise WeightsError(f"{weights_path} does not fit the model of {config_path}: {len(differing)} keys differ, "
                           f"the first '{k}': file {found.get(k, 'absent')} vs config {expected.get(k, 'absent')}")


def image_batch(image: Image.Image, texts: list[str], tokenizer: Tokenizer, config: PromptRISConfig) -> dict:
    """One PIL image and its sentences as a batch dict of data.collate's layout (no ground truth)."""
    clip_image, sam_image, valid = preprocess_image(image, config.clip_image_size, config.sam.image_size)
    return {
        "clip_images": clip_image[None], "sam_images": sam_image[None],  # (1, 3, Hc, Hc), (1, 3, S, S)
        "tokens": cut_tokens(tokenizer(texts, config.clip.context_length)),
        "image_index": torch.zeros(len(texts), dtype=torch.long),
        "input_sizes": torch.tensor([valid]), "original_sizes": torch.tensor([[image.height, image.width]]),
    }


def open_photo(path, max_pixels: int | None = None) -> Image.Image:
    """A photo as a viewer shows it: cameras store the sensor's pixels plus an EXIF orientation tag, which
    is applied here (so the mask matches the picture people see), in 8-bit RGB (16-bit images scaled, float
    images refused: images.open_rgb, which the datasets use too). max_pixels: --max-image-pixels."""
    return open_rgb(path, orient=True, max_pixels=max_pixels)


@torch.no_grad()
def predict_image(model: PromptRIS, tokenizer: Tokenizer, image: Image.Image, text: str, *, device="cpu",
                  output: str = "mask", prompts=None, amp_dtype=None, timing: Timing | None = None) -> dict:
    """Segment `text` in `image` (pixels as they are: open files with open_photo to apply their EXIF
    orientation): {"mask": (H, W) bool, "coarse": (H, W) probabilities, "point": (x, y) or None}."""
    prompts = tuple(model.config.prompts if prompts is None else prompts)
    batch = image_batch(image if image.mode == "RGB" else image.convert("RGB"), [text], tokenizer, model.config)
    out = run_model(model.eval(), batch, device=device, output=output, prompts=prompts, amp_dtype=amp_dtype,
                    timing=timing)
    input_size, original_size = batch["input_sizes"][0].tolist(), batch["original_sizes"][0].tolist()
    return {"mask": (to_original(model, out[output], input_size, original_size)[0] > 0).cpu().numpy(),
            "coarse": to_original(model, out["coarse"], input_size, original_size)[0].sigmoid().cpu().numpy(),
            "point": point_xy(model, out["point"][0], input_size, original_size)
            if output == "mask" and "point" in prompts else None}


# ---------------------------------------------------------------------------------------------
# Command line: flag values, the data to evaluate, the printed table
# ---------------------------------------------------------------------------------------------


TABLE_KEYS = ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "ImgAcc", "InstAcc")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_prompts(text: str | None):
    """'mask,point,text' / 'none' -> tuple (Table 5); None -> None (the model's config)."""
    if text is None:
        return None
    prompts = tuple(p.strip() for p in text.split(",") if p.strip() and p.strip() != "none")
    unknown = sorted(set(prompts) - set(PROMPT_TYPES))
    if unknown:
        raise ValueError(f"--prompts: unknown prompt types {unknown}; use a subset of {','.join(PROMPT_TYPES)} or none")
    return prompts


def format_table(result: dict) -> str:
    """The paper's columns as an aligned two-line table (percent)."""
    head = " ".join(f"{k:>7}" for k in TABLE_KEYS)
    return head + "\n" + " ".join(f"{result[k]:7.2f}" for k in TABLE_KEYS)


SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "synth": "unc"}  # usual partitions


def _data_source(args, run_config: dict) -> tuple[str, str, str, str]:
    """(data_root, dataset, split_by, split): the flags, else the run's validation set (config.json 'train').

    A dataset may be written name:split_by as in train.py (refcocog:google)."""
    train = run_config.get("train", {})
    data_root = args.data_root or train.get("data_root")
    spec = args.dataset or train.get("val_dataset")
    if not data_root or not spec:
        raise ValueError("no evaluation data: pass --data-root and --dataset (the run's config.json records neither)")
    dataset, _, split_by = spec.partition(":")
    split_by = args.split_by or split_by or SPLIT_BY.get(dataset) or only_split_by(data_root, dataset)
    return data_root, dataset, split_by, args.split or train.get("val_split", "val")


def count_refs(eval_set) -> int:
    """Refs (referred objects, each with one or more sentences) of a RefEvalSet or a Subset of one."""
    base, indices = ((eval_set.dataset, eval_set.indices) if isinstance(eval_set, torch.utils.data.Subset)
                     else (eval_set, range(len(eval_set))))
    return len({ref["ref_id"] for i in indices for ref, _ in base.pairs[i]})


def build_loader(args, run_config: dict, tokenizer: Tokenizer, config: PromptRISConfig):
    """RefEvalSet of the chosen split (and seen/unseen subset, Table 2) in a DataLoader of collate()."""
    data_root, dataset, split_by, split = _data_source(args, run_config)
    data = load_refs(data_root, dataset, split_by)
    category_ids = None
    if args.subset != "all":  # Table 2: categories of the open-vocabulary split
        refs = split_seen_unseen(data.split_refs(split))[args.subset]
        category_ids = {r["category_id"] for r in refs}
        if not refs:
            raise ValueError(f"{dataset} ({split_by}) {split} has no refs of {args.subset} categories")
    eval_set = RefEvalSet(data, split, tokenizer, clip_size=config.clip_image_size,
                          sam_size=config.sam.image_size, category_ids=category_ids,
                          context_length=config.clip.context_length)
    if args.max_images:
        eval_set = torch.utils.data.Subset(eval_set, range(min(args.max_images, len(eval_set))))
    name = f"{dataset} {split} ({split_by})" + ("" if args.subset == "all" else f" {args.subset}")
    return torch.utils.data.DataLoader(eval_set, batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.workers, collate_fn=collate), name


# ---------------------------------------------------------------------------------------------
# Tables 1 and 2 in one command: every split under the data root, the paper's "Ours" row beside
# ---------------------------------------------------------------------------------------------

# Table 1's columns, (dataset, split_by, split), and the paper's row "Ours" (§4.3)
TABLE1_COLUMNS = (("refcoco", "unc", "val"), ("refcoco", "unc", "testA"), ("refcoco", "unc", "testB"),
                  ("refcoco+", "unc", "val"), ("refcoco+", "unc", "testA"), ("refcoco+", "unc", "testB"),
                  ("refcocog", "google", "val"), ("refcocog", "umd", "val"), ("refcocog", "umd", "test"))
PAPER_TABLE1 = {"oIoU": dict(zip(TABLE1_COLUMNS, (76.36, 80.37, 72.29, 67.06, 73.58, 58.96, 64.79, 67.16, 69.01))),
                "mIoU": dict(zip(TABLE1_COLUMNS, (78.10, 81.21, 74.64, 71.13, 76.60, 64.25, 69.17, 70.47, 71.29)))}
# Table 2's columns (mIoU; RefCOCO / RefCOCO+ "test" = testA + testB) and its row "Ours", seen and unseen
TABLE2_COLUMNS = (("refcoco", "unc", "val"), ("refcoco", "unc", "test"), ("refcoco+", "unc", "val"),
                  ("refcoco+", "unc", "test"), ("refcocog", "google", "val"), ("refcocog", "umd", "val"),
                  ("refcocog", "umd", "test"))
PAPER_TABLE2 = {"seen": dict(zip(TABLE2_COLUMNS, (78.74, 78.15, 71.96, 71.35, 66.71, 68.75, 69.70))),
                "unseen": dict(zip(TABLE2_COLUMNS, (65.07, 62.02, 52.05, 53.50, 47.99, 46.41, 45.66)))}
SYNTH_COLUMNS = {"all": (("synth", "unc", "val"), ("synth", "unc", "testA"), ("synth", "unc", "testB")),
                 "split": (("synth", "unc", "val"), ("synth", "unc", "test"))}  # the built-in data: no paper row
DATASET_LABELS = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "G-Ref", "synth": "synth"}
SPLIT_LABELS = {("refcocog", "google", "val"): "val(G)", ("refcocog", "umd", "val"): "val(U)",
                ("refcocog", "umd", "test"): "test(U)"}


def table_columns(data_root: str, subset: str, dataset: str | None = None) -> list[tuple[str, str, str]]:
    """The columns of Table 1 (subset "all") or Table 2 whose dataset has a refs file under data_root; with
    `dataset` (name or name:split_by) only its columns, and for a set of your own (data.py import) its splits."""
    columns = (TABLE1_COLUMNS + SYNTH_COLUMNS["all"]) if subset == "all" else (TABLE2_COLUMNS + SYNTH_COLUMNS["split"])
    if dataset is not None:
        name, _, split_by = dataset.partition(":")
        if name not in SPLIT_BY:  # no paper columns: every split but train
            split_by = split_by or only_split_by(data_root, name)
            return [(name, split_by, s) for s in load_refs(data_root, name, split_by).splits() if s != "train"]
        columns = tuple(c for c in columns if c[0] == name and split_by in ("", c[1]))
    found = [c for c in columns if has_refs(data_root, c[0], c[1])]
    if not found:
        raise ValueError(f"--splits all: no refs file of refcoco, refcoco+, refcocog (umd, google) or synth under "
                         f"--data-root {data_root}")
    return found


def format_paper_table(results: dict, subset: str) -> str:
    """Our numbers and the paper's "Ours" row per column, Table 1 (oIoU, mIoU) or Table 2 (mIoU) layout."""
    columns = list(results)
    datasets = [DATASET_LABELS.get(c[0], c[0]) if i == 0 or columns[i - 1][0] != c[0] else "" for i, c in enumerate(columns)]
    lines = [" " * 18 + "".join(f"{d:>9}" for d in datasets),
             " " * 18 + "".join(f"{SPLIT_LABELS.get(c, c[2]):>9}" for c in columns)]
    for metric in ("oIoU", "mIoU") if subset == "all" else ("mIoU",):
        paper = PAPER_TABLE1[metric] if subset == "all" else PAPER_TABLE2[subset]
        lines.append(f"{metric:<6}{'ours':<12}" + "".join(f"{results[c][metric]:9.2f}" for c in columns))
        lines.append(f"{'':<6}{'paper':<12}" + "".join(f"{paper[c]:9.2f}" if c in paper else f"{'-':>9}"
                                                       for c in columns))
    table = "Table 1" if subset == "all" else f"Table 2 ({subset})"
    return "\n".join(lines) + f"\npaper = {table}, row \"Ours\""


def evaluate_table(args, model: PromptRIS, tokenizer: Tokenizer, run_config: dict, prompts, amp_dtype) -> int:
    """--splits all: build_loader + evaluate on every column found under the data root, then the table.
    SAM's image embedding is computed per split: RefCOCO and RefCOCO+ share images, but keeping the
    embeddings of one dataset for the next would hold ~4 MiB per image (paper size) in memory."""
    data_root = args.data_root or run_config.get("train", {}).get("data_root")
    if not data_root:
        raise ValueError("--splits all needs --data-root (the run's config.json records none)")
    results = {}
    for dataset, split_by, split in table_columns(data_root, args.subset, args.dataset):
        column = argparse.Namespace(**{**vars(args), "data_root": data_root, "dataset": dataset,
                                       "split_by": split_by, "split": split})
        loader, name = build_loader(column, run_config, tokenizer, model.config)
        results[dataset, split_by, split] = result = evaluate(model, loader, device=args.device, output=args.output,
                                                              prompts=prompts, amp_dtype=amp_dtype)
        result["refs"] = count_refs(loader.dataset)
        print(f"{name}: {len(loader.dataset)} images, {result['refs']} refs, {result['n']} expressions, "
              f"oIoU {result['oIoU']:.2f} mIoU {result['mIoU']:.2f}")
    used = model.config.prompts if prompts is None else prompts
    print(f"{args.checkpoint}, output {args.output}" + (f", prompts {','.join(used) or 'none'}"
                                                        if args.output == "mask" else ""))
    print(format_paper_table(results, args.subset))
    if args.json:
        paper = PAPER_TABLE1 if args.subset == "all" else {"mIoU": PAPER_TABLE2[args.subset]}
        print(json.dumps({"checkpoint": args.checkpoint, "output": args.output, "prompts": list(used),
                          "subset": args.subset, "splits": {"/".join(c): r for c, r in results.items()},
                          "paper": {m: {"/".join(c): v for c, v in row.items() if c in results}
                                    for m, row in paper.items()}}))
    return 0


# ---------------------------------------------------------------------------------------------
# Command line: the flags and main
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a Prompt-RIS run (§4.1 metrics) or segment one image.")

    def number(flag: str, allowed: NumberRange, help: str, **kwargs):
        p.add_argument(flag, type=allowed, help=f"{help} [{allowed}]", **kwargs)

    p.add_argument("--checkpoint", default="runs/demo",
                   help="run directory (config.json + model.safetensors, written by train.py) or one of its "
                        ".safetensors files")
    p.add_argument("--weights", choices=("best", "last"),
                   help=f"of a run directory: its {BEST_WEIGHTS} (the best validation, train.py --keep-best) or "
                        "model.safetensors (the last weights); default: best when the run has it, else last")
    p.add_argument("--data-root", help="DATA_ROOT of the refer layout (default: the run's data root)")
    p.add_argument("--dataset", help="refcoco | refcoco+ | refcocog | synth | a NAME of `data.py import`, or "
                                     "name:split_by (default: the run's validation set)")
    p.add_argument("--split-by", help="unc | umd | google (default: umd for refcocog, else unc)")
    p.add_argument("--split", help="val | testA | testB | test ... (default: the run's validation split, val); "
                                   "on RefCOCO / RefCOCO+ 'test' is testA + testB (Table 2)")
    p.add_argument("--splits", choices=("all",), help="every split of every dataset under --data-root, in the layout "
                                                      "of Table 1 (with --subset: Table 2), the paper's row beside; "
                                                      "with --dataset, that dataset's splits")
    p.add_argument("--subset", choices=("all", "seen", "unseen"), default="all",
                   help="Table 2: only refs of seen / unseen categories")
    p.add_argument("--output", choices=OUTPUTS, default="mask",
                   help="final SAM mask, or the coarse mask S'_C. On a full run 'coarse' is the coarse mask of a "
                        "model trained end to end with SAM, not Table 3's CLIP-only rows: those are runs trained "
                        "with --no-use-sam (evaluated with --output coarse)")
    p.add_argument("--prompts", help="Table 5: prompts given to SAM, a subset of mask,point,text or none "
                                     "(default: the run's)")
    number("--batch-size", NumberRange(int, min=1), "images per batch (all their sentences)", default=4)
    number("--workers", NumberRange(int, min=0), "DataLoader worker processes", default=0)
    number("--max-images", NumberRange(int, min=1), "evaluate only the first N images (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype")
    p.add_argument("--json", action="store_true", help="also print the result as JSON (last line)")
    p.add_argument("--save-vis", metavar="DIR", help="save Fig. 4-style panels of the first --max-vis expressions")
    number("--max-vis", NumberRange(int, min=0), "panels saved by --save-vis", default=8)
    p.add_argument("--image", help="segment one photo instead (EXIF orientation applied; with --text, writes "
                                   "--out and/or --mask-out)")
    number("--max-image-pixels", NumberRange(int, min=1), "open --image up to this many pixels (width x height; "
           f"default Pillow's guard against decompression bombs, 2 x Image.MAX_IMAGE_PIXELS; dataset images: the "
           f"environment variable {MAX_PIXELS_ENV})")
    p.add_argument("--text", help="referring expression for --image")
    p.add_argument("--out", help=f"panel written for --image, longest side <= {DISPLAY_SIDE} px "
                                 "(default pred.png, unless only --mask-out is given)")
    p.add_argument("--mask-out", metavar="FILE", help="binary mask for --image as a PNG (0/255, mode L) at the "
                                                      "photo's displayed resolution")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.image is None) != (args.text is None):
        p.error("--image and --text go together")
    if args.text is not None and not args.text.strip():
        p.error("--text is empty: give the referring expression, e.g. --text \"the man on the left\"")
    if args.image is None and (args.out or args.mask_out):
        p.error("--out and --mask-out are written for --image (dataset panels: --save-vis DIR)")
    if args.image is not None and args.out is None and args.mask_out is None:
        args.out = "pred.png"
    clashing = [f for f, v in (("--split-by", args.split_by), ("--split", args.split),
                               ("--save-vis", args.save_vis), ("--image", args.image)) if v is not None]
    if args.splits and clashing:
        p.error(f"--splits all chooses the datasets and splits itself: drop {', '.join(clashing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = parse_prompts(args.prompts)
    amp_dtype = AMP_DTYPES[args.amp]
    weights, held = run_weights(args.checkpoint, args.weights)
    model, tokenizer, run_config = load_run(weights, args.device)
    print(f"weights: {weights}, {held}")

    if args.image is not None:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"--image {args.image}: no such file")
        started, timing = time.perf_counter(), Timing()
        image = open_photo(args.image, args.max_image_pixels)
        result = predict_image(model, tokenizer, image, args.text, device=args.device, output=args.output,
                               prompts=prompts, amp_dtype=amp_dtype, timing=timing)
        summary = {"image_size": list(image.size), "mask_fraction": float(result["mask"].mean()),
                   "point": result["point"], "out": args.out, "size": None, "mask_out": args.mask_out}
        if args.mask_out:
            # (H, W) uint8: mode L; zlib level 1: a third of the default's time, and masks compress well anyway
            Image.fromarray(result["mask"].astype(np.uint8) * 255).save(args.mask_out, compress_level=1)
            print(f"wrote {args.mask_out} ({image.width}x{image.height} mask, 0/255)")
        if args.out:
            panel = render_panel(image, result["mask"], result["coarse"], f'"{args.text}"', result["point"])
            panel.save(args.out, compress_level=1)  # PNG: a third of the default level's time, 1.4x the bytes
            summary["size"] = list(panel.size)
            print(f"wrote {args.out} ({panel.width}x{panel.height} panel)")
        summary |= {"model_s": timing.sam_encoder_s + timing.rest_s, "total_s": time.perf_counter() - started}
        print(f"{image.width}x{image.height} photo: mask covers {100 * summary['mask_fraction']:.1f}% of it; "
              f"model {summary['model_s']:.2f} s, total {summary['total_s']:.2f} s (reading, resizing, drawing, "
              "saving included)")
        if args.json:
            print(json.dumps(summary))
        return 0

    if args.splits:
        return evaluate_table(args, model, tokenizer, run_config, prompts, amp_dtype)
    loader, name = build_loader(args, run_config, tokenizer, model.config)
    used = model.config.prompts if prompts is None else prompts
    result = evaluate(model, loader, device=args.device, output=args.output, prompts=prompts, amp_dtype=amp_dtype,
                      vis_dir=args.save_vis, max_vis=args.max_vis if args.save_vis else 0)
    images, result["refs"] = len(loader.dataset), count_refs(loader.dataset)
    print(f"{args.checkpoint} on {name}: {images} images, {result['refs']} refs, {result['n']} expressions, "
          f"output {args.output}"
          + (f", prompts {','.join(used) or 'none'}" if args.output == "mask" else ""))
    print(format_table(result))
    if "reuse_speedup" in result:
        print(f"model time {result['s_per_expression'] * 1e3:.1f} ms/expression with the SAM image embedding "
              f"computed once per image ({result['n'] / images:.1f} expressions/image); "
              f"{result['s_per_expression_no_reuse'] * 1e3:.1f} ms if recomputed per expression: "
              f"{result['reuse_speedup']:.2f}x faster")
    if args.save_vis:
        print(f"panels of the first {min(args.max_vis, result['n'])} expressions in {args.save_vis}")
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "weights": weights, "data": name, "output": args.output,
                          "prompts": list(used), **result}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:  # bad inputs: the message names the file
        sys.exit(f"eval.py: error: {e}")
