"""data.py and coco.py: COCO mask decoding (vs pycocotools), refer-format reading, instance-contrastive
sampling, letterbox geometry, the batch dict, the stats CLI and the synthetic dataset."""
import json
import logging
import os
import pickle
import re
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coco
import data
import synth as synthetic
from clip_vit import Tokenizer
from sam import resize_longest_side_shape

# pycocotools 2.0.11 warns about numpy 2's copy keyword on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLIP_SIZE, SAM_SIZE = 64, 128  # small frames keep the tests fast; geometry is size-independent


class CharTokenizer:
    """Stand-in with the Tokenizer call signature: one id per character, 0-padded."""

    def __call__(self, texts, context_length=77):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + [ord(c) for c in t][: context_length - 2] + [2]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synthetic.make_synth(str(tmp_path_factory.mktemp("synth")), seed=3, n_train=12, n_val=4,
                           n_testA=3, n_testB=3)


@pytest.fixture(scope="module")
def synth(synth_root):
    return data.load_refs(synth_root, "synth", "unc")


def train_set(refs_data, **kw):
    kw = {"clip_size": CLIP_SIZE, "sam_size": SAM_SIZE, **kw}
    return data.RefTrainSet(refs_data, CharTokenizer(), **kw)


# ---- COCO masks vs pycocotools ------------------------------------------------------------------


def random_polygons(rng, h, w, kind):
    """Polygon parts of one kind: the cases where a rasterizer's rounding decisions show."""
    parts = []
    for _ in range(rng.integers(1, 4)):  # multi-part
        k = int(rng.integers(3, 14))
        if kind == "concave":  # star-like, vertices at alternating radii
            a = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.2, 0.5, k) * min(h, w) * np.where(np.arange(k) % 2, 0.4, 1.0)
            xy = np.stack([w / 2 + rad * np.cos(a), h / 2 + rad * np.sin(a)], 1).reshape(-1)
        elif kind == "border":  # touching and crossing the image border
            xy = rng.uniform(-4, max(h, w) + 4, 2 * k)
        elif kind == "repeated":  # repeated vertices: zero-length edges
            xy = np.repeat(rng.integers(0, max(h, w), (k, 2)), rng.integers(1, 3, k), 0)
            xy = xy.reshape(-1).astype(float)
        elif kind == "integer":
            xy = rng.integers(0, max(h, w), 2 * k).astype(float)
        elif kind == "half":  # on the x.5 / x.1 boundaries of the 5x grid
            xy = rng.integers(0, 10 * max(h, w), 2 * k) / 10.0
        else:  # tiny: sub-pixel to a few pixels
            xy = rng.uniform(0, 2.5, 2 * k) + rng.uniform(0, max(h, w) - 3)
        parts.append([float(v) for v in xy])
    return parts


POLYGON_KINDS = ["concave", "border", "repeated", "integer", "half", "tiny"]


@pytest.mark.parametrize("kind", POLYGON_KINDS)
def test_decode_polygons_equal_pycocotools(kind):
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(POLYGON_KINDS.index(kind))
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        parts = random_polygons(rng, h, w, kind)
        expected = mask_api.decode(mask_api.merge(mask_api.frPyObjects(parts, h, w)))
        np.testing.assert_array_equal(coco.decode_mask(parts, h, w), expected,
                                      err_msg=f"trial {trial} {h}x{w}")


def test_decode_large_polygon_equals_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(7)
    h, w = 480, 640
    a = np.sort(rng.uniform(0, 2 * np.pi, 300))
    rad = rng.uniform(50, 230, 300)
    part = np.stack([320 + rad * np.cos(a), 240 + rad * np.sin(a)], 1).reshape(-1).tolist()
    expected = mask_api.decode(mask_api.merge(mask_api.frPyObjects([part], h, w)))
    np.testing.assert_array_equal(coco.decode_mask([part], h, w), expected)


def test_decode_polygons_reaching_far_outside_the_image_equal_pycocotools():
    """Vertices thousands of image sizes away (every slope, edges crossing the image or passing it):
    only the part near the image is rasterized, and the pixels are pycocotools' own."""
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(11)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        far = float(rng.choice([1e2, 1e3, 3e4]))
        parts = []
        for _ in range(rng.integers(1, 3)):
            k = int(rng.integers(3, 8))
            xy = np.where(rng.random(2 * k) < 0.5, rng.uniform(-far, far, 2 * k), rng.uniform(-2, 42, 2 * k))
            parts.append(xy.tolist())
        expected = mask_api.decode(mask_api.merge(mask_api.frPyObjects(parts, h, w)))
        np.testing.assert_array_equal(coco.decode_mask(parts, h, w), expected,
                                      err_msg=f"trial {trial} {h}x{w} {parts}")


