"""The files RefCOCO, RefCOCO+ and G-Ref come as, read safely and checked: machinery beside data.py.

None of this is in the paper; data.py, which holds what is (the records' meaning, the training set,
the sampler), imports it, and this file imports no method file.

1. COCO masks: `decode_mask` turns COCO polygons and RLEs into binary masks, pixel for pixel
   identical to pycocotools (its polygon rasterizer is re-derived below in numpy), so ground truth
   and IoU match every other RIS codebase without a compiled dependency; `encode_mask` writes a mask
   as pycocotools' compressed RLE (own_data.py stores imported masks so).
2. The refer layout on disk: where a dataset's refs file and its COCO images lie (`has_refs`,
   `read_refs_file`, `find_image_dir`); fetch.py unpacks the downloads into this layout.
3. Untrusted files: the refs files are Python 2 pickles from the refer API, so they are unpickled
   into plain data only (`UnsafePickleError` for anything that could run code); JSON and every
   field data.py reads are checked (`check_fields`), so a bad file fails naming the file and the
   record instead of deep inside training.
4. Records: a refer record (`parse_ref`) and the COCO instances it points at (`read_instances`), validated
   field by field for data.load_refs; `check_ids_agree` for datasets trained together.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from typing import Sequence, Union

import numpy as np


# ---------------------------------------------------------------------------------------------
# 1. COCO masks
# ---------------------------------------------------------------------------------------------
# COCO stores a mask as run-length counts over the pixels in column-major order (x outer, y
# inner), starting with a run of zeros. Polygons are rasterized by pycocotools' rleFrPoly, whose
# exact pixel decisions we reproduce so that ground truth (and therefore IoU) matches every
# other RIS codebase bit for bit.

_POLY_UPSAMPLE = 5.0  # rleFrPoly walks the boundary on a 5x finer integer grid
# rleFrPoly holds fine-grid coordinates and their differences in C ints: beyond this its result is undefined
_POLY_MAX_COORD = 2e8


def _c_int(x: np.ndarray) -> np.ndarray:
    """C's `(int)double` cast: truncation toward zero."""
    return np.trunc(x).astype(np.int64)


