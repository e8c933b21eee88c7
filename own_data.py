"""Your own referring data, imported into the refer layout: `python data.py import SRC --name NAME`.

Machinery beside data.py (docs/own-data.md): SRC is a JSON Lines file, one referred object per line,

    {"image": "photos/0001.jpg", "mask": "masks/0001_a.png", "sentences": ["the red cup"], "split": "train"}

(`segmentation`, a COCO polygon list or RLE, may stand for `mask`; `split` is optional). Every line is checked,
then NAME is written where data.load_refs reads it, so training, evaluation and the SAM cache treat it as they
treat RefCOCO:

    ROOT/NAME/refs(BY).json     one refer record per object, its sentences pooled
    ROOT/NAME/instances.json    COCO images and annotations, masks as compressed RLE (coco.encode_mask);
                                info.image_dir = "images" (coco.find_image_dir)
    ROOT/NAME/images/           the images, hard-linked or copied; a photo with an EXIF orientation is stored
                                upright (as PNG), since masks are drawn on the picture a viewer shows

The import streams SRC (memory grows with the objects kept, not with the pixels), builds NAME in a temporary
folder and renames it into place only when every line passed: bad input never half-writes NAME.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import ExifTags, Image
from tqdm import tqdm

from coco import decode_mask, encode_mask
from data import EVAL_SPLITS, open_rgb, print_stats

NAME_PATTERN = re.compile(r"[A-Za-z0-9_+-]+$")  # ':' and ',' are syntax of train.py --datasets
RESERVED_NAMES = {name for name, _ in EVAL_SPLITS} | {"images"}  # the benchmarks' folders and COCO's images/
SPLITS = ("train", "val", "test", "testA", "testB")
LINE_FIELDS = ("image", "mask", "segmentation", "sentences", "split")
CATEGORY = {"id": 0, "name": "object"}  # imported objects have no category; COCO's ids start at 1
SHOWN_SKIPS = 5  # --skip-bad prints the first few reasons


def id_offset(name: str) -> int:
    """First id of NAME's images, objects, refs and sentences: 2**40 + (hash of NAME mod 2**20) * 2**32.

    COCO's ids (images < 600,000; objects < 2.3e6, crowd regions ~9.0e11) all lie below 2**40 (1.1e12), so an
    imported set never shares an id with RefCOCO, RefCOCO+ or G-Ref, and two imported sets only when their
    hashes meet (data.combine_for_training then refuses to train them together). Below 2**53: exact as floats.
    """
    block = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 2**20
    return 2**40 + block * 2**32


class LineError(ValueError):
    """One bad line: SRC, its line number and the field at fault, in one message."""

    def __init__(self, src: str, line: int, field_name: Optional[str], reason: str):
        where = f"{src}: line {line}" + (f": '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class _Image:
    """An image some kept line refers to: its place in NAME (index k: id offset + k) and its split."""
    index: int
    source: str
    width: int
    height: int
    upright: bool  # stored as it is (no EXIF turn to apply)
    split: Optional[str] = None
    split_line: int = 0  # the line that gave the split


@dataclass
class _Object:
    """One referred object: an image and a mask (as RLE), with every sentence any line gave it."""
    index: int
    image: _Image
    rle: dict
    area: int
    bbox: list
    sentences: list = field(default_factory=list)


def orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 = as stored)."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a damaged EXIF block: the pixels are still the picture
        return 1


def read_mask(path: str, threshold: Optional[int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of a single-channel image of `size` (width, height): its non-zero pixels, or with a
    threshold T its pixels > T. ValueError for another size (checked before any pixel is decoded), RGB and other
    multi-channel or wide modes, and several distinct non-zero values without T."""
    with Image.open(path) as mask:
        if mask.size != size:
            raise ValueError(f"{path} is {mask.width}x{mask.height} but its image is {size[0]}x{size[1]} (as "
                             "displayed, EXIF orientation applied); draw the mask on the upright image")
        if len(mask.getbands()) > 1:
            raise ValueError(f"{path} is an {mask.mode} image; save one channel (mode L, 1 or P: its non-zero "
                             "pixels the object), e.g. Image.open(f).convert('L').save(f)")
        if mask.mode not in ("1", "L", "P"):
            raise ValueError(f"{path} is a mode {mask.mode} image; a mask is a single-channel 8-bit image "
                             "(mode 1, L or P), its non-zero pixels the object")
        values = np.asarray(mask)
    if threshold is not None:
        return values > threshold
    nonzero = values[values != 0]
    if nonzero.size and nonzero.min() != nonzero.max():
        found = np.unique(nonzero)
        raise ValueError(f"{path} holds {len(found)} distinct non-zero values ({', '.join(map(str, found[:6]))}"
                         f"{', ...' if len(found) > 6 else ''}): which is the object? Save 0 and one value, or pass "
                         "--threshold T (object = value > T)")
    return values != 0