def test_decode_polygon_with_huge_coordinates_stays_small():
    """A polygon with vertices near 1e7 once walked 5e7 points per edge (gigabytes): the work and memory
    are now in proportion to the image."""
    import tracemalloc
    triangle = [-1e7, -0.75e7, 1e7, 0.75e7, 1e7, -1e7]  # the half-plane y < 0.75 x, in the 60 x 80 image
    box = [-1e7, -1e7, 1e7, -1e7, 1e7, 1e7, -1e7, 1e7]
    tracemalloc.start()
    try:
        masks = [coco.decode_mask([p], 60, 80) for p in (triangle, box)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000
    assert masks[1].all()
    y, x = np.mgrid[:60, :80]
    away = np.abs(y - 0.75 * x) > 1  # pixels clear of the diagonal edge
    np.testing.assert_array_equal(masks[0][away], (y < 0.75 * x)[away])


def test_decode_polygon_beyond_pycocotools_int_range_is_refused():
    with pytest.raises(ValueError, match=r"polygon part 0 has a coordinate beyond ±2e8 \(1e\+30\)"):
        coco.decode_mask([[0.0, 0.0, 1e30, 0.0, 5.0, 5.0]], 10, 10)


def test_decode_uncompressed_rle_equals_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        flat = np.concatenate([[0], m.T.reshape(-1)])  # column-major, starting with zeros
        edges = np.flatnonzero(np.diff(flat)) + 1
        counts = np.diff(np.concatenate([[1], edges, [h * w + 1]])).tolist()  # iscrowd-style
        rle = {"counts": counts, "size": [h, w]}
        expected = mask_api.decode(mask_api.frPyObjects(rle, h, w))
        np.testing.assert_array_equal(coco.decode_mask(rle, h, w), expected)
        np.testing.assert_array_equal(expected, m)


def test_decode_compressed_rle_equals_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(2)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        m = (rng.random((h, w)) < rng.random() ** 3).astype(np.uint8)  # long and short runs
        rle = mask_api.encode(np.asfortranarray(m))
        np.testing.assert_array_equal(coco.decode_mask(rle, h, w), m)  # bytes counts
        as_json = {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}
        np.testing.assert_array_equal(coco.decode_mask(as_json, h, w), m)  # str counts


@pytest.mark.parametrize("segmentation, message", [
    ({"counts": [3, 2], "size": [2, 2]}, "sum to 5"),
    ({"counts": [4], "size": [3, 2]}, "differs from the image size"),
    ({"counts": "0\x7f", "size": [2, 2]}, "invalid character"),
    ([[0.0, "a", 1.0]], "polygon part 0"),
    ([], "empty polygon list"),
    ("not a mask", "segmentation must be"),
])
def test_decode_mask_rejects_malformed_input(segmentation, message):
    with pytest.raises(ValueError, match=message):
        coco.decode_mask(segmentation, 2, 2)


# ---- refer records ------------------------------------------------------------------------------


def write_tree(root, refs, instances, fmt="p", dataset="refcoco", split_by="unc"):
    folder = os.path.join(root, dataset)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump(instances, f)
    path = os.path.join(folder, f"refs({split_by}).{'p' if fmt == 'p' else 'json'}")
    with open(path, "wb" if fmt == "p" else "w") as f:
        pickle.dump(refs, f, protocol=2) if fmt == "p" else json.dump(refs, f)
    return path


def tiny_records():
    """Two images, three refs, in the refer API's exact field layout."""
    sq = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 20, "width": 30}
                   for i in (9, 7)],
        "annotations": [{"id": 100, "image_id": 9, "category_id": 1, "segmentation": sq},
                        {"id": 101, "image_id": 9, "category_id": 18, "segmentation": sq},
                        {"id": 102, "image_id": 7, "category_id": 1, "segmentation": sq}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}

    def ref(ref_id, ann_id, image_id, cat, split, sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": cat,
                "split": split, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sent_ids": list(range(len(sents))),
                "sentences": [{"tokens": s.split(), "raw": s.upper(), "sent_id": i, "sent": s}
                              for i, s in enumerate(sents)]}
    refs = [ref(0, 100, 9, 1, "train", ["man left", "guy in red"]),
            ref(1, 101, 9, 18, "train", ["dog"]),
            ref(2, 102, 7, 1, "val", ["woman"])]
    return refs, instances


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: str as SHORT_BINSTRING bytes, not unicode."""
    def emit(o):
        if isinstance(o, list):
            return b"]" + b"".join(emit(v) + b"a" for v in o)
        if isinstance(o, dict):
            return b"}" + b"".join(emit(k) + emit(v) + b"s" for k, v in o.items())
        if isinstance(o, str):
            raw = o.encode("utf-8")
            return b"U" + bytes([len(raw)]) + raw
        return b"J" + struct.pack("<i", o)
    return b"\x80\x02" + emit(obj) + b"."


def test_pickle_and_json_give_the_same_records(tmp_path):
    refs, instances = tiny_records()
    write_tree(str(tmp_path / "p"), refs, instances, "p")
    write_tree(str(tmp_path / "j"), refs, instances, "json")
    from_pickle = data.load_refs(str(tmp_path / "p"), "refcoco", "unc")
    from_json = data.load_refs(str(tmp_path / "j"), "refcoco", "unc")
    assert from_pickle.refs == from_json.refs
    assert from_pickle.refs[0]["sentences"] == ["man left", "guy in red"]  # 'sent', not 'raw'
    assert set(from_pickle.anns) == {100, 101, 102} and from_pickle.categories[18] == "dog"
    assert from_pickle.images[9]["path"].endswith(
        os.path.join("images", "train2014", "COCO_train2014_000000000009.jpg"))


def test_python2_pickle_with_byte_strings_loads(tmp_path):
    refs, instances = tiny_records()
    refs[0]["sentences"][0]["sent"] = "man in caf\u00e9"
    path = write_tree(str(tmp_path), refs, instances)
    with open(path, "wb") as f:
        f.write(py2_pickle(refs))
    loaded = data.load_refs(str(tmp_path), "refcoco", "unc")
    assert loaded.refs[0]["sentences"][0] == "man in caf\u00e9"


def test_refer_api_image_layout_is_found(tmp_path):
    refs, instances = tiny_records()
    write_tree(str(tmp_path), refs, instances)
    os.makedirs(tmp_path / "images" / "mscoco" / "images" / "train2014")
    loaded = data.load_refs(str(tmp_path), "refcoco", "unc")
    assert os.path.join("mscoco", "images", "train2014") in loaded.images[9]["path"]


@pytest.mark.parametrize("fmt", ["p", "json"])
@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.pop("ann_id"), r"record 1 \(ref_id 1\): missing field 'ann_id'"),
    (lambda r: r.update(image_id="9"), r"record 1 \(ref_id 1\): field 'image_id' should be int"),
    (lambda r: r.update(sentences=[{"tokens": []}]), r"record 1 \(ref_id 1\): sentence 0"),
    (lambda r: r.update(ann_id=999), r"record 1 \(ref_id 1\): ann_id 999 is not in"),
])
def test_malformed_record_error_names_file_and_record(tmp_path, fmt, breakage, message):
    refs, instances = tiny_records()
    breakage(refs[1])
    path = write_tree(str(tmp_path), refs, instances, fmt)
    with pytest.raises(ValueError, match=message) as info:
        data.load_refs(str(tmp_path), "refcoco", "unc")
    assert path in str(info.value)


def test_malformed_annotation_error_names_instances_file(tmp_path):
    refs, instances = tiny_records()
    del instances["annotations"][1]["segmentation"]
    write_tree(str(tmp_path), refs, instances)
    with pytest.raises(ValueError, match=r"instances.json: annotations\[1\] \(id 101\): missing "
                                         r"field 'segmentation'"):
        data.load_refs(str(tmp_path), "refcoco", "unc")


def test_truncated_pickle_error_names_the_file(tmp_path):
    refs, instances = tiny_records()
    path = write_tree(str(tmp_path), refs, instances)
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="not a readable pickle") as info:
        data.load_refs(str(tmp_path), "refcoco", "unc")
    assert path in str(info.value)


def test_missing_refs_file_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        data.load_refs(str(tmp_path), "refcocog", "umd")


class WritesMarker:
    """A pickle payload that creates a file when unpickled by plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    refs, instances = tiny_records()
    marker = str(tmp_path / "pwned")
    refs[0]["sentences"][0]["sent"] = WritesMarker(marker)
    path = write_tree(str(tmp_path), refs, instances)
    refused = r"refusing to load '(io|builtins)\.open'"
    with pytest.raises(coco.UnsafePickleError, match=refused) as info:
        data.load_refs(str(tmp_path), "refcoco", "unc")
    assert path in str(info.value)
    assert not os.path.exists(marker)
    with open(path, "rb") as f:  # the payload is live: plain pickle would have run it
        pickle.load(f)
    assert os.path.exists(marker)


