"""The built-in referring dataset ("synth"): coloured shapes written in the real RefCOCO layout.

`python train.py` (the demo) and the tests train and evaluate on it, with no download. Coloured shapes
on a light background, each referred to by expressions that need the words to tell the objects apart
("the red circle", "the largest triangle", "the shape above the green star"). Every candidate expression
is checked against all objects of its image and kept only if exactly one object satisfies it. The
files go through exactly the code path of RefCOCO (data.load_refs):
    OUT/synth/refs(unc).p  (protocol-2 pickle of plain data, like the original files)
    OUT/synth/instances.json  (COCO polygons)
    OUT/images/train2014/COCO_train2014_%012d.jpg

    python synth.py --out data/synth          # or: python data.py synth --out data/synth
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SYNTH_COLORS = {  # saturated and far apart in hue, so colour words are easy to ground
    "red": (215, 30, 35), "green": (30, 160, 50), "blue": (35, 75, 215),
    "yellow": (240, 205, 20), "purple": (145, 45, 185), "orange": (245, 125, 15),
}
SYNTH_SHAPES = ("circle", "square", "triangle", "star")  # COCO-style category ids 1..4
_SYNTH_RADII = (0.10, 0.15, 0.21)  # size classes as a fraction of the shorter image side
_SYNTH_BOUND = 1.15  # every shape fits in a circle of 1.15 r: used to forbid overlaps


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(K, 2) vertices of a shape centred at (cx, cy) with nominal radius r."""
    if shape == "circle":
        a = np.arange(32) * 2 * np.pi / 32
        radius = np.full(32, r)
    elif shape == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        radius = np.full(4, 0.75 * r * math.sqrt(2))
    elif shape == "triangle":  # pointing up
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radius = np.full(3, _SYNTH_BOUND * r)
    else:  # five-pointed star
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, _SYNTH_BOUND * r, 0.5 * _SYNTH_BOUND * r)
    return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], axis=1)


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _place_objects(rng: np.random.Generator, width: int, height: int) -> list[dict]:
    """2-4 non-overlapping shapes, mostly distinct colours, clearly different sizes."""
    n = int(rng.integers(2, 5))
    colors = list(rng.choice(list(SYNTH_COLORS), size=n, replace=False))
    if n > 2 and rng.random() < 0.3:  # sometimes a repeated colour, so shape words matter
        colors[-1] = colors[0]
    side = min(width, height)
    objects: list[dict] = []
    for color in colors:
        r = side * (_SYNTH_RADII[rng.integers(len(_SYNTH_RADII))] + rng.uniform(-0.01, 0.01))
        bound = _SYNTH_BOUND * r
        for _ in range(100):
            cx = rng.uniform(bound + 1, width - bound - 1)
            cy = rng.uniform(bound + 1, height - bound - 1)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > bound + o["bound"] + 3
                   for o in objects):
                shape = SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))]
                poly = _shape_polygon(shape, cx, cy, r)
                objects.append({"color": color, "shape": shape, "cx": cx, "cy": cy, "bound": bound,
                                "polygon": poly, "area": _polygon_area(poly)})
                break
    return objects


def _extreme(members: list[int], key, margin: float) -> Optional[int]:
    """The member with the largest key if it beats the runner-up by more than margin."""
    if len(members) < 2:
        return None
    ranked = sorted(members, key=key, reverse=True)
    return ranked[0] if key(ranked[0]) - key(ranked[1]) > margin else None


def _synth_expressions(objects: list[dict], width: int, height: int
                       ) -> list[list[tuple[str, bool]]]:
    """Unambiguous expressions per object: [(text, uses only colour/shape words), ...]."""
    idx = range(len(objects))
    found: list[list[tuple[str, bool]]] = [[] for _ in objects]

    def add_if_unique(text: str, members: list[int], simple: bool = False) -> None:
        if len(members) == 1 and text not in (t for t, _ in found[members[0]]):
            found[members[0]].append((text, simple))

    def where(**attrs) -> list[int]:
        return [i for i in idx if all(objects[i][k] == v for k, v in attrs.items())]

    for o in objects:  # attribute words
        c, s = o["color"], o["shape"]
        add_if_unique(f"the {c} {s}", where(color=c, shape=s), True)
        add_if_unique(f"{c} {s}", where(color=c, shape=s), True)
        add_if_unique(f"the {c} shape", where(color=c), True)
        add_if_unique(f"the {s}", where(shape=s), True)

    groups = [("shape", list(idx))] + [(s, where(shape=s)) for s in SYNTH_SHAPES] + [
        (f"{c} shape", where(color=c)) for c in SYNTH_COLORS] + [
        (f"{c} {s}", where(color=c, shape=s)) for c in SYNTH_COLORS for s in SYNTH_SHAPES]
    dx, dy = 0.12 * width, 0.12 * height
    for noun, members in groups:  # superlatives inside a group
        two = len(members) == 2
        for text, key, margin in (
            (f"the {noun} on the left" if noun != "shape" else "the leftmost shape",
             lambda i: -objects[i]["cx"], dx),
            (f"{noun} on the right" if noun != "shape" else "rightmost shape",
             lambda i: objects[i]["cx"], dx),
            (f"the {noun} at the top", lambda i: -objects[i]["cy"], dy),
            (f"the {noun} at the bottom", lambda i: objects[i]["cy"], dy),
            (f"the {'big' if two else 'largest'} {noun}",
             lambda i: math.log(objects[i]["area"]), math.log(1.4)),
            (f"the {'small' if two else 'smallest'} {noun}",
             lambda i: -math.log(objects[i]["area"]), math.log(1.4)),
        ):
            best = _extreme(members, key, margin)
            if best is not None:
                add_if_unique(text, [best])

    for b, anchor in enumerate(objects):  # relations to an anchor named by a unique description
        names = [t[len("the "):] for t, simple in found[b] if simple and t.startswith("the ")]
        if not names:
            continue
        name = names[0]
        for rel, test in (
            ("above", lambda o: anchor["cy"] - o["cy"] > 1.2 * abs(o["cx"] - anchor["cx"])),
            ("below", lambda o: o["cy"] - anchor["cy"] > 1.2 * abs(o["cx"] - anchor["cx"])),
            ("left of", lambda o: anchor["cx"] - o["cx"] > 1.2 * abs(o["cy"] - anchor["cy"])),
            ("right of", lambda o: o["cx"] - anchor["cx"] > 1.2 * abs(o["cy"] - anchor["cy"])),
        ):
            matches = [i for i in idx if i != b and test(objects[i])]
            add_if_unique(f"the shape {rel} the {name}", matches)
    return found


