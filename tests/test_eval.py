"""eval.py: the paper's metrics (§4.1, §4.4), evaluation of a run directory end to end, the Fig. 4 panel."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoints
import data
import synth
import eval as ris_eval
from prompt_ris import PROMPT_TYPES, PromptRIS, PromptRISConfig
from sam import ImageEncoderViT, resize_longest_side_shape
import viz


def square(top: int, left: int, size: int, frame: int = 4) -> np.ndarray:
    mask = np.zeros((frame, frame), bool)
    mask[top:top + size, left:left + size] = True
    return mask


# ---- RISMetrics against hand-computed values ----


def test_metrics_match_hand_computed_values():
    gt_a = square(0, 0, 2)  # 4 pixels
    gt_b = np.zeros((4, 4), bool)
    gt_b[3] = True  # bottom row, 4 pixels
    gt_c = np.zeros((4, 4), bool)
    gt_c[:2] = True  # top two rows, 8 pixels
    pred_c = gt_c.copy()
    pred_c[1, 2:] = False  # 6 of its 8 pixels
    metrics = ris_eval.RISMetrics()
    # image 1: two sentences for instance 10 (IoU 1 and exactly 0.5), one for instance 11 (empty prediction)
    assert metrics.update(gt_a, gt_a, image_id=1, ann_id=10) == 1.0  # I 4, U 4
    assert metrics.update(square(0, 0, 1) | square(1, 1, 1), gt_a, image_id=1, ann_id=10) == 0.5  # I 2, U 4
    assert metrics.update(np.zeros((4, 4)), gt_b, image_id=1, ann_id=11) == 0.0  # I 0, U 4
    # image 2: one sentence, IoU 0.75
    assert metrics.update(torch.from_numpy(pred_c), gt_c.astype(np.uint8), image_id=2, ann_id=20) == 0.75  # I 6, U 8
    result = metrics.compute()
    expected = {
        "oIoU": 100 * 12 / 20,  # sum I / sum U
        "mIoU": 100 * (1 + 0.5 + 0 + 0.75) / 4,
        "P@0.5": 50.0, "P@0.6": 50.0, "P@0.7": 50.0,  # strictly higher: the IoU of exactly 0.5 does not count
        "P@0.8": 25.0, "P@0.9": 25.0,
        "ImgAcc": 100 * ((1 + 0.5 + 0) / 3 + 0.75) / 2,  # per image first: 0.5 and 0.75
        "InstAcc": 100 * ((1 + 0.5) / 2 + 0 + 0.75) / 3,  # per instance first: 0.75, 0, 0.75
        "n": 4,
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_empty_prediction_of_empty_ground_truth_has_iou_one():
    metrics = ris_eval.RISMetrics()
    assert metrics.update(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.update(square(0, 0, 2), square(0, 0, 1)) == 0.25
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(62.5)
    assert result["oIoU"] == pytest.approx(25.0)  # the empty pair adds nothing to the sums
    only_empty = ris_eval.RISMetrics()
    only_empty.update(np.zeros((3, 3)), np.zeros((3, 3)))
    assert only_empty.compute()["oIoU"] == 100.0  # no union at all: nothing missed


def test_expressions_without_ids_are_groups_of_their_own_beside_grouped_ones():
    metrics = ris_eval.RISMetrics()
    for iou_one, ids in ((True, {}), (False, {}), (True, {"image_id": 7, "ann_id": 70}),
                         (True, {"image_id": 7, "ann_id": 70}), (False, {"image_id": 7, "ann_id": 70})):
        metrics.update(square(0, 0, 2 if iou_one else 1), square(0, 0, 2), **ids)  # IoU 1 or 1/4
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(100 * 3.5 / 5)
    assert result["ImgAcc"] == result["InstAcc"] == pytest.approx(100 * (1 + 0.25 + 2.25 / 3) / 3)


def test_metrics_without_ids_count_each_expression_as_its_own_image_and_instance():
    metrics = ris_eval.RISMetrics()
    metrics.update(square(0, 0, 2), square(0, 0, 2))
    metrics.update(square(0, 0, 1), square(0, 0, 2))
    result = metrics.compute()
    assert result["ImgAcc"] == result["InstAcc"] == result["mIoU"] == pytest.approx(62.5)


def test_metrics_refuse_logits_mismatched_shapes_and_no_data():
    metrics = ris_eval.RISMetrics()
    with pytest.raises(ValueError, match="threshold logits"):
        metrics.update(np.full((4, 4), 0.7), square(0, 0, 2))
    with pytest.raises(ValueError, match="shape"):
        metrics.update(np.zeros((4, 5), bool), square(0, 0, 2))
    with pytest.raises(ValueError, match=r"^RISMetrics\.compute: no expression was added"):
        metrics.compute()
    for bad in ("pred", "gt"):  # a mask that is not (H, W): the message names the argument
        masks = {"pred": square(0, 0, 2), "gt": square(0, 0, 2), bad: np.zeros((1, 4, 4), bool)}
        with pytest.raises(ValueError, match=rf"^{bad}: expected a \(H, W\) mask, got shape \(1, 4, 4\)"):
            metrics.update(masks["pred"], masks["gt"])


# ---- geometry: letterboxed frame -> original image ----


def test_frame_logits_map_back_to_the_original_mask():
    torch.manual_seed(0)
    model = PromptRIS(PromptRISConfig.tiny())
    gt = np.zeros((90, 150), np.uint8)
    gt[20:70, 30:100] = 1
    S = model.config.sam.image_size
    valid = resize_longest_side_shape(90, 150, S)
    framed = torch.from_numpy(data.mask_to_frame(gt, valid, S)).float()
    logits = (2 * framed - 1)[None]  # (1, S, S): +1 inside, -1 outside
    pred = (ris_eval.to_original(model, logits, valid, (90, 150))[0] > 0).numpy()
    metrics = ris_eval.RISMetrics()
    assert metrics.update(pred, gt) > 0.95


def test_point_index_maps_to_original_pixel_coordinates():
    model = PromptRIS(PromptRISConfig.tiny())  # S = 256, 4h x 4w = 64 x 64 cells of 4 x 4 frame pixels
    index = 10 * 64 + 20  # row 10, column 20: centre (82, 42) in the frame
    x, y = ris_eval.point_xy(model, index, input_size=(128, 256), original_size=(64, 128))  # scale 1/2
    assert (x, y) == pytest.approx((41.0, 21.0))


# ---- end to end on a tiny run directory ----


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A built-in synth dataset with 3 val images and a random tiny PromptRIS saved as train.py does."""
    root = tmp_path_factory.mktemp("eval")
    data_root = synth.make_synth(str(root / "data"), seed=0, n_train=1, n_val=3, n_testA=1, n_testB=1)
    torch.manual_seed(0)
    config = PromptRISConfig.tiny()
    model = PromptRIS(config)
    run = root / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({
        "model": config.to_dict(), "vocab": None,
        "train": {"data_root": data_root, "val_dataset": "synth", "val_split": "val"}}))
    return run


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def count_sam_encoder_images(monkeypatch) -> list:
    """Every image that goes through SAM's image encoder (any model instance) appends 1 to the list."""
    encoded, forward = [], ImageEncoderViT.forward
    monkeypatch.setattr(ImageEncoderViT, "forward", lambda self, x: encoded.extend([1] * len(x)) or forward(self, x))
    return encoded