def test_combined_training_set_drops_every_eval_image(tmp_path):
    refs, instances = tiny_records()
    write_tree(str(tmp_path / "a"), refs, instances)
    a = data.load_refs(str(tmp_path / "a"), "refcoco", "unc")
    other = [dict(r, split="train") for r in refs]  # image 7 is val in `a` but train here
    other[0] = dict(other[0], split="test")  # and image 9 is test here
    write_tree(str(tmp_path / "b"), other, instances, dataset="refcocog", split_by="umd")
    b = data.load_refs(str(tmp_path / "b"), "refcocog", "umd")
    assert {r["image_id"] for r in data.combine_for_training([a]).refs} == {9}
    assert data.combine_for_training([a, b]).refs == []
    # a partition that is only held out (G-Ref google next to umd) removes its eval images too
    assert data.combine_for_training([a], held_out_from=[b]).refs == []


def test_hold_out_counts_each_removed_image_under_its_first_reason(tmp_path):
    refs, instances = tiny_records()  # train: image 9 (refs 0, 1); val: image 7
    write_tree(str(tmp_path), refs, instances)
    a = data.load_refs(str(tmp_path), "refcoco", "unc")
    assert data.eval_image_ids(a) == {7}
    counts = data.hold_out_counts(a, [("own val/test", data.eval_image_ids(a)), ("partition", {9}), ("again", {9})])
    assert counts == {"images": 1, "refs": 2, "removed": {"own val/test": {"images": 0, "refs": 0},
                                                          "partition": {"images": 1, "refs": 2},
                                                          "again": {"images": 0, "refs": 0}},
                      "kept": {"images": 0, "refs": 0}}


