"""eval.py: the paper's metrics (§4.1, §4.4), evaluation of a run directory end to end, the Fig. 4 panel."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import eval as ris_eval
from prompt_ris import PROMPT_TYPES, PromptRIS, PromptRISConfig
from sam import ImageEncoderViT, resize_longest_side_shape


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
    data_root = data.make_synth(str(root / "data"), seed=0, n_train=1, n_val=3, n_testA=1, n_testB=1)
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
    assert Image.open(out).size == (2 * 140, 100 + ris_eval.caption_height(f'"{text}"', 140))


def test_panel_overlays_the_mask_on_the_unchanged_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), bool)
    mask[10:30, 10:30] = True
    panel = np.asarray(ris_eval.render_panel(image, mask, rng.random((40, 50)), "a caption", point_xy=(20, 20)))
    overlay = panel[:40, :50]
    assert np.array_equal(overlay[~mask], np.asarray(image)[~mask])  # outside the mask: the input image
    assert not np.array_equal(overlay[15:25, 15:25], np.asarray(image)[15:25, 15:25])  # inside: tinted


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