def _polygon_toggles(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Column-major pixel positions where a polygon's mask switches value (pycocotools rleFrPoly).

    Args:
        xy: (2K,) float64, x0, y0, x1, y1, ... in pixel units (pixel centres at integers).
    Returns:
        (M,) int64 positions x * height + y in [0, height * width]; the mask at pixel p is the
        parity of the number of positions <= p.

    The algorithm, step by step as in maskApi.c:
      a) scale vertices by 5 and round (C cast: int(5v + 0.5));
      b) walk every edge on that fine grid, one point (u, v) per step along its major axis, the minor
         coordinate rounded the same way; an edge is always computed from its lower end (swapped
         if needed) so that a shared edge rounds identically in both directions;
      c) wherever the walk crosses a column boundary, record the y where the boundary enters;
         only crossings landing exactly on a pixel-centre column of the original grid count;
      d) those (x, y) points are where each column's mask toggles.

    pycocotools walks every edge in full, so a vertex at 1e7 costs 5e7 points. Only walk points near
    the image can change the result, and we generate just those (work in proportion to the image):
      - a crossing between fine columns a and a+1 counts only for a in [2, 5w-3], so a point whose u
        lies outside [2, 5w-2] is never part of a counted crossing; u moves by at most 1 per step, so
        the points left on either side of a dropped stretch share their u and make no crossing either;
      - a crossing's row is clipped to [0, h], which is what v clamped to [2, 5h+2] gives;
      - along a steep edge (v the major axis) the stretches above or below that band have one
        clamped v and a monotone u, so each is replaced by one point per fine column it crosses.
    Every point that is generated is computed with pycocotools' own formula, so the crossings, and
    the mask, are identical.
    """
    scale = _POLY_UPSAMPLE
    x = _c_int(scale * xy[0::2] + 0.5)
    y = _c_int(scale * xy[1::2] + 0.5)
    x = np.append(x, x[0])  # close the polygon
    y = np.append(y, y[0])
    u_lo, u_hi = 2, int(scale) * width - 2  # fine columns whose crossings can count
    v_lo, v_hi = 2, int(scale) * height + 2  # fine rows beyond these land on row 0 / height

    # b) every edge from its lower end: start (xs, ys), steps, slope of the minor axis
    xs, xe, ys, ye = x[:-1], x[1:], y[:-1], y[1:]
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    major_x = dx >= dy
    flip = (major_x & (xs > xe)) | (~major_x & (ys > ye))
    xs, xe = np.where(flip, xe, xs), np.where(flip, xs, xe)
    ys, ye = np.where(flip, ye, ys), np.where(flip, ys, ye)
    steps = np.maximum(dx, dy)
    # A zero-length edge (repeated vertex) gives 0/0 in C; its single point never starts a column
    # crossing (its neighbours share its x), so any finite slope reproduces the result.
    slope = np.where(major_x, ye - ys, xe - xs) / np.maximum(steps, 1)
    major0, minor0 = np.where(major_x, xs, ys), np.where(major_x, ys, xs)

    def minor_at(edge, t):  # rleFrPoly's rounding of the minor coordinate at step t
        return _c_int((minor0[edge] + slope[edge] * t) + 0.5)

    # The steps t of each edge walked point by point: where u (major x) or v (major y) is in range.
    t_lo = np.clip(np.where(major_x, u_lo, v_lo) - major0, 0, steps + 1)
    t_hi = np.clip(np.where(major_x, u_hi, v_hi) - major0, -1, steps)
    # The stretches of a steep edge below (t < t_lo) and above (t > t_hi) the band of rows, as runs of
    # fine columns: u at both ends of the stretch, clipped to [u_lo, u_hi].
    edges = np.arange(len(steps))
    below = (np.zeros_like(t_lo), t_lo - 1)
    above = (t_hi + 1, steps)
    runs = []
    for (ta, tb), v in ((below, v_lo), (above, v_hi)):
        present = ~major_x & (ta <= tb)
        ua = minor_at(edges, np.where(present, ta, 0))
        ub = minor_at(edges, np.where(present, tb, 0))
        first = np.maximum(np.minimum(ua, ub), u_lo)
        count = np.where(present, np.minimum(np.maximum(ua, ub), u_hi) - first + 1, 0).clip(0)
        runs.append((first, count, (ub >= ua) != flip, v))  # ascending: u grows in walk order

    # Segments in walk order, three per edge (below, walked, above; reversed when the walk runs from
    # the far end): each is a count of points and a rule for point k.
    walked = np.maximum(t_hi - t_lo + 1, 0)
    counts = np.stack([runs[0][1], walked, runs[1][1]], 1)  # (E, 3) in t order
    order = np.where(flip[:, None], [2, 1, 0], [0, 1, 2])
    counts = np.take_along_axis(counts, order, 1).reshape(-1)
    part = order.reshape(-1)  # which of below / walked / above each segment is
    seg = np.repeat(np.arange(len(counts)), counts)  # (P,) segment of every point
    edge, kind = seg // 3, part[seg]
    k = np.arange(len(seg)) - (np.cumsum(counts) - counts)[seg]  # index within its segment

    t = np.where(flip[edge], t_hi[edge] - k, t_lo[edge] + k)  # walked points
    minor = minor_at(edge, t)
    u = np.where(major_x[edge], t + xs[edge], minor)
    v = np.where(major_x[edge], minor, t + ys[edge])
    for i, (first, count, ascending, v_run) in ((0, runs[0]), (2, runs[1])):
        in_run = kind == i
        run_u = np.where(ascending[edge], first[edge] + k, first[edge] + count[edge] - 1 - k)
        u = np.where(in_run, run_u, u)
        v = np.where(in_run, v_run, v)
    keep = (u >= u_lo) & (u <= u_hi)
    u, v = u[keep], np.clip(v[keep], v_lo, v_hi)

    # c) column crossings, mapped back to the original grid
    j = np.nonzero(u[1:] != u[:-1])[0] + 1
    xd = np.where(u[j] < u[j - 1], u[j], u[j] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.minimum(v[j], v[j - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, height))
    return xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64)


def _polygons_to_mask(parts: Sequence, height: int, width: int) -> np.ndarray:
    """Union of polygon parts (COCO `[[x0, y0, x1, y1, ...], ...]`) -> (H, W) uint8."""
    if not parts:
        raise ValueError("empty polygon list (no parts)")
    toggles = np.zeros(height * width + 1, np.int64)
    union = np.zeros(height * width, bool)
    for i, part in enumerate(parts):
        try:
            xy = np.asarray(part, dtype=np.float64)
        except (TypeError, ValueError):
            xy = np.empty(0)
        if xy.ndim != 1 or len(xy) < 2 or not np.isfinite(xy).all():
            raise ValueError(f"polygon part {i} must be a flat list of finite x, y numbers, "
                             f"got {str(part)[:60]}")
        if np.abs(xy).max() > _POLY_MAX_COORD:
            raise ValueError(f"polygon part {i} has a coordinate beyond ±2e8 ({np.abs(xy).max():g}); "
                             "COCO polygons are in pixels")
        # pycocotools reads int(len / 2) vertices: an odd trailing number is ignored
        positions = _polygon_toggles(xy[: len(xy) // 2 * 2], height, width)
        toggles[:] = 0
        np.add.at(toggles, positions, 1)
        union |= (np.cumsum(toggles[:-1]) % 2).astype(bool)
    return union.reshape(width, height).T.astype(np.uint8)  # column-major -> (H, W)


def _rle_string_to_counts(s: Union[str, bytes]) -> list[int]:
    """COCO compressed RLE string -> run lengths (maskApi.c rleFrString).

    Each count is written in 5-bit groups, least significant first, one character (chr(48 + g))
    per group; bit 0x20 says another group follows and bit 0x10 of the last group is the sign.
    From the fourth count on, the value stored is the difference to the count two places back.
    """
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("compressed RLE string ends in the middle of a count")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE string has an invalid character {chr(data[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x & 0xFFFFFFFF)  # C stores counts as uint32
    return counts


def _rle_counts_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Alternating run lengths (zeros first, column-major) -> (H, W) uint8."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any():
        raise ValueError("RLE counts must be a flat list of non-negative integers")
    if runs.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(runs.sum())}, expected height*width = "
                         f"{height}*{width} = {height * width}")
    values = np.arange(len(runs)) % 2  # 0, 1, 0, 1, ...
    flat = np.repeat(values.astype(np.uint8), runs)
    return flat.reshape(width, height).T.copy()


def _counts_to_rle_string(counts: np.ndarray) -> str:
    """Run lengths -> COCO compressed RLE string (maskApi.c rleToString), the inverse of _rle_string_to_counts,
    for all counts at once: each count (from the fourth on, its difference to the count two places back) is cut
    into 5-bit groups, least significant first, until the rest is all sign; bit 0x20 marks "another group follows"."""
    x = counts.astype(np.int64)
    x[3:] -= counts[1:-2]
    chars = np.zeros((len(x), 8), np.uint8)  # a 32-bit count with its sign needs at most 7 groups
    groups = np.zeros(len(x), np.int64)
    writing = np.ones(len(x), bool)
    for k in range(chars.shape[1]):
        c = x & 0x1F
        x >>= 5  # arithmetic shift: a negative difference keeps its sign
        more = np.where(c & 0x10 != 0, x != -1, x != 0)
        chars[:, k] = 48 + c + 0x20 * more
        groups += writing
        writing &= more
        if not writing.any():  # most counts fit in two or three groups
            break
    return chars[np.arange(chars.shape[1]) < groups[:, None]].tobytes().decode("ascii")


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) mask (non-zero = object) -> compressed RLE {"size": [H, W], "counts": str}, the string
    pycocotools.mask.encode writes; decode_mask reads it back pixel for pixel."""
    height, width = mask.shape
    flat = np.asarray(mask).T.reshape(-1) != 0  # column-major, as COCO counts
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat.size and flat[0]:  # counts start with a run of zeros, here an empty one
        runs = np.concatenate([[0], runs])
    return {"size": [height, width], "counts": _counts_to_rle_string(runs)}


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation into a binary mask, exactly as pycocotools does.

    Args:
        segmentation: one of
            - polygons: a list of parts `[[x0, y0, x1, y1, ...], ...]` (their union is the mask,
              like COCO.annToMask);
            - uncompressed RLE `{"counts": [int, ...], "size": [h, w]}` (iscrowd annotations);
            - compressed RLE `{"counts": "string" or b"bytes", "size": [h, w]}`.
        height, width: image size; an RLE's own "size" must agree with it.
    Returns:
        (height, width) uint8 array of {0, 1}.
    Raises:
        ValueError naming what is malformed.

    One deliberate difference: pycocotools treats a polygon list whose *first* part has exactly
    four numbers as bounding boxes; here every part is a polygon.
    """
    if isinstance(segmentation, list):
        return _polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) for v in size)):
            raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
        if tuple(size) != (height, width):
            raise ValueError(f"RLE size {list(size)} differs from the image size "
                             f"[{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            counts = _rle_string_to_counts(counts)
        elif not isinstance(counts, list):
            raise ValueError("RLE 'counts' must be a list or a string, got "
                             f"{type(counts).__name__}")
        return _rle_counts_to_mask(counts, height, width)
    raise ValueError("segmentation must be a list of polygons or a dict with 'counts' and 'size', "
                     f"got {type(segmentation).__name__}")


# ---------------------------------------------------------------------------------------------
# 2. The refer layout on disk
# ---------------------------------------------------------------------------------------------
# DATA_ROOT/<dataset>/refs(<split_by>).p (or .json) and instances.json; COCO train2014 images in the
# first of these folders that exists (else DATA_ROOT/<dataset>/images/). data.load_refs reads this
# layout, fetch.download_refer fills it.

IMAGE_DIR_CANDIDATES = (
    ("images", "train2014"),
    ("images", "mscoco", "images", "train2014"),  # the refer API's own layout
)


def find_image_dir(data_root: str, dataset: str, info=None) -> str:
    """First existing image folder among the documented layouts (the first one if none exists).

    A set written by own_data.py names its own folder in instances.json's info ({"image_dir": "images"},
    relative to DATA_ROOT/<dataset>): its images are found there even where DATA_ROOT holds COCO's."""
    if isinstance(info, dict) and "image_dir" in info:
        name = info["image_dir"]
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"{os.path.join(data_root, dataset, 'instances.json')}: info.image_dir {name!r} must "
                             f"be a folder inside {os.path.join(data_root, dataset)}")
        return os.path.join(data_root, dataset, name)
    candidates = [os.path.join(data_root, *parts) for parts in IMAGE_DIR_CANDIDATES]
    candidates.append(os.path.join(data_root, dataset, "images"))
    return next((c for c in candidates if os.path.isdir(c)), candidates[0])