def test_the_same_refs_given_twice_are_kept_once(tmp_path):
    """A partition given twice: combined, each sentence counts once."""
    refs, instances = tiny_records()
    write_tree(str(tmp_path), refs, instances, dataset="refcocog", split_by="umd")
    write_tree(str(tmp_path), refs, instances, dataset="refcocog", split_by="google")
    umd, google = (data.load_refs(str(tmp_path), "refcocog", s) for s in ("umd", "google"))
    assert [r["ref_id"] for r in data.combine_for_training([umd, google]).refs] == [0, 1]


def test_umd_and_google_copies_of_an_object_are_kept_once(tmp_path, caplog):
    """G-Ref's two partitions split the same expressions: the same ann_id and sent_ids under other ref_ids.
    Combined, each object counts once (and the log says how many were dropped)."""
    refs, instances = tiny_records()
    google = [dict(r, ref_id=r["ref_id"] + 50) for r in refs]  # the google partition numbers its refs anew
    write_tree(str(tmp_path), refs, instances, dataset="refcocog", split_by="umd")
    write_tree(str(tmp_path), google, instances, dataset="refcocog", split_by="google")
    umd, google = (data.load_refs(str(tmp_path), "refcocog", s) for s in ("umd", "google"))
    with caplog.at_level(logging.INFO, logger="data"):
        combined = data.combine_for_training([umd, google])
    assert [r["ref_id"] for r in combined.refs] == [0, 1]
    assert "2 refs" in caplog.text and "refcocog" in caplog.text


def test_refcoco_and_refcoco_plus_of_one_object_both_stay(tmp_path):
    """RefCOCO and RefCOCO+ describe the same objects on purpose: never merged, even with equal sent_ids."""
    refs, instances = tiny_records()
    write_tree(str(tmp_path), refs, instances, dataset="refcoco")
    write_tree(str(tmp_path), refs, instances, dataset="refcoco+")
    datas = [data.load_refs(str(tmp_path), name, "unc") for name in ("refcoco", "refcoco+")]
    combined = data.combine_for_training(datas)
    assert [r["ann_id"] for r in combined.refs] == [100, 101, 100, 101]


def test_sentences_without_sent_id_are_matched_by_their_text(tmp_path):
    """Records without sent_ids (hand-made files): a partition's copy of a ref is recognised by its
    sentences' text instead; another text for the same object is a new expression and stays."""
    refs, instances = tiny_records()
    for r in refs:
        for s in r["sentences"]:
            del s["sent_id"]
    other = [dict(r, ref_id=r["ref_id"] + 50) for r in refs]
    other[1] = dict(other[1], sentences=[{"sent": "the brown dog"}])
    write_tree(str(tmp_path), refs, instances, dataset="refcocog", split_by="umd")
    write_tree(str(tmp_path), other, instances, dataset="refcocog", split_by="google")
    umd, google = (data.load_refs(str(tmp_path), "refcocog", s) for s in ("umd", "google"))
    assert [r["ref_id"] for r in data.combine_for_training([umd, google]).refs] == [0, 1, 51]


@pytest.mark.parametrize("file_name", ["/etc/passwd", "../../secret.jpg", "train2014/../../x.jpg"])
def test_an_image_file_name_leaving_the_image_folder_is_refused(tmp_path, file_name):
    refs, instances = tiny_records()
    instances["images"][1]["file_name"] = file_name  # image 7
    write_tree(str(tmp_path), refs, instances)
    with pytest.raises(ValueError, match=rf"instances.json: images\[1\] \(id 7\): file_name '{re.escape(file_name)}' "
                                         "is absolute or contains '..'"):
        data.load_refs(str(tmp_path), "refcoco", "unc")


def test_empty_sent_falls_back_to_raw(tmp_path):
    refs, instances = tiny_records()
    refs[0]["sentences"][0]["sent"] = ""
    write_tree(str(tmp_path), refs, instances)
    assert data.load_refs(str(tmp_path), "refcoco", "unc").refs[0]["sentences"][0] == "MAN LEFT"


# OVR-CNN's own lists (github.com/alirezazareian/ovr-cnn: mscoco_seen_classes.json without "background",
# mscoco_unseen_classes.json) and the 15 COCO categories in neither
OVR_CNN_SEEN = {"toilet", "bicycle", "apple", "train", "laptop", "carrot", "motorcycle", "oven", "chair", "mouse",
                "boat", "kite", "sheep", "horse", "sandwich", "clock", "tv", "backpack", "toaster", "bowl",
                "microwave", "bench", "book", "orange", "bird", "pizza", "fork", "frisbee", "bear", "vase",
                "toothbrush", "spoon", "giraffe", "handbag", "broccoli", "refrigerator", "remote", "surfboard", "car",
                "bed", "banana", "donut", "skis", "person", "truck", "bottle", "suitcase", "zebra"}
OVR_CNN_UNSEEN = {"umbrella", "cow", "cup", "bus", "keyboard", "skateboard", "dog", "couch", "tie", "snowboard",
                  "sink", "elephant", "cake", "scissors", "airplane", "cat", "knife"}
OV_NEITHER = {10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 37: "sports ball",
              39: "baseball bat", 40: "baseball glove", 43: "tennis racket", 46: "wine glass", 58: "hot dog",
              64: "potted plant", 67: "dining table", 77: "cell phone", 88: "teddy bear", 89: "hair drier"}
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]  # COCO's 80 category ids (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused)