def test_main_evaluates_the_runs_own_data_and_prints_json(run_dir, capsys, monkeypatch):
    encoded = count_sam_encoder_images(monkeypatch)
    assert ris_eval.main(["--checkpoint", str(run_dir), "--json"]) == 0
    result = last_json(capsys)
    for key in ris_eval.TABLE_KEYS:
        assert 0.0 <= result[key] <= 100.0
    eval_set = data.RefEvalSet(data.load_refs(str(run_dir.parent / "data"), "synth", "unc"), "val",
                               lambda texts, context_length: torch.zeros(len(texts), context_length))
    assert result["n"] == sum(len(p) for p in eval_set.pairs)  # every sentence of the split, once
    assert result["refs"] == len(eval_set.data.split_refs("val"))
    # F_IS once per image, shared by its sentences (the saving "reuse_speedup" reports)
    assert len(encoded) == len(eval_set) == 3 < result["n"]
    assert {"reuse_speedup", "s_per_expression", "s_per_expression_no_reuse"} <= result.keys()


@pytest.mark.parametrize("flags, use_sam, prompts", [
    (["--output", "coarse"], False, PROMPT_TYPES), (["--prompts", "none"], True, ()),
    (["--prompts", "mask,text"], True, ("mask", "text")), (["--prompts", "point"], True, ("point",)),
    ([], True, PROMPT_TYPES)])