def has_refs(data_root: str, dataset: str, split_by: str) -> bool:
    """Whether DATA_ROOT/<dataset>/refs(<split_by>).json or .p exists."""
    return any(os.path.isfile(os.path.join(data_root, dataset, f"refs({split_by}).{ext}")) for ext in ("json", "p"))


def split_schemes(data_root: str, dataset: str) -> list[str]:
    """The split_by of every refs(<split_by>).json or .p in DATA_ROOT/<dataset>, sorted."""
    folder = os.path.join(data_root, dataset)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted({m.group(1) for m in map(re.compile(r"refs\((.+)\)\.(?:json|p)$").match, names) if m})


def only_split_by(data_root: str, dataset: str) -> str:
    """The split scheme of a dataset without a default one (an imported set: own_data.py), when its folder holds
    exactly one; ValueError otherwise."""
    schemes = split_schemes(data_root, dataset)
    if len(schemes) != 1:
        held = f"refs files of {', '.join(schemes)}" if schemes else "no refs(SPLIT_BY).json or .p file"
        raise ValueError(f"no default split for '{dataset}' and {os.path.join(data_root, dataset)} holds "
                         f"{held}; write it as {dataset}:SPLIT_BY")
    return schemes[0]


def read_refs_file(data_root: str, dataset: str, split_by: str) -> tuple[list, str]:
    """Raw ref records from refs(<split_by>).json (preferred: no unpickling) or .p."""
    folder = os.path.join(data_root, dataset)
    json_path = os.path.join(folder, f"refs({split_by}).json")
    pickle_path = os.path.join(folder, f"refs({split_by}).p")
    if os.path.isfile(json_path):
        path, records = json_path, load_json(json_path)
    elif os.path.isfile(pickle_path):
        path, records = pickle_path, _load_plain_pickle(pickle_path)
    else:
        raise FileNotFoundError(f"no refs file for {dataset} ({split_by}): looked for "
                                f"{pickle_path} and {json_path}")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of ref records, got {type(records).__name__}")
    return records, path