def test_ov_categories_are_ovr_cnns_lists_by_coco_id():
    seen, unseen = data.OV_SEEN_CATEGORIES, data.OV_UNSEEN_CATEGORIES
    assert set(seen.values()) == OVR_CNN_SEEN and len(seen) == 48
    assert set(unseen.values()) == OVR_CNN_UNSEEN and len(unseen) == 17
    assert sorted({**seen, **unseen, **OV_NEITHER}) == COCO_IDS  # disjoint, together all 80 COCO categories
    assert (seen[1], seen[72], seen[90], unseen[5], unseen[87]) == ("person", "tv", "toothbrush", "airplane",
                                                                     "scissors")


def write_ov_refer(root: str) -> str:
    """A refcoco (unc) tree whose refs name seen, unseen and neither-split COCO categories:
    train  image 1: person, dog, traffic light; image 2: car, airplane; image 3: teddy bear only
    val    image 4: person, dog, dog, traffic light; testA image 5: person, cat; testB image 6: car, teddy bear, cow
    """
    layout = {1: ("train", (1, 18, 10)), 2: ("train", (3, 5)), 3: ("train", (88,)), 4: ("val", (1, 18, 18, 10)),
              5: ("testA", (1, 17)), 6: ("testB", (3, 88, 21))}
    sq = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    images, anns, refs = [], [], []
    for image_id, (split, categories) in layout.items():
        images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": 20, "width": 30})
        for cat in categories:
            ann_id = 100 + len(anns)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": sq})
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "category_id": cat,
                         "split": split, "sentences": [{"sent": f"object {ann_id}"}, {"sent": f"thing {ann_id}"}]})
    write_tree(root, refs, {"images": images, "annotations": anns, "categories": []})
    return root


def test_seen_unseen_split_leaves_the_other_15_categories_out(tmp_path):
    refer = data.load_refs(write_ov_refer(str(tmp_path)), "refcoco", "unc")
    counts = {split: {k: len(v) for k, v in data.split_seen_unseen(refer.split_refs(split)).items()}
              for split in ("train", "val", "test")}
    assert counts == {"train": {"seen": 2, "unseen": 2}, "val": {"seen": 1, "unseen": 2},
                      "test": {"seen": 2, "unseen": 2}}  # traffic light and teddy bear refs are in neither
    assert len(refer.split_refs("test")) == 5  # RefCOCO's "test" (Table 2) = testA + testB
    seen_train = train_set(refer, category_ids=data.OV_SEEN_CATEGORIES)
    assert seen_train.dropped_refs == 4 and seen_train.image_ids == [1, 2]  # image 3 had no seen ref
    assert [r["category_id"] for p in seen_train.pairs for r, _ in p[::2]] == [1, 3]  # 2 sentences per ref
    unseen_test = data.RefEvalSet(refer, "test", CharTokenizer(), category_ids=data.OV_UNSEEN_CATEGORIES)
    assert unseen_test.image_ids == [5, 6] and sum(map(len, unseen_test.pairs)) == 4


# ---- instance-contrastive sampling --------------------------------------------------------------


def test_train_item_has_b_sentences_with_their_instance_ids(synth):
    ds = train_set(synth, sentences_per_image=4)
    sentence_to_anns = {}
    for r in synth.refs:
        for s in r["sentences"]:
            sentence_to_anns.setdefault((r["image_id"], s), set()).add(r["ann_id"])
    for index in range(len(ds)):
        item = ds[index]
        assert len(item["sentences"]) == 4 and item["tokens"].shape == (4, 77)
        full = [s for s in item["sentences"] if (item["image_id"], s) in sentence_to_anns]
        assert len(full) >= min(4, len(ds.pairs[index]))
        for s, a in zip(item["sentences"], item["ann_ids"]):
            if (item["image_id"], s) in sentence_to_anns:
                assert a in sentence_to_anns[(item["image_id"], s)]
            assert synth.anns[a]["image_id"] == item["image_id"]


def test_train_masks_are_the_referred_instances(synth):
    ds = train_set(synth)
    item = ds[0]
    for mask, ann_id in zip(item["masks"], item["ann_ids"]):
        expected = data.mask_to_frame(synth.mask(ann_id), item["input_size"], SAM_SIZE)
        np.testing.assert_array_equal(mask, expected)
        assert mask.sum() > 0


def test_few_sentences_are_repeated_with_words_dropped(synth):
    ds = train_set(synth, sentences_per_image=12, word_drop=0.5)
    item = ds[0]
    n = len(ds.pairs[0])
    assert n < 12 and len(item["sentences"]) == 12
    originals = {s: r["ann_id"] for r, s in ds.pairs[0]}
    assert sorted(item["sentences"][:n]) == sorted(originals)  # every sentence once, in full
    assert all(s not in originals for s in item["sentences"][n:])  # every repeat lost words
    for s, a in zip(item["sentences"][n:], item["ann_ids"][n:]):
        assert s.split()  # at least one word kept
        sources = [o for o in originals if originals[o] == a]
        assert any(set(s.split()) <= set(o.split()) for o in sources)