def test_ablation_flags_reach_the_model(run_dir, capsys, monkeypatch, flags, use_sam, prompts):
    """Table 3 / 5 switches: every forward of the model gets them (not only the printed result)."""
    calls, forward = [], PromptRIS.forward
    monkeypatch.setattr(PromptRIS, "forward", lambda self, *args, **kwargs: calls.append(kwargs) or
                        forward(self, *args, **kwargs))
    assert ris_eval.main(["--checkpoint", str(run_dir / "model.safetensors"), "--max-images", "1", "--json"]
                         + flags) == 0
    assert last_json(capsys)["n"] > 0 and calls
    for kwargs in calls:
        assert kwargs["use_sam"] == use_sam
        assert tuple(kwargs["prompts"]) == prompts or not use_sam


def test_prompt_subset_reaches_sam_and_coarse_output_skips_it(run_dir):
    model, tokenizer, _ = ris_eval.load_run(run_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    batch = ris_eval.image_batch(image, ["the red circle", "the blue star"], tokenizer, model.config)
    full = ris_eval.run_model(model, batch)
    assert not torch.allclose(full["mask"], ris_eval.run_model(model, batch, prompts=("mask",))["mask"])
    coarse = ris_eval.run_model(model, batch, output="coarse")
    assert coarse.keys() == {"coarse"} and torch.equal(coarse["coarse"], full["coarse"])


def test_evaluate_restores_training_mode(run_dir):
    model, tokenizer, _ = ris_eval.load_run(run_dir)
    loader = torch.utils.data.DataLoader(
        data.RefEvalSet(data.load_refs(str(run_dir.parent / "data"), "synth", "unc"), "val", tokenizer,
                        clip_size=model.config.clip_image_size, sam_size=model.config.sam.image_size),
        batch_size=2, collate_fn=data.collate)
    model.train()
    ris_eval.evaluate(model, loader, output="coarse")
    assert model.training and model.decoder.training


def test_panel_is_two_images_of_the_input_size_plus_caption(run_dir, tmp_path, capsys):
    image_path, out = tmp_path / "photo.png", tmp_path / "pred.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)).save(image_path)
    text = "the red circle on the left"
    assert ris_eval.main(["--checkpoint", str(run_dir), "--image", str(image_path), "--text", text,
                          "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 140, 100 + viz.caption_height(f'"{text}"', 140))


def test_a_large_photo_is_drawn_at_display_size_and_its_mask_written_at_full_size(run_dir, tmp_path):
    image_path, out, mask_out = tmp_path / "photo.png", tmp_path / "pred.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1500, 3), dtype=np.uint8)).save(image_path)
    text = "the red circle"
    assert ris_eval.main(["--checkpoint", str(run_dir), "--image", str(image_path), "--text", text,
                          "--out", str(out), "--mask-out", str(mask_out)]) == 0
    side = viz.DISPLAY_SIDE  # 1500 x 1000 -> 1024 x 683
    assert Image.open(out).size == (2 * side, 683 + viz.caption_height(f'"{text}"', side))
    mask = Image.open(mask_out)
    assert mask.mode == "L" and mask.size == (1500, 1000) and set(np.unique(np.asarray(mask))) <= {0, 255}


def exif_rotated_photo(path, width=60, height=40):
    """A JPEG stored `width` x `height`, red in the left third, whose EXIF orientation 6 tells a viewer
    to turn it 90 degrees clockwise (height x width on screen, red at the top)."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:, : width // 3] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_open_photo_applies_the_exif_orientation(tmp_path):
    exif_rotated_photo(tmp_path / "phone.jpg")
    stored = Image.open(tmp_path / "phone.jpg")
    shown = ris_eval.open_photo(tmp_path / "phone.jpg")
    assert stored.size == (60, 40) and shown.size == (40, 60) and shown.mode == "RGB"
    assert np.array_equal(np.asarray(shown), np.asarray(stored.convert("RGB").transpose(Image.ROTATE_270)))


def test_mask_out_alone_matches_the_photo_as_a_viewer_shows_it(run_dir, tmp_path, monkeypatch):
    exif_rotated_photo(tmp_path / "phone.jpg")

    def segment_red(model, tokenizer, image, text, **kwargs):  # a perfect model for "the red part"
        rgb = np.asarray(image).astype(int)
        red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90)
        return {"mask": red, "coarse": red.astype(np.float32), "point": None}
    monkeypatch.setattr(ris_eval, "predict_image", segment_red)
    monkeypatch.chdir(tmp_path)  # no --out: nothing but the mask may appear
    assert ris_eval.main(["--checkpoint", str(run_dir), "--image", "phone.jpg", "--text", "the red part",
                          "--mask-out", "mask.png"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "phone.jpg"]
    mask = np.asarray(Image.open("mask.png"))
    expected = np.zeros((60, 40), np.uint8)
    expected[:20] = 255  # the stored left third is the top third on screen
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_an_argument_error(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ris_eval.parse_args(["--image", "photo.jpg", "--text", text])
    assert exit_info.value.code == 2 and "--text is empty" in capsys.readouterr().err


def test_save_vis_writes_the_first_panels(run_dir, tmp_path, capsys):
    vis = tmp_path / "vis"
    ris_eval.main(["--checkpoint", str(run_dir), "--max-images", "2", "--save-vis", str(vis), "--max-vis", "3"])
    panels = sorted(vis.iterdir())
    assert len(panels) == 3
    images = data.load_refs(str(run_dir.parent / "data"), "synth", "unc").images
    for panel in panels:  # NNNN_image<id>_ref<id>.png: two images of the original size side by side
        image = images[int(panel.stem.split("_")[1][len("image"):])]
        assert Image.open(panel).width == 2 * image["width"] and Image.open(panel).height > image["height"]


def test_missing_checkpoint_names_the_file_and_train_py(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py"):
        ris_eval.main(["--checkpoint", str(tmp_path / "no_such_run")])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*train.py"):
        ris_eval.main(["--checkpoint", str(tmp_path)])


def test_weights_default_to_the_best_of_the_run_and_say_which(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    record = {"step": 7, "metric": "oIoU", "score": 12.5, "expressions": 3}  # what train.py --keep-best writes
    save_file(load_file(run / "model.safetensors"), str(run / "best.safetensors"), {"best": json.dumps(record)})
    args = ["--checkpoint", str(run), "--output", "coarse", "--max-images", "1", "--json"]
    for flags, used, said in (([], "best", "the best validation of the run (oIoU 12.50 at step 7)"),
                              (["--weights", "last"], "model", "the last weights of the run")):
        assert ris_eval.main(args + flags) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0] == f"weights: {run / used}.safetensors, {said}"
        assert json.loads(lines[-1])["weights"] == f"{run / used}.safetensors"
    (run / "best.safetensors").unlink()
    assert checkpoints.run_weights(run) == (str(run / "model.safetensors"),
                                         "the last weights of the run (it has no best.safetensors)")
    with pytest.raises(FileNotFoundError, match=r"--weights best: .*best\.safetensors not found"):
        ris_eval.main(args + ["--weights", "best"])
    with pytest.raises(ValueError, match="--weights last chooses a file of a run directory"):
        ris_eval.main(["--checkpoint", str(run / "model.safetensors"), "--weights", "last"])


def test_unknown_prompt_type_is_rejected():
    with pytest.raises(ValueError, match="--prompts.*box"):
        ris_eval.parse_prompts("mask,box")


def test_weights_that_do_not_fit_the_config_name_the_file(run_dir, tmp_path):
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["n_prompts"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model.safetensors"):
        ris_eval.load_run(tmp_path)


def test_subset_keeps_seen_categories_and_rejects_an_empty_unseen_split(run_dir, capsys):
    ris_eval.main(["--checkpoint", str(run_dir), "--output", "coarse", "--json"])
    everything = last_json(capsys)
    ris_eval.main(["--checkpoint", str(run_dir), "--output", "coarse", "--subset", "seen", "--json"])
    assert last_json(capsys)["n"] == everything["n"]  # synth shapes are none of the 17 unseen COCO classes
    with pytest.raises(ValueError, match="unseen categories"):
        ris_eval.main(["--checkpoint", str(run_dir), "--subset", "unseen"])


# ---- Tables 1 and 2 in one command ----


def test_splits_all_evaluates_every_split_like_single_split_runs(run_dir, capsys):
    ris_eval.main(["--checkpoint", str(run_dir), "--splits", "all", "--output", "coarse", "--json"])
    table = last_json(capsys)
    assert list(table["splits"]) == ["synth/unc/val", "synth/unc/testA", "synth/unc/testB"]
    for split in ("val", "testA", "testB"):
        ris_eval.main(["--checkpoint", str(run_dir), "--split", split, "--output", "coarse", "--json"])
        single = last_json(capsys)
        assert table["splits"][f"synth/unc/{split}"]["n"] == single["n"]
        assert table["splits"][f"synth/unc/{split}"]["mIoU"] == pytest.approx(single["mIoU"])
    ris_eval.main(["--checkpoint", str(run_dir), "--splits", "all", "--subset", "seen", "--output", "coarse",
                   "--json"])
    seen = last_json(capsys)["splits"]
    assert list(seen) == ["synth/unc/val", "synth/unc/test"]  # Table 2: test = testA + testB
    for key in ("n", "refs"):
        assert seen["synth/unc/test"][key] == table["splits"]["synth/unc/testA"][key] + table["splits"]["synth/unc/testB"][key]
    with pytest.raises(SystemExit):
        ris_eval.parse_args(["--splits", "all", "--split", "val"])


def test_paper_table_has_the_columns_found_and_the_papers_row(tmp_path):
    for dataset, split_by in (("refcoco", "unc"), ("refcocog", "umd")):
        (tmp_path / dataset).mkdir()
        (tmp_path / dataset / f"refs({split_by}).json").write_text("[]")
    columns = ris_eval.table_columns(str(tmp_path), "all")
    assert columns == [("refcoco", "unc", "val"), ("refcoco", "unc", "testA"), ("refcoco", "unc", "testB"),
                       ("refcocog", "umd", "val"), ("refcocog", "umd", "test")]
    ours = {c: {"oIoU": 1.0, "mIoU": 2.0} for c in columns}
    lines = ris_eval.format_paper_table(ours, "all").splitlines()
    assert lines[1].split() == ["val", "testA", "testB", "val(U)", "test(U)"]
    assert lines[3].split() == ["paper", "76.36", "80.37", "72.29", "67.16", "69.01"]  # Table 1, Ours, oIoU
    assert lines[5].split() == ["paper", "78.10", "81.21", "74.64", "70.47", "71.29"]  # mIoU
    unseen_columns = ris_eval.table_columns(str(tmp_path), "unseen")
    unseen = ris_eval.format_paper_table({c: {"mIoU": 2.0} for c in unseen_columns}, "unseen").splitlines()
    assert unseen[1].split() == ["val", "test", "val(U)", "test(U)"]
    assert unseen[3].split() == ["paper", "65.07", "62.02", "46.41", "45.66"]  # Table 2, Ours, unseen
    with pytest.raises(ValueError, match="no refs file"):
        ris_eval.table_columns(str(tmp_path / "refcoco"), "all")


def test_a_16_bit_photo_is_scaled_and_a_float_one_refused(run_dir, tmp_path):
    pixels = np.arange(64 * 64).reshape(64, 64) * 16  # 0..65520: clipped at 255 it would be white
    Image.fromarray(pixels.astype(np.uint16)).save(tmp_path / "ramp.png")
    assert np.array_equal(np.asarray(ris_eval.open_photo(tmp_path / "ramp.png"))[..., 1], np.rint(pixels / 257.0))
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match="depth.tif: a 32-bit floating-point image \\(mode F\\)"):
        ris_eval.main(["--checkpoint", str(run_dir), "--image", str(tmp_path / "depth.tif"), "--text", "a"])


def test_a_photo_over_the_pixel_limit_says_which_flag_lifts_it(run_dir, tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow's guard: 2 x 50 pixels
    args = ["--checkpoint", str(run_dir), "--image", str(tmp_path / "big.png"), "--text", "a", "--mask-out",
            str(tmp_path / "mask.png")]
    with pytest.raises(ValueError, match="big.png: 20x20 is 400 pixels, over the limit of 100 .*--max-image-pixels"):
        ris_eval.main(args)
    assert ris_eval.main(args + ["--max-image-pixels", "400"]) == 0


def test_run_weights_of_integers_are_refused_naming_the_key(run_dir, tmp_path):
    state = load_file(str(run_dir / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, key: state[key].to(torch.int8)}, str(tmp_path / "model.safetensors"))
    shutil.copy(run_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=f"model.safetensors.*not floating point \\(1\\): {key}: file torch.int8"):
        ris_eval.load_run(tmp_path)


def run_with_config(run_dir, tmp_path, change) -> str:
    """A copy of run_dir's weights beside its config.json as `change(config dict)` leaves it."""
    config = json.loads((run_dir / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(run_dir / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


def test_a_config_value_of_the_wrong_type_names_the_file_and_key(run_dir, tmp_path):
    run = run_with_config(run_dir, tmp_path, lambda c: c["model"]["clip"].update(vision_layers="2"))
    with pytest.raises(ValueError, match=r"config.json: 'model' entry: PromptRISConfig.clip.vision_layers should be "
                                         "int, got str '2'"):
        ris_eval.load_run(run)


def test_a_deeply_nested_config_names_the_file(run_dir, tmp_path):
    shutil.copy(run_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="config.json: not valid JSON \\(nested too deeply"):
        ris_eval.load_run(tmp_path)


def test_a_foreign_config_is_checked_against_the_weights_before_the_model_is_built(run_dir, tmp_path, monkeypatch):
    run = run_with_config(run_dir, tmp_path, lambda c: c["model"]["sam"].update(encoder_width=4096))
    built = []
    monkeypatch.setattr(ris_eval, "PromptRIS", lambda config: built.append(torch.get_default_device()) or
                        PromptRIS(config))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the model of .*config.json: \d+ keys differ, "
                                         r"the first '.*': file \(.*\) vs config \(.*4096"):
        ris_eval.load_run(run)
    assert built == [torch.device("meta")]  # only the shapes were built


def test_a_run_trained_from_clip_weights_without_its_vocabulary_is_refused(run_dir, tmp_path):
    run = run_with_config(run_dir, tmp_path, lambda c: c["train"].update(clip_weights="weights/ViT-B-16.safetensors"))
    with pytest.raises(ValueError, match="config.json: the run was trained from the CLIP weights .* without a BPE "
                                         "vocabulary .*python load_weights.py download vocab"):
        ris_eval.load_run(run)
