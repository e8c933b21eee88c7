"""Your own referring data (own_data.py, `python data.py import`): what is imported reads back exactly, every bad
line is one message naming the file, the line and the field, and NAME trains and evaluates by its name alone."""
import json
import os
import re

import numpy as np
import pytest
import pycocotools.mask as coco_oracle  # test-only oracle of the RLE encoder
from PIL import Image

import data
import eval as eval_py
import own_data
import sam_cache
import synth
import train
from coco import decode_mask, encode_mask
from helpers import micro_args
from runtime import dataset_specs

SIZE = (40, 30)  # width, height of every test image


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


@pytest.fixture()
def source(tmp_path):
    """Six photos with PNG masks, a polygon, an image with two objects, one object given on two lines; returns
    (src folder, the records, {(image, object): expected mask in the upright frame})."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    records, expected = [], {}
    for i in range(6):
        pixels = rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        _save(str(src / "photos" / f"{i}.png"), pixels)
        mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
        mask[3 + i:12 + i, 5:20 + i] = 255
        _save(str(src / "masks" / f"{i}_a.png"), mask)
        records.append({"image": f"photos/{i}.png", "mask": f"masks/{i}_a.png",
                        "sentences": [f"the block {i}"], "split": "val" if i == 5 else "train"})
        expected[i, "a"] = mask != 0
    # image 0: a second object given as a polygon; and the first object again on another line (pooled)
    polygon = [[20.0, 15.0, 38.5, 15.0, 38.5, 29.0, 20.0, 29.0]]
    records.append({"image": "photos/0.png", "segmentation": polygon, "sentences": ["the corner"]})
    expected[0, "poly"] = decode_mask(polygon, SIZE[1], SIZE[0]) != 0
    records.append({"image": "photos/0.png", "mask": "masks/0_a.png", "sentences": ["top block", "the block 0"]})
    return src, records, expected


def _import(src, records, root, name="mine", *extra):
    path = _write_jsonl(src / "refs.jsonl", records)
    return data.main(["import", path, "--name", name, "--data-root", str(root), *extra])


# ---- the RLE encoder ----


def test_encode_mask_writes_pycocotools_string_and_decodes_back():
    rng = np.random.default_rng(1)
    masks = [rng.random((int(h), int(w))) < p for h, w, p in zip(rng.integers(1, 50, 40), rng.integers(1, 50, 40),
                                                                rng.random(40))]
    masks += [np.ones((7, 5), bool), np.zeros((2, 3), bool), np.pad(np.ones((900, 1200), bool), 40)]
    for mask in masks:
        ours = encode_mask(mask.astype(np.uint8))
        assert ours["counts"] == coco_oracle.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert np.array_equal(decode_mask(ours, *mask.shape), mask)


# ---- importing ----


def test_import_reads_back_every_mask_pixel_for_pixel(source, tmp_path, capsys):
    src, records, expected = source
    root = tmp_path / "root"
    assert _import(src, records, root) == 0
    out = capsys.readouterr().out
    assert "imported 7 objects on 6 images from 8 lines" in out and "mine (own): 7 refs, 6 images" in out
    loaded = data.load_refs(str(root), "mine", "own")
    assert len(loaded.refs) == 7 and sorted(loaded.splits()) == ["train", "val"]
    by_image = {}
    for ref in loaded.refs:
        info = loaded.images[ref["image_id"]]
        assert info["path"].startswith(str(root / "mine" / "images"))  # nothing outside ROOT
        by_image.setdefault(int(info["file_name"].split("_")[1].split(".")[0]) - 1, []).append(ref)
    for i in range(6):
        masks = {tuple(r["sentences"]): loaded.mask(r["ann_id"]) for r in by_image[i]}
        assert np.array_equal(masks.pop((f"the block {i}",) if i else ("the block 0", "top block")), expected[i, "a"])
        if i == 0:
            assert np.array_equal(masks.pop(("the corner",)), expected[0, "poly"])
        assert not masks
    offset = own_data.id_offset("mine")
    assert min(loaded.images) > offset > 2**40 and max(loaded.anns) < 2**53


def test_stats_and_specs_find_the_only_split_scheme(source, tmp_path, capsys):
    src, records, _ = source
    root = tmp_path / "root"
    _import(src, records, root, "mine", "--split-by", "v1")
    capsys.readouterr()
    assert data.main(["stats", "mine", "--data-root", str(root)]) == 0
    assert "mine (v1): 7 refs" in capsys.readouterr().out
    assert dataset_specs("mine,synth", str(root)) == [("mine", "v1"), ("synth", "unc")]
    with pytest.raises(ValueError, match="no default split for 'other' and .* holds no refs"):
        dataset_specs("other", str(root))


def test_images_are_found_in_their_own_folder_beside_coco_images(source, tmp_path):
    src, records, _ = source
    root = tmp_path / "root"
    os.makedirs(root / "images" / "train2014")
    _import(src, records, root)
    loaded = data.load_refs(str(root), "mine", "own")
    assert all(os.path.isfile(im["path"]) and "/mine/images/" in im["path"] for im in loaded.images.values())


def test_exif_turned_photo_is_stored_upright(tmp_path):
    src, root = tmp_path / "src", tmp_path / "root"
    os.makedirs(src)
    stored = np.zeros((20, 30, 3), np.uint8)  # 30 wide as stored, 20 wide as shown (orientation 6: turned 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(src / "photo.jpg", exif=exif)
    mask = np.zeros((30, 20), np.uint8)
    mask[2:9, 4:11] = 1
    _save(str(src / "mask.png"), mask)
    _import(src, [{"image": "photo.jpg", "mask": "mask.png", "sentences": ["it"], "split": "train"}], root)
    loaded = data.load_refs(str(root), "mine", "own")
    (info,) = loaded.images.values()
    assert (info["width"], info["height"]) == (20, 30) and Image.open(info["path"]).size == (20, 30)
    assert np.array_equal(loaded.mask(loaded.refs[0]["ann_id"]), mask)


def test_16_bit_image_is_kept_and_read_scaled_as_training_reads_it(tmp_path):
    src, root = tmp_path / "src", tmp_path / "root"
    ramp = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)  # 0..64155: clipped at 255 it would be white
    _save(str(src / "deep.png"), ramp)
    _save(str(src / "m.png"), np.eye(6, 8, dtype=np.uint8))
    _import(src, [{"image": "deep.png", "mask": "m.png", "sentences": ["x"], "split": "val"}], root)
    loaded = data.load_refs(str(root), "mine", "own")
    image = data.RefEvalSet(loaded, "val", lambda s, context_length: None).read_image(0)
    assert np.array_equal(np.asarray(image)[..., 0], np.rint(ramp / 257).astype(np.uint8))


def test_splits_are_drawn_per_image_with_a_seed(tmp_path, capsys):
    src, root = tmp_path / "src", tmp_path / "root"
    records = []
    for i in range(20):
        _save(str(src / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
        _save(str(src / f"{i}.png.mask.png"), np.eye(8, dtype=np.uint8))
        records += [{"image": f"{i}.png", "mask": f"{i}.png.mask.png", "sentences": [f"s{i}"]}] * 2
    _import(src, records, root, "drawn", "--val-fraction", "0.2", "--test-fraction", "0.1", "--seed", "3")
    assert "split drawn: " in capsys.readouterr().out
    loaded = data.load_refs(str(root), "drawn", "own")
    splits = {}
    for r in loaded.refs:
        splits.setdefault(r["split"], set()).add(r["image_id"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 14, "val": 4, "test": 2}
    _import(src, records, root, "drawn", "--val-fraction", "0.2", "--test-fraction", "0.1", "--seed", "3",
            "--overwrite")
    assert [r["split"] for r in data.load_refs(str(root), "drawn", "own").refs] == [r["split"] for r in loaded.refs]


def test_threshold_picks_the_object_from_a_mask_of_several_values(tmp_path):
    src, root = tmp_path / "src", tmp_path / "root"
    _save(str(src / "p.png"), np.zeros((6, 6, 3), np.uint8))
    mask = np.array([[0, 10, 200, 255, 0, 0]] * 6, np.uint8)
    _save(str(src / "m.png"), mask)
    _import(src, [{"image": "p.png", "mask": "m.png", "sentences": ["x"], "split": "train"}], root, "t",
            "--threshold", "127")
    loaded = data.load_refs(str(root), "t", "own")
    assert np.array_equal(loaded.mask(loaded.refs[0]["ann_id"]), mask > 127)


# ---- every bad input: one line naming SRC, the line and the field; NAME untouched ----


def _bad_cases(src):
    """(records, the message's pattern after 'SRC: line N: ') per bad input; src holds p.png (6x6) and masks."""
    _save(str(src / "p.png"), np.zeros((6, 6, 3), np.uint8))
    _save(str(src / "good.png"), np.eye(6, dtype=np.uint8))
    _save(str(src / "empty.png"), np.zeros((6, 6), np.uint8))
    _save(str(src / "big.png"), np.ones((7, 6), np.uint8))
    _save(str(src / "two.png"), np.diag([1, 2, 1, 2, 1, 2]).astype(np.uint8))
    _save(str(src / "rgb.png"), np.ones((6, 6, 3), np.uint8))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    _save(str(src / "float.tif"), np.ones((6, 6), np.float32))
    good = {"image": "p.png", "mask": "good.png", "sentences": ["x"], "split": "train"}
    return [
        ("{not json", r"2: not JSON"),
        ({**good, "image": "missing.png"}, r"2: 'image': no such file .*missing\.png"),
        ({**good, "image": "broken.png"}, r"2: 'image': cannot open image .*broken\.png"),
        ({**good, "image": "float.tif"}, r"2: 'image': .*float.tif: a 32-bit floating-point image"),
        ({**good, "mask": "missing.png"}, r"2: 'mask': no such file .*missing\.png"),
        ({**good, "mask": "broken.png"}, r"2: 'mask': cannot read .*broken\.png"),
        ({**good, "mask": "big.png"}, r"2: 'mask': .*big\.png is 6x7 but its image is 6x6"),
        ({**good, "mask": "empty.png"}, r"2: 'mask': empty mask"),
        ({**good, "mask": "two.png"}, r"2: 'mask': .*two\.png holds 2 distinct non-zero values \(1, 2\).*--threshold"),
        ({**good, "mask": "rgb.png"}, r"2: 'mask': .*rgb\.png is an RGB image; save one channel"),
        ({k: v for k, v in good.items() if k != "mask"} | {"segmentation": [[1, 1, 2]]},
         r"2: 'segmentation': polygon part 0|2: 'segmentation': empty mask"),
        ({**good, "sentences": ["ok", " "]}, r"2: 'sentences\[1\]': an empty sentence"),
        ({**good, "sentences": [3]}, r"2: 'sentences\[0\]': int, not a string"),
        ({**good, "sentences": []}, r"2: 'sentences': missing or not a non-empty list"),
        ({**good, "split": "dev"}, r"2: 'split': unknown split 'dev'"),
        ({**good, "split": "val"}, r"2: 'split': p\.png is given under split 'val' here and 'train' on line 1"),
        ({**good, "sentence": ["x"]}, r"2: 'sentence': unknown field"),
    ], good


def test_each_bad_line_is_one_message_and_name_is_untouched(tmp_path):
    src, root = tmp_path / "src", tmp_path / "root"
    os.makedirs(src)
    cases, good = _bad_cases(src)
    _import(src, [good], root, "kept")
    before = sorted(os.listdir(root / "kept"))
    refs_before = (root / "kept" / "refs(own).json").read_bytes()
    for bad, pattern in cases:
        path = _write_jsonl(src / "refs.jsonl", [good, bad])
        with pytest.raises(ValueError) as caught:
            own_data.import_jsonl(path, str(root), "kept", overwrite=True)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{path}: line "), message
        assert any(re.search(p, message) for p in pattern.split("|")), (pattern, message)
        assert sorted(os.listdir(root / "kept")) == before
        assert (root / "kept" / "refs(own).json").read_bytes() == refs_before
        assert [f for f in os.listdir(root) if f.startswith(".")] == []  # no staging folder left


def test_skip_bad_imports_the_good_lines_and_says_why(tmp_path, capsys):
    src, root = tmp_path / "src", tmp_path / "root"
    os.makedirs(src)
    cases, good = _bad_cases(src)
    path = _write_jsonl(src / "refs.jsonl", [good] + [bad for bad, _ in cases])
    assert data.main(["import", path, "--name", "some", "--data-root", str(root), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {len(cases)} bad lines" in out and f"{path}: line 2: not JSON" in out
    assert len(data.load_refs(str(root), "some", "own").refs) == 1


def test_names_and_existing_folders_are_refused(source, tmp_path):
    src, records, _ = source
    root = tmp_path / "root"
    for name in ("a:b", "x,y", "refcoco", "images", ""):
        with pytest.raises(ValueError, match="--name"):
            _import(src, records, root, name)
    _import(src, records, root)
    with pytest.raises(ValueError, match=r"mine exists; pass --overwrite"):
        _import(src, records, root)
    os.makedirs(root / "notours")
    with pytest.raises(ValueError, match="was not written by `data.py import`"):
        _import(src, records, root, "notours", "--overwrite")


def test_combined_datasets_must_not_share_ids(source, tmp_path):
    src, records, _ = source
    root = tmp_path / "root"
    _import(src, records, root, "a")
    _import(src, records, root, "b")
    a, b = data.load_refs(str(root), "a", "own"), data.load_refs(str(root), "b", "own")
    assert not set(a.images) & set(b.images) and not set(a.anns) & set(b.anns)
    clash = data.RefData("b", "own", b.refs, b.anns, {i - own_data.id_offset("b") + own_data.id_offset("a"): im
                                                       for i, im in b.images.items()})
    with pytest.raises(ValueError, match="image id .* must not share image ids"):
        data.combine_for_training([a, clash])


def test_sam_cache_file_changes_when_the_image_file_is_replaced(tmp_path):
    image = tmp_path / "x.png"
    _save(str(image), np.zeros((4, 4, 3), np.uint8))
    first = sam_cache.sam_cache_path(str(tmp_path), 7, str(image))
    _save(str(tmp_path / "y.png"), np.ones((4, 5, 3), np.uint8))
    os.replace(tmp_path / "y.png", image)  # a re-import with --overwrite: another file under the same id
    assert sam_cache.sam_cache_path(str(tmp_path), 7, str(image)) != first


# ---- downstream by name: train with the built-in data, fine-tune, evaluate ----


def test_train_on_name_with_synth_then_fine_tune_and_evaluate(source, tmp_path, capsys):
    src, records, _ = source
    root = tmp_path / "root"
    synth.make_synth(str(root), seed=0, n_train=8, n_val=2, n_testA=1, n_testB=1)
    _import(src, records, root)
    first = train.main(micro_args(str(root), tmp_path / "run", "--datasets", "mine,synth", "--val-dataset", "mine",
                                  "--max-steps", "2"))
    assert first["step"] == 2
    tuned = train.main(micro_args(str(root), tmp_path / "tuned", "--datasets", "mine", "--val-dataset", "mine",
                                  "--images-per-batch", "2", "--max-steps", "1", "--init-from",
                                  str(tmp_path / "run")))
    assert tuned["step"] == 1
    with pytest.raises(ValueError, match=r"--init-from .* differs from this one in 1 keys: n_prompts: run 16 vs now 4"):
        train.main(micro_args(str(root), tmp_path / "bad", "--datasets", "mine", "--val-dataset", "mine",
                              "--n-prompts", "4", "--init-from", str(tmp_path / "run")))
    capsys.readouterr()
    assert eval_py.main(["--checkpoint", str(tmp_path / "tuned"), "--dataset", "mine", "--device", "cpu"]) == 0
    assert "on mine val (own): 1 images, 1 refs" in capsys.readouterr().out
    assert eval_py.main(["--checkpoint", str(tmp_path / "tuned"), "--splits", "all", "--dataset", "mine",
                         "--device", "cpu"]) == 0
    assert "mine val (own): 1 images" in capsys.readouterr().out
    assert eval_py.main(["--checkpoint", str(tmp_path / "tuned"), "--image", str(src / "photos" / "1.png"), "--text",
                         "the block 1", "--mask-out", str(tmp_path / "m.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "m.png").size == SIZE
