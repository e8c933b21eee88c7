"""viz.py: the Fig. 4-style panel and the training curves of train.py's log.jsonl."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

import viz


# ---- the Fig. 4 panel ----


def test_panel_overlays_the_mask_on_the_unchanged_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), bool)
    mask[10:30, 10:30] = True
    panel = np.asarray(viz.render_panel(image, mask, rng.random((40, 50)), "a caption", point_xy=(20, 20)))
    overlay = panel[:40, :50]
    assert np.array_equal(overlay[~mask], np.asarray(image)[~mask])  # outside the mask: the input image
    assert not np.array_equal(overlay[15:25, 15:25], np.asarray(image)[15:25, 15:25])  # inside: tinted


def test_contour_is_the_mask_minus_its_square_erosion_like_pil_min_filter():
    rng = np.random.default_rng(0)
    for width in (1, 3):
        mask = rng.random((37, 53)) < 0.8
        mask[5:30, 10:40] = True
        eroded = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1)))
        assert np.array_equal(viz._contour(mask, width), mask & ~(eroded > 0))


# ---- training curves ----


def test_draw_curves_plots_every_loss_term_and_validation(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "epoch": 0, "stage": 1, "lr": 1e-3, "clip_seg": 1.0 / s, "icl_clip": 0.1 * s,
              "loss": 1.0 / s + 0.1 * s, "images_per_s": 5.0, "elapsed_s": s} for s in (1, 2, 3)]
    lines.append({"step": 3, "val": {"output": "coarse", "mIoU": 12.5, "oIoU": 10.0}})
    lines += [{"step": s, "epoch": 1, "stage": 2, "lr": 1e-3, "clip_seg": 0.2, "icl_clip": 0.1, "sam_seg": 2.0 / s,
               "loss": 0.3 + 2.0 / s, "images_per_s": 5.0, "elapsed_s": s} for s in (4, 5, 6)]
    lines.append({"step": 6, "val": {"output": "mask", "mIoU": 40.0, "oIoU": 30.0}})
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    names = ["loss", "clip_seg", "icl_clip", "sam_seg", "val coarse mIoU", "val mask mIoU"]
    assert list(viz.read_curves(log)) == names
    canvas = np.asarray(viz.draw_curves(log, tmp_path / "curves.png", columns=3, cell=(300, 200)))
    assert Image.open(tmp_path / "curves.png").size == (900, 400)
    for i, name in enumerate(names):  # each series' colour is drawn inside its own cell
        cell = canvas[(i // 3) * 200:(i // 3 + 1) * 200, (i % 3) * 300:(i % 3 + 1) * 300]
        assert (cell == viz.CURVE_COLOURS[i]).all(-1).sum() > 20, name


def test_draw_curves_names_a_line_that_is_not_a_log_record(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl: line 2"):
        viz.draw_curves(log, tmp_path / "curves.png")


def test_draw_curves_names_a_line_nested_too_deeply(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match="log.jsonl: line 2 is not a train.py log record \\(RecursionError"):
        viz.draw_curves(log, tmp_path / "curves.png")