# ---------------------------------------------------------------------------------------------
# 3. Untrusted files: plain-data pickles, JSON, field checks
# ---------------------------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A refs pickle asked for a class or function: refused, nothing from it was run."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for untrusted files: builds dicts, lists, tuples, strings and numbers only.

    Everything that could run code in a pickle goes through `find_class` (GLOBAL, STACK_GLOBAL,
    and the copyreg EXT opcodes), so refusing every class refuses every callable, REDUCE included.
    """

    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module, name):
        raise UnsafePickleError(
            f"{self.path}: refusing to load '{module}.{name}': refs files must contain plain data "
            "only (dict, list, tuple, str, numbers); convert it to JSON if it holds anything else")


def _load_plain_pickle(path: str):
    """Load a (possibly Python 2) pickle of plain data without ever executing code from it.

    Python 2 `str` objects arrive as bytes; they are decoded as UTF-8 and, if that fails, as
    Latin-1 (which accepts every byte sequence).
    """
    with open(path, "rb") as f:
        raw = f.read()
    for encoding in ("utf-8", "latin1"):
        try:
            return _PlainDataUnpickler(io.BytesIO(raw), path, encoding).load()
        except UnicodeDecodeError:
            continue
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated, not a pickle at all, persistent ids, ...
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    raise ValueError(f"{path}: cannot decode the strings in this pickle")


def load_json(path: str):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:  # a crafted file nested thousands deep
        raise ValueError(f"{path}: not valid JSON (nested too deeply to read)") from None


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(record, fields: dict, where: str) -> None:
    """ValueError naming `where` unless `record` is a dict with `fields` of the given types."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    for key, kind in fields.items():
        if key not in record:
            raise ValueError(f"{where}: missing field '{key}'")
        value = record[key]
        ok = is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            raise ValueError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, "
                             f"got {type(value).__name__}")