def _choose_expressions(found: list[tuple[str, bool]], rng: np.random.Generator) -> list[str]:
    """2-3 expressions, the first one using colour/shape words whenever possible."""
    simple = [t for t, s in found if s]
    first = simple[rng.integers(len(simple))] if simple else found[rng.integers(len(found))][0]
    rest = [t for t, _ in found if t != first]
    k = min(len(rest), int(rng.integers(1, 3)))
    return [first] + [rest[i] for i in rng.choice(len(rest), size=k, replace=False)]


def _render(objects: list[dict], width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Plain or lightly textured light background, shapes filled in slightly jittered colours."""
    gray = rng.uniform(175, 240)
    background = np.clip(gray + rng.uniform(-12, 12, 3), 0, 255)
    pixels = np.broadcast_to(background, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.5:
        pixels = pixels + rng.normal(0, 5, (height, width, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for o in objects:
        color = np.clip(np.array(SYNTH_COLORS[o["color"]]) + rng.integers(-12, 13, 3), 0, 255)
        draw.polygon([tuple(p) for p in o["polygon"].tolist()], fill=tuple(int(c) for c in color))
    return image


def make_synth(out_dir: str, seed: int = 0, n_train: int = 600, n_val: int = 60,
               n_testA: int = 60, n_testB: int = 60) -> str:
    """Write the synthetic referring dataset under out_dir; returns out_dir (the DATA_ROOT).

    Byte-identical output for a given seed. Read it back with load_refs(out_dir, "synth", "unc").
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, "images", "train2014")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "synth"), exist_ok=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["testA"] * n_testA + ["testB"] * n_testB
    images, annotations, refs = [], [], []
    for image_id, split in enumerate(splits, start=1):
        while True:  # resample until every object can be referred to unambiguously
            width, height = (int(v) for v in rng.integers(160, 241, size=2))
            objects = _place_objects(rng, width, height)
            found = _synth_expressions(objects, width, height)
            if len(objects) >= 2 and all(found):
                break
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _render(objects, width, height, rng).save(os.path.join(image_dir, file_name), quality=90)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for o, expressions in zip(objects, found):
            ann_id, category_id = len(annotations) + 1, SYNTH_SHAPES.index(o["shape"]) + 1
            poly = np.round(o["polygon"], 2)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                "segmentation": [[float(v) for v in poly.reshape(-1)]],
                "area": round(_polygon_area(poly), 2),
                "bbox": [float(x0), float(y0), float(round(x1 - x0, 2)), float(round(y1 - y0, 2))]})
            first_sent = sum(len(r["sentences"]) for r in refs) + 1
            sentences = [{"tokens": t.split(), "raw": t, "sent_id": first_sent + k, "sent": t}
                         for k, t in enumerate(_choose_expressions(expressions, rng))]
            refs.append({"ref_id": len(refs) + 1, "ann_id": ann_id, "image_id": image_id,
                         "split": split, "sentences": sentences, "category_id": category_id,
                         "sent_ids": [s["sent_id"] for s in sentences],
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"}
                  for i, s in enumerate(SYNTH_SHAPES)]
    with open(os.path.join(out_dir, "synth", "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(os.path.join(out_dir, "synth", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python synth.py`, shared with `python data.py synth`."""
    parser.add_argument("--out", required=True, help="DATA_ROOT to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=600,
                        help="training images; val, testA and testB get a tenth of it each (min 1)")


def run(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise ValueError(f"--images {args.images}: must be >= 1")
    n_eval = max(1, args.images // 10)
    make_synth(args.out, seed=args.seed, n_train=args.images, n_val=n_eval, n_testA=n_eval, n_testB=n_eval)
    print(f"wrote synth dataset to {args.out}: data.load_refs({args.out!r}, 'synth', 'unc')")
    return 0


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:
        sys.exit(f"synth.py: error: {e}")