def test_items_depend_only_on_seed_epoch_and_index(synth):
    ds = train_set(synth, seed=5)
    first = [ds[i]["sentences"] for i in range(len(ds))]
    again = [ds[i]["sentences"] for i in reversed(range(len(ds)))][::-1]  # any access order
    assert first == again
    other_seed = train_set(synth, seed=6)
    ds.set_epoch(1)
    assert [ds[i]["sentences"] for i in range(len(ds))] != first
    ds.set_epoch(0)
    assert [ds[i]["sentences"] for i in range(len(ds))] == first
    assert [other_seed[i]["sentences"] for i in range(len(ds))] != first


def test_items_are_the_same_in_a_worker_process(synth):
    ds = train_set(synth, seed=2)
    ds.set_epoch(3)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate, num_workers=n)
               for n in (0, 1)]
    main, worker = (next(iter(loader)) for loader in loaders)
    assert main["sentences"] == worker["sentences"]
    assert torch.equal(main["masks"], worker["masks"])
    assert torch.equal(main["sam_images"], worker["sam_images"])


def test_clip_and_sam_frames_share_the_letterbox_geometry(synth):
    item = train_set(synth, clip_size=96, sam_size=256)[1]
    h, w = item["original_size"]
    assert item["input_size"] == resize_longest_side_shape(h, w, 256)
    for image, size in ((item["clip_image"], 96), (item["sam_image"], 256)):
        vh, vw = resize_longest_side_shape(h, w, size)
        assert image.shape == (3, size, size)
        assert image[:, vh:].abs().sum() == 0 and image[:, :, vw:].abs().sum() == 0  # pad = 0
        assert image[:, vh - 1, :vw].abs().sum() > 0 and image[:, :vh, vw - 1].abs().sum() > 0
    # same picture: the SAM frame downsampled to CLIP's size matches the CLIP frame in colour
    sam_rgb = item["sam_image"] * torch.tensor(data.SAM_STD).view(3, 1, 1) + torch.tensor(
        data.SAM_MEAN).view(3, 1, 1)
    clip_rgb = item["clip_image"] * torch.tensor(data.CLIP_STD).view(3, 1, 1) * 255 + torch.tensor(
        data.CLIP_MEAN).view(3, 1, 1) * 255
    small = torch.nn.functional.interpolate(sam_rgb[None], size=96, mode="area")[0]
    vh, vw = resize_longest_side_shape(h, w, 96)
    assert (small - clip_rgb)[:, 2:vh - 2, 2:vw - 2].abs().mean() < 10


def test_items_without_sam_input_keep_everything_else(synth):
    """Training stage 1 skips SAM's input image and frames the masks at CLIP's size, not SAM's; the CLIP
    input is unchanged and the masks cover the same share of every CLIP grid cell (the coarse target)."""
    ds = train_set(synth)
    full = data.collate([ds[0], ds[1]])
    ds.set_epoch(0, stage=1)
    light = data.collate([ds[0], ds[1]])
    assert full["sam_images"] is not None and light["sam_images"] is None
    for key in ("clip_images", "tokens", "input_sizes", "instance_ids"):
        assert torch.equal(full[key], light[key]), key
    assert light["masks"].shape[1:] == (CLIP_SIZE, CLIP_SIZE) and light["masks"].dtype == torch.uint8
    grid = CLIP_SIZE // 16
    targets = [F.interpolate(b["masks"][:, None].float(), size=grid, mode="area") for b in (full, light)]
    assert (targets[0] - targets[1]).abs().max() < 0.1


def test_letterbox_pads_bottom_right_with_zero():
    from PIL import Image
    pixels, (h, w) = data.letterbox(Image.new("RGB", (50, 20), (200, 100, 50)), 100)
    assert (h, w) == (40, 100) and pixels.shape == (3, 100, 100)
    colour = torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1)
    assert torch.equal(pixels[:, :40, :], colour.expand(3, 40, 100))
    assert pixels[:, 40:].abs().sum() == 0