def check_ids_agree(datas: Sequence) -> None:
    """Datasets trained together must mean one image by one image id and one object by one ann_id: records are
    merged, held out (§4.2), contrasted (ICL, §3.3) and cached (--cache-sam) by id. COCO's sets agree by
    construction, imported sets live far above COCO's ids (own_data.id_offset); ValueError when two disagree."""
    seen = {"image ids": {}, "annotation ids": {}}
    for d in datas:
        for ids, records, what in (("image ids", d.images, "file_name"), ("annotation ids", d.anns, "image_id")):
            for key, record in records.items():  # an image is its file, an annotation lies on its image
                first = seen[ids].setdefault(key, (record[what], d.dataset))
                if first[0] != record[what]:
                    raise ValueError(f"{ids[:-1]} {key} has {what} {first[0]} in {first[1]} but {record[what]} in "
                                     f"{d.dataset}: datasets trained together must not share {ids}; import one of "
                                     "them again under another --name")


REF_FIELDS = {"ref_id": int, "ann_id": int, "image_id": int, "category_id": int, "split": str,
               "sentences": list}


def parse_ref(record, path: str, index: int) -> dict:
    """Validate one refer-API record and return our compact copy of it."""
    where = f"{path}: record {index}"
    if isinstance(record, dict) and is_int(record.get("ref_id")):
        where += f" (ref_id {record['ref_id']})"
    check_fields(record, REF_FIELDS, where)
    sentences, sent_ids = [], []
    for j, s in enumerate(record["sentences"]):
        texts = (s.get("sent"), s.get("raw")) if isinstance(s, dict) else ()
        text = next((t.strip() for t in texts if isinstance(t, str) and t.strip()), None)
        if text is None:
            raise ValueError(f"{where}: sentence {j} needs a non-empty string 'sent' or 'raw'")
        sentences.append(text)
        sent_ids.append(s["sent_id"] if is_int(s.get("sent_id")) else None)  # None: hand-made records
    if not sentences:
        raise ValueError(f"{where}: no sentences")
    return {k: record[k] for k in ("ref_id", "ann_id", "image_id", "category_id", "split")} | {
        "sentences": sentences, "sent_ids": sent_ids}