class Importer:
    """Reads SRC line by line (`add_line`), keeping images and objects; `write` lays out NAME."""

    def __init__(self, src: str, threshold: Optional[int]):
        self.src = src
        self.folder = os.path.dirname(os.path.abspath(src))
        self.threshold = threshold
        self.images: dict[str, _Image] = {}  # by source path, in order of the first kept line
        self.objects: dict[tuple, _Object] = {}  # by (image path, RLE counts): equal masks are one object
        self.checked: dict[str, tuple] = {}  # image path -> (width, height, upright) or the error

    def add_line(self, number: int, raw: bytes) -> None:
        """Check one line and keep its object; LineError (nothing kept) when anything is wrong."""
        def fail(field_name, reason):
            raise LineError(self.src, number, field_name, reason)

        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            fail(None, f"not UTF-8 text ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            fail(None, f"not JSON ({e.msg}, column {e.colno})")
        if not isinstance(record, dict):
            fail(None, f"expected a JSON object {{\"image\": ..., \"mask\": ..., \"sentences\": [...]}}, "
                       f"got {type(record).__name__}")
        for key in record:
            if key not in LINE_FIELDS:
                fail(key, f"unknown field; a line holds {', '.join(LINE_FIELDS)}")
        sentences = self._sentences(record, fail)
        split = record.get("split")
        if split is not None and split not in SPLITS:
            fail("split", f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or leave it out: drawn)")
        if not isinstance(record.get("image"), str) or not record["image"]:
            fail("image", "missing or not a path string")
        path = os.path.normpath(os.path.join(self.folder, record["image"]))
        width, height, upright = self._check_image(path, fail)
        mask = self._mask(record, width, height, fail)
        image = self.images.get(path)
        if split is not None and image is not None and image.split not in (None, split):
            fail("split", f"{record['image']} is given under split '{split}' here and '{image.split}' on line "
                          f"{image.split_line}; an image belongs to one split (its objects are held out together)")
        rle = encode_mask(mask)
        if image is None:
            image = self.images[path] = _Image(len(self.images) + 1, path, width, height, upright)
        if split is not None and image.split is None:
            image.split, image.split_line = split, number
        key = (path, rle["counts"])
        obj = self.objects.get(key)
        if obj is None:
            obj = self.objects[key] = _Object(len(self.objects) + 1, image, rle, int(mask.sum()), _bbox(mask))
        obj.sentences += [s for s in sentences if s not in obj.sentences]

    def _sentences(self, record: dict, fail) -> list[str]:
        sentences = record.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            fail("sentences", "missing or not a non-empty list of strings")
        for j, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                fail(f"sentences[{j}]", ("an empty sentence" if isinstance(s, str) else f"{type(s).__name__}, not a "
                                        "string") + "; each is a referring expression such as \"the red cup left of "
                                        "the kettle\"")
        return [" ".join(s.split()) for s in sentences]

    def _check_image(self, path: str, fail) -> tuple[int, int, bool]:
        """(width, height) as a viewer shows the image, and whether it is stored so; read once per image."""
        if path not in self.checked:
            try:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no such file {path}")
                upright_pixels = open_rgb(path, orient=True)  # 16-bit scaled, float refused, size limit: as training
                with Image.open(path) as stored:
                    upright = orientation(stored) == 1
                self.checked[path] = (upright_pixels.width, upright_pixels.height, upright)
            except (OSError, ValueError) as e:
                self.checked[path] = str(e)
        result = self.checked[path]
        if isinstance(result, str):
            fail("image", result)
        return result

    def _mask(self, record: dict, width: int, height: int, fail) -> np.ndarray:
        """The object's (H, W) bool mask, in the upright image's frame, from `mask` or `segmentation`."""
        if ("mask" in record) == ("segmentation" in record):
            fail("mask", "give exactly one of 'mask' (a PNG) and 'segmentation' (COCO polygons or RLE)")
        if "mask" in record:
            name = "mask"
            if not isinstance(record["mask"], str) or not record["mask"]:
                fail(name, "not a path string")
            path = os.path.normpath(os.path.join(self.folder, record["mask"]))
            if not os.path.isfile(path):
                fail(name, f"no such file {path}")
            try:
                mask = read_mask(path, self.threshold, (width, height))
            except ValueError as e:
                fail(name, str(e))
            except Exception as e:  # unreadable, truncated, not an image
                fail(name, f"cannot read {path}: {type(e).__name__}: {e}")
        else:
            name = "segmentation"
            try:
                mask = decode_mask(record["segmentation"], height, width) != 0  # polygons clipped as pycocotools
            except (ValueError, TypeError) as e:
                fail(name, f"{e} (COCO polygons [[x0, y0, x1, y1, ...], ...] or RLE, in the {width}x{height} "
                           "upright image)")
        if not mask.any():
            fail(name, "empty mask: no pixel is the object")
        return mask

    def draw_splits(self, val_fraction: float, test_fraction: float, seed: int) -> dict:
        """Images without a split: a seeded shuffle, the first val_fraction to val, the next test_fraction to test,
        the rest to train (an image's objects stay together). Returns {"given": {...}, "drawn": {...}} counts."""
        undrawn = [im for im in self.images.values() if im.split is None]
        order = np.random.default_rng(seed).permutation(len(undrawn))
        n_val, n_test = round(val_fraction * len(undrawn)), round(test_fraction * len(undrawn))
        counts = {"given": {}, "drawn": {}}
        for im in self.images.values():
            if im.split is not None:
                counts["given"][im.split] = counts["given"].get(im.split, 0) + 1
        for rank, i in enumerate(order):
            undrawn[i].split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            counts["drawn"][undrawn[i].split] = counts["drawn"].get(undrawn[i].split, 0) + 1
        return counts

    def write(self, root: str, name: str, split_by: str, overwrite: bool) -> str:
        """Lay out NAME in a temporary folder of ROOT, then rename it into place; returns ROOT/NAME."""
        target, offset = os.path.join(root, name), id_offset(name)
        staging = os.path.join(root, f".{name}.importing-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(os.path.join(staging, "images"))
        try:
            file_names = [self._place_image(im, os.path.join(staging, "images"), name)
                          for im in tqdm(self.images.values(), desc="images", unit="img", leave=False)]
            info = {"description": f"imported by own_data.py from {os.path.basename(self.src)}",
                    "image_dir": "images", "split_by": split_by, "id_offset": offset}
            images = ({"id": offset + im.index, "file_name": file_names[im.index - 1], "height": im.height,
                       "width": im.width} for im in self.images.values())
            annotations = ({"id": offset + obj.index, "image_id": offset + obj.image.index,
                            "category_id": CATEGORY["id"], "segmentation": obj.rle, "area": obj.area, "bbox": obj.bbox,
                            "iscrowd": 0} for obj in self.objects.values())
            with open(os.path.join(staging, "instances.json"), "w") as f:  # "info" first: is_imported reads it
                write_json_object(f, {"info": info, "images": images, "annotations": annotations,
                                      "categories": [CATEGORY]})
            with open(os.path.join(staging, f"refs({split_by}).json"), "w") as f:
                write_json_list(f, self._refs(offset, file_names))
            replace_folder(staging, target, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _refs(self, offset: int, file_names: list[str]):
        """The refer records, one per object, its sentences numbered after those of the objects before it."""
        sent_id = offset
        for obj in self.objects.values():
            sentences = [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": sent_id + 1 + j}
                         for j, s in enumerate(obj.sentences)]
            sent_id += len(sentences)
            yield {"ref_id": offset + obj.index, "ann_id": offset + obj.index, "image_id": offset + obj.image.index,
                   "category_id": CATEGORY["id"], "split": obj.image.split, "sentences": sentences,
                   "sent_ids": [s["sent_id"] for s in sentences], "file_name": file_names[obj.image.index - 1]}

    def _place_image(self, im: _Image, folder: str, name: str) -> str:
        """Hard-link (else copy) the image into NAME, or store it upright as PNG; returns its file name. The name
        carries NAME, so two imported sets never name different pictures alike (data.combine_for_training)."""
        stem = f"{name}_{im.index:07d}"
        if not im.upright:
            file_name = stem + ".png"
            open_rgb(im.source, orient=True).save(os.path.join(folder, file_name), compress_level=1)
            return file_name
        file_name = stem + os.path.splitext(im.source)[1].lower()
        try:
            os.link(im.source, os.path.join(folder, file_name))
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(im.source, os.path.join(folder, file_name))
        return file_name


def write_json_list(f, items) -> None:
    """A JSON list written item by item: the whole document is never one string in memory."""
    f.write("[")
    for i, item in enumerate(items):
        f.write((", " if i else "") + json.dumps(item))
    f.write("]")


def write_json_object(f, fields: dict) -> None:
    """A JSON object whose values may be iterators (written as lists, item by item)."""
    f.write("{")
    for i, (key, value) in enumerate(fields.items()):
        f.write((", " if i else "") + json.dumps(key) + ": ")
        if isinstance(value, (dict, list)):
            f.write(json.dumps(value))
        else:
            write_json_list(f, value)
    f.write("}")


def _bbox(mask: np.ndarray) -> list[float]:
    """COCO [x, y, width, height] of the mask's pixels."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def is_imported(folder: str) -> bool:
    """Whether `folder` holds a set this file wrote (instances.json's info names its image folder)."""
    try:
        with open(os.path.join(folder, "instances.json")) as f:
            head = f.read(4096)  # json.dump writes "info" first
    except OSError:
        return False
    return head.startswith('{"info": {') and '"image_dir": "images"' in head


def check_target(root: str, name: str, overwrite: bool) -> None:
    """ValueError when NAME is not a valid name, or exists and may not be replaced."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '+' only (':' and ',' are syntax of "
                         "train.py --datasets)")
    if name in RESERVED_NAMES:
        raise ValueError(f"--name {name}: taken by a benchmark or COCO's image folder; choose another name")
    target = os.path.join(root, name)
    if os.path.exists(target):
        if not overwrite:
            raise ValueError(f"{target} exists; pass --overwrite to replace it (or choose another --name)")
        if not is_imported(target):
            raise ValueError(f"{target} exists and was not written by `data.py import`; --overwrite replaces only "
                             "imported sets: choose another --name")


def replace_folder(staging: str, target: str, overwrite: bool) -> None:
    """Rename the finished staging folder to target; an existing target (with overwrite) is moved aside first and
    removed only once the new one is in place."""
    old = None
    if os.path.exists(target):
        check_target(os.path.dirname(target), os.path.basename(target), overwrite)
        old = f"{staging}.old"
        os.rename(target, old)
    os.rename(staging, target)
    if old:
        shutil.rmtree(old)


def import_jsonl(src: str, root: str, name: str, split_by: str = "own", threshold: Optional[int] = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, skip_bad: bool = False,
                 overwrite: bool = False) -> dict:
    """Import SRC as NAME under ROOT (module docstring). The first bad line raises LineError (nothing written),
    or with skip_bad is skipped. Returns {"path", "images", "objects", "lines", "skipped": [reasons], "splits"}."""
    check_target(root, name, overwrite)
    if not NAME_PATTERN.match(split_by):
        raise ValueError(f"--split-by {split_by!r}: use letters, digits, '_', '-' and '+' only")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each >= 0, together "
                         "below 1 (the rest trains)")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file (a JSON Lines file, one referred object per line)")
    importer, skipped, lines = Importer(src, threshold), [], 0
    with open(src, "rb") as f, tqdm(total=os.path.getsize(src), unit="B", unit_scale=True, desc="import") as bar:
        for number, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue  # blank lines separate nothing
            lines += 1
            try:
                importer.add_line(number, raw)
            except LineError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
    if not importer.objects:
        raise ValueError(f"{src}: no object to import ({lines} lines, {len(skipped)} skipped)")
    splits = importer.draw_splits(val_fraction, test_fraction, seed)
    path = importer.write(root, name, split_by, overwrite)
    return {"path": path, "images": len(importer.images), "objects": len(importer.objects), "lines": lines,
            "skipped": skipped, "splits": splits}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python data.py import`."""
    parser.add_argument("src", metavar="SRC", help="JSON Lines file: one referred object per line, "
                        '{"image": ..., "mask": ... or "segmentation": ..., "sentences": [...], "split": ...}')
    parser.add_argument("--name", required=True, help="dataset name (letters, digits, _ - +): train.py --datasets "
                                                      "NAME, eval.py --dataset NAME")
    parser.add_argument("--data-root", default="data/own", help="DATA_ROOT to write ROOT/NAME into (default data/own)")
    parser.add_argument("--split-by", default="own", help="the split scheme's name, refs(BY).json (default own)")
    parser.add_argument("--threshold", type=int, help="masks with several values: object = value > T")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="images without a split drawn into val")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="images without a split drawn into test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split draw")
    parser.add_argument("--skip-bad", action="store_true", help="import the good lines, count and show the bad")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing imported NAME")


def run(args: argparse.Namespace) -> int:
    result = import_jsonl(args.src, args.data_root, args.name, args.split_by, args.threshold, args.val_fraction,
                          args.test_fraction, args.seed, args.skip_bad, args.overwrite)
    print(f"imported {result['objects']} objects on {result['images']} images from {result['lines']} lines of "
          f"{args.src} into {result['path']}")
    for kind, counts in result["splits"].items():
        if counts:
            print(f"  split {kind}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + " images"
                  + (f" (--seed {args.seed}, --val-fraction {args.val_fraction}, --test-fraction "
                     f"{args.test_fraction})" if kind == "drawn" else ""))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} bad lines (--skip-bad); the first:")
        for reason in result["skipped"][:SHOWN_SKIPS]:
            print(f"  {reason}")
    print_stats(args.data_root, args.name, args.split_by)
    return 0