def test_collate_builds_the_contract_batch(synth):
    ds = train_set(synth, sentences_per_image=3)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=1, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=data.collate)
    batch = next(iter(loader))
    assert batch["clip_images"].shape == (2, 3, CLIP_SIZE, CLIP_SIZE)
    assert batch["sam_images"].shape == (2, 3, SAM_SIZE, SAM_SIZE)
    # cut on the CPU after the longest sentence's EOT, to a multiple of 8 (no host sync in the step)
    longest = int(batch["tokens"].argmax(1).max()) + 1
    assert batch["tokens"].shape == (6, -(-longest // 8) * 8) and batch["tokens"].dtype == torch.long
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["masks"].shape == (6, SAM_SIZE, SAM_SIZE) and batch["masks"].dtype == torch.uint8
    assert set(batch["masks"].unique().tolist()) <= {0, 1}
    assert torch.equal(batch["instance_ids"], batch["ann_ids"])
    assert batch["image_ids"].shape == (2,) and batch["input_sizes"].shape == (2, 2)
    assert batch["original_sizes"].shape == (2, 2) and len(batch["sentences"]) == 6
    assert batch["ref_ids"].shape == (6,) and batch["category_ids"].shape == (6,)
    assert "gt_original" not in batch


def test_eval_item_holds_every_sentence_and_original_masks(synth):
    ds = data.RefEvalSet(synth, "val", CharTokenizer(), clip_size=CLIP_SIZE, sam_size=SAM_SIZE)
    refs = synth.split_refs("val")
    assert len(ds) == len({r["image_id"] for r in refs})
    batch = data.collate([ds[i] for i in range(len(ds))])
    assert len(batch["sentences"]) == sum(len(r["sentences"]) for r in refs)
    for n, ann_id in enumerate(batch["ann_ids"].tolist()):
        image = synth.images[int(batch["image_ids"][batch["image_index"][n]])]
        assert batch["gt_original"][n].shape == (image["height"], image["width"])
        np.testing.assert_array_equal(batch["gt_original"][n], synth.mask(ann_id))


def test_real_tokenizer_fits_the_dataset(synth):
    ds = data.RefEvalSet(synth, "testA", Tokenizer(), clip_size=CLIP_SIZE, sam_size=SAM_SIZE)
    tokens = ds[0]["tokens"]
    assert (tokens[:, 0] == 49406).all() and (tokens == 49407).sum(1).eq(1).all()


def broken_copy(synth_root, tmp_path, index=2):
    """A private copy of the synth data (the module's files stay intact) whose training image `index` is not an image:
    (its RefData, the broken file's path)."""
    root = shutil.copytree(synth_root, tmp_path / "synth")
    copy = data.load_refs(str(root), "synth", "unc")
    ds = train_set(copy)
    broken = ds.data.images[ds.image_ids[index]]["path"]
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    return copy, broken


def test_unreadable_training_image_is_skipped_with_a_log(synth_root, caplog, tmp_path):
    copy, broken = broken_copy(synth_root, tmp_path)
    ds = train_set(copy, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="data"):
        item = ds[2]
    assert item["image_id"] == ds.image_ids[3]  # the next image, deterministically
    assert item["sentences"] == ds[3]["sentences"]
    assert broken in caplog.text and "skipping" in caplog.text
    assert item["skipped_images"] == [broken] and ds[3]["skipped_images"] == []
    eval_set = data.RefEvalSet(copy, "train", CharTokenizer(), CLIP_SIZE, SAM_SIZE)
    with pytest.raises(OSError, match="cannot open image .*" + os.path.basename(broken)):
        eval_set[eval_set.image_ids.index(ds.image_ids[2])]


def test_image_size_disagreeing_with_annotation_names_the_file(synth):
    images = {k: dict(v, width=v["width"] + 1) for k, v in synth.images.items()}
    wrong = data.RefData(synth.dataset, synth.split_by, synth.refs, synth.anns, images)
    ds = data.RefEvalSet(wrong, "val", CharTokenizer(), clip_size=CLIP_SIZE, sam_size=SAM_SIZE)
    with pytest.raises(ValueError, match="but its annotation says") as info:
        ds[0]
    assert images[ds.image_ids[0]]["path"] in str(info.value)


def test_bad_segmentation_error_names_file_and_annotation(synth):
    broken = data.RefData(synth.dataset, synth.split_by, synth.refs, dict(synth.anns), synth.images)
    ann_id = synth.refs[0]["ann_id"]
    broken.anns[ann_id] = dict(broken.anns[ann_id], segmentation={"counts": [1], "size": [1, 1]})
    with pytest.raises(ValueError, match=f"instances.json: annotation id {ann_id}: RLE size"):
        broken.mask(ann_id)


# ---- stats CLI and the synthetic dataset --------------------------------------------------------


def test_stats_cli_prints_json_counts_last(synth_root, capsys):
    assert data.main(["stats", "--data-root", synth_root, "--dataset", "synth", "--split-by",
                      "unc", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(counts["splits"]) == ["train", "val", "testA", "testB"]
    images = [counts["splits"][s]["images"] for s in ("train", "val", "testA", "testB")]
    assert images == [12, 4, 3, 3]
    assert counts["splits"]["train"]["sentences"] >= counts["splits"]["train"]["refs"] >= 24


def test_synth_is_byte_identical_for_a_seed(tmp_path):
    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(root) for f in fs}
    for name in ("a", "b"):
        data.main(["synth", "--out", str(tmp_path / name), "--seed", "1", "--images", "10"])
    synthetic.make_synth(str(tmp_path / "c"), seed=2, n_train=10, n_val=1, n_testA=1, n_testB=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_synth_expressions_name_exactly_one_object():
    rng = np.random.default_rng(0)
    for _ in range(50):
        objects = synthetic._place_objects(rng, 200, 180)
        found = synthetic._synth_expressions(objects, 200, 180)
        texts = [t for per_object in found for t, _ in per_object]
        assert len(texts) == len(set(texts))  # no expression is given to two objects
        for o, per_object in zip(objects, found):
            for text, simple in per_object:
                if simple:  # colour/shape words: this object and no other has those attributes
                    words = set(text.split()) - {"the", "shape"}
                    owners = [p for p in objects if words <= {p["color"], p["shape"]}]
                    assert owners == [o], text


def test_synth_loads_like_refcoco_with_sensible_objects(synth):
    assert synth.splits() == ["train", "val", "testA", "testB"]
    for r in synth.refs:
        image = synth.images[r["image_id"]]
        area = synth.mask(r["ann_id"]).mean()
        assert 0.01 < area < 0.5, (r, image)
        assert 2 <= len(r["sentences"]) <= 3


# ---- image files that are not 8-bit, or too large ----


def ramp16(path, mode="I;16"):
    """A 16-bit gray ramp 0..65520 (64 x 64), saved in `mode` ("I;16": PNG; "I": a 32-bit TIFF of 16-bit values)."""
    pixels = np.arange(64 * 64).reshape(64, 64) * 16
    Image.fromarray(pixels.astype(np.uint16 if mode == "I;16" else np.int32)).save(path)
    return pixels


@pytest.mark.parametrize("name, mode", [("ramp.png", "I;16"), ("ramp.tif", "I")])
def test_16_bit_images_are_scaled_by_65535_not_clipped(tmp_path, name, mode):
    pixels = ramp16(tmp_path / name, mode)
    assert Image.open(tmp_path / name).mode == mode
    image = data._open_image(str(tmp_path / name))
    expected = np.rint(pixels / 257.0)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 0], expected)  # clipped: mean 254.5


def test_float_and_32_bit_images_are_refused_naming_file_and_mode(tmp_path):
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=f"{tmp_path / 'f.tif'}: a 32-bit floating-point image \\(mode F\\)"):
        data._open_image(str(tmp_path / "f.tif"))
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match=f"{tmp_path / 'i.tif'}: a 32-bit integer image \\(mode I\\)"):
        data._open_image(str(tmp_path / "i.tif"))