def read_instances(data_root: str, dataset: str, refs: list) -> tuple[str, dict, dict, dict]:
    """(path, anns, images, categories) of DATA_ROOT/<dataset>/instances.json: the annotations and images the
    validated `refs` point at, each checked field by field, and every category (data.RefData holds them)."""
    instances_path = os.path.join(data_root, dataset, "instances.json")
    if not os.path.isfile(instances_path):
        raise FileNotFoundError(f"missing {instances_path} (COCO instances for {dataset})")
    instances = load_json(instances_path)
    check_fields(instances, {"images": list, "annotations": list}, instances_path)

    wanted_anns = {r["ann_id"] for r in refs}
    anns = {}
    for i, a in enumerate(instances["annotations"]):
        if isinstance(a, dict) and a.get("id") in wanted_anns:
            check_fields(a, {"id": int, "image_id": int, "category_id": int,
                              "segmentation": (list, dict)},
                          f"{instances_path}: annotations[{i}] (id {a['id']})")
            anns[a["id"]] = {k: a[k] for k in ("id", "image_id", "category_id", "segmentation")}
            anns[a["id"]]["source"] = instances_path

    image_dir = find_image_dir(data_root, dataset, instances.get("info"))  # an imported set names its own
    wanted_images = {r["image_id"] for r in refs}
    images = {}
    for i, im in enumerate(instances["images"]):
        if isinstance(im, dict) and im.get("id") in wanted_images:
            check_fields(im, {"id": int, "file_name": str, "height": int, "width": int},
                          f"{instances_path}: images[{i}] (id {im['id']})")
            name = im["file_name"]
            if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):  # would open any file
                raise ValueError(f"{instances_path}: images[{i}] (id {im['id']}): file_name '{name}' is absolute "
                                 f"or contains '..'; image names are relative to the image folder {image_dir} "
                                 "(e.g. COCO_train2014_000000000009.jpg): fix the entry")
            images[im["id"]] = {k: im[k] for k in ("id", "file_name", "height", "width")}
            images[im["id"]]["path"] = os.path.join(image_dir, im["file_name"])

    categories = {}
    for i, c in enumerate(instances.get("categories", [])):
        check_fields(c, {"id": int, "name": str}, f"{instances_path}: categories[{i}]")
        categories[c["id"]] = c["name"]

    return instances_path, anns, images, categories