def test_image_over_the_pixel_limit_names_the_limit_and_how_to_lift_it(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow's guard now stops at 2 x 50 pixels
    with pytest.raises(ValueError, match=f"{tmp_path / 'big.png'}: 20x20 is 400 pixels, over the limit of 100 .*"
                                         "--max-image-pixels N .*PROMPT_RIS_MAX_IMAGE_PIXELS=N"):
        data._open_image(str(tmp_path / "big.png"))
    monkeypatch.setenv("PROMPT_RIS_MAX_IMAGE_PIXELS", "400")
    assert data._open_image(str(tmp_path / "big.png")).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 50  # Pillow's own setting is left as it was


def test_an_unreadable_training_image_stops_training_naming_it(synth_root, tmp_path):
    copy, broken = broken_copy(synth_root, tmp_path)
    with pytest.raises(OSError, match=f"training image 2: cannot open image {broken}: .*--skip-bad-images"):
        train_set(copy)[2]


def test_skipped_images_reach_the_batch_from_worker_processes(synth_root, tmp_path):
    copy, broken = broken_copy(synth_root, tmp_path)
    loader = torch.utils.data.DataLoader(train_set(copy, skip_bad_images=True), batch_sampler=[[0, 1], [2, 3]],
                                         collate_fn=data.collate, num_workers=1)
    assert [batch["skipped_images"] for batch in loader] == [[], [broken]]


def test_a_dataset_of_bad_images_still_ends_with_an_error(synth, tmp_path):
    images = {k: dict(v, path=str(tmp_path / "gone.jpg")) for k, v in synth.images.items()}
    gone = data.RefData(synth.dataset, synth.split_by, synth.refs, synth.anns, images)
    with pytest.raises(OSError, match="3 consecutive training images could not be used"):
        train_set(gone, skip_bad_images=True, max_skips=2)[0]


def test_a_one_pixel_high_image_names_the_file(synth_root, tmp_path):
    root = shutil.copytree(synth_root, tmp_path / "synth")
    copy = data.load_refs(str(root), "synth", "unc")
    ds = train_set(copy)
    info = copy.images[ds.image_ids[2]]
    Image.new("RGB", (300, 1)).save(info["path"], format="JPEG")
    info.update(width=300, height=1)
    with pytest.raises(ValueError, match=f"{info['path']} is 300x1: its short side would shrink to 0 pixels"):
        ds[2]
    assert train_set(copy, skip_bad_images=True)[2]["skipped_images"] == [info["path"]]


def test_deeply_nested_json_of_a_dataset_names_the_file(tmp_path):
    """A refs .json or instances.json nested thousands deep: one line naming the file, not a RecursionError."""
    import coco
    path = tmp_path / "instances.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid JSON \(nested too deeply to read\)$"):
        coco.load_json(str(path))


def test_datasets_trained_together_may_not_give_one_id_two_meanings():
    """Records are merged, held out and contrasted by id: one image id must be one file, one ann_id one image."""
    import coco
    from types import SimpleNamespace as Set
    a = Set(dataset="a", images={1: {"file_name": "x.jpg"}}, anns={5: {"image_id": 1}})
    coco.check_ids_agree([a, Set(dataset="b", images={1: {"file_name": "x.jpg"}}, anns={5: {"image_id": 1}})])
    with pytest.raises(ValueError, match=r"^image id 1 has file_name x\.jpg in a but y\.jpg in b: .* image ids"):
        coco.check_ids_agree([a, Set(dataset="b", images={1: {"file_name": "y.jpg"}}, anns={})])
    with pytest.raises(ValueError, match=r"^annotation id 5 has image_id 1 in a but 2 in b: .* annotation ids"):
        coco.check_ids_agree([a, Set(dataset="b", images={}, anns={5: {"image_id": 2}})])
