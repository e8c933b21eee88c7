"""Pictures of a run, drawn with numpy and PIL: machinery beside the method, importing no other file of this repo.

- Fig. 4-style panels (render_panel): the image with the final mask overlaid (the ground truth outlined) beside
  the coarse mask S'_C as a heat map with the point prompt, the sentence below; eval.py draws them for
  --save-vis and for --image with --out.
- Training curves (draw_curves): every loss term and the validation mIoU of train.py's log.jsonl against the
  step; train.py redraws curves.png in its run directory at every validation and at the end.
"""
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------
# Pictures (Fig. 4): final mask overlaid on the image | coarse mask heat map + point prompt
# ---------------------------------------------------------------------------------------------

MASK_COLOUR = (255, 64, 32)     # final prediction: semi-transparent fill + contour
GT_COLOUR = (32, 255, 64)       # ground truth: contour only
DISPLAY_SIDE = 1024             # panels are drawn with their longest side at most this long


def _erode_rows(mask: np.ndarray, r: int) -> np.ndarray:
    """(H, W) bool -> pixels whose whole column window [y - r, y + r] is set (edges replicated).
    Running sums: the cost is the same for any r."""
    padded = np.pad(mask, ((r, r), (0, 0)), mode="edge")
    sums = np.concatenate([np.zeros((1, mask.shape[1]), np.int32), np.cumsum(padded, axis=0, dtype=np.int32)])
    return sums[2 * r + 1:] - sums[:-(2 * r + 1)] == 2 * r + 1  # (H + 2r + 1) sums -> (H, W) window sums


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Boundary pixels of a (H, W) bool mask: the mask minus its erosion by a (2 width + 1)^2 square
    (what PIL's MinFilter computes, whose cost grows with the square's area; a square is two 1-D windows)."""
    eroded = _erode_rows(_erode_rows(mask, width).T, width).T
    return mask & ~eroded


def _shrink(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool or float map -> (h, w) at size (w, h), area-weighted (PIL's antialiased bilinear)."""
    if array.dtype == bool:  # as 8-bit grey: a quarter of the float work
        return np.asarray(Image.fromarray(array.view(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize(size, Image.BILINEAR))


def _heat(prob: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 'jet' colours (blue = 0, red = 1)."""
    x = 4.0 * prob[..., None]
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (255 * rgb).astype(np.uint8)


def overlay_mask(image: Image.Image, mask: np.ndarray, gt: np.ndarray | None = None) -> Image.Image:
    """The image (W, H) with the mask as a translucent colour and a solid contour, GT outlined."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    line = max(1, min(image.size) // 150)
    rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array(MASK_COLOUR)
    rgb[_contour(mask, line)] = MASK_COLOUR
    if gt is not None:
        rgb[_contour(gt.astype(bool), line)] = GT_COLOUR
    return Image.fromarray(rgb.astype(np.uint8))


def coarse_view(image: Image.Image, prob: np.ndarray, point_xy=None) -> Image.Image:
    """The coarse mask probability as a heat map over a dimmed image, with the point prompt marked."""
    grey = np.asarray(image.convert("L").convert("RGB")).astype(np.float32)
    view = Image.fromarray((0.35 * grey + 0.65 * _heat(prob)).astype(np.uint8))
    if point_xy is not None:
        x, y = point_xy
        r = max(4, min(image.size) // 40)
        draw = ImageDraw.Draw(view)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255), outline=(0, 0, 0), width=max(1, r // 3))
        draw.line((x - 2 * r, y, x + 2 * r, y), fill=(0, 0, 0), width=max(1, r // 4))
        draw.line((x, y - 2 * r, x, y + 2 * r), fill=(0, 0, 0), width=max(1, r // 4))
    return view


def _font(width: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(12, width // 40))


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def caption_height(text: str, width: int) -> int:
    """Height in pixels of the caption strip that render_panel puts under two images of `width`."""
    font = _font(width)
    line = font.getbbox("Ag")[3] + 4
    return len(_wrap(text, font, 2 * width - 8)) * line + 8


def render_panel(image: Image.Image, mask: np.ndarray, coarse_prob: np.ndarray, text: str,
                 point_xy=None, gt: np.ndarray | None = None, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """[image + final mask (+ GT outline) | coarse heat map + point], caption below: (2W, H + caption).

    mask, gt: (H, W) bool at the image's resolution; coarse_prob: (H, W) in [0, 1];
    point_xy: (x, y) in image pixels or None. An image longer than max_side is drawn scaled down to it
    (W, H then being the scaled size): a photo's panel stays a picture, and drawing it stays cheap.
    """
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if point_xy is not None:
            point_xy = (point_xy[0] * size[0] / image.width, point_xy[1] * size[1] / image.height)
        image, mask, coarse_prob = image.resize(size, Image.BILINEAR), _shrink(mask, size), _shrink(coarse_prob, size)
        gt = None if gt is None else _shrink(gt.astype(bool), size)
    w, h = image.size
    panel = Image.new("RGB", (2 * w, h + caption_height(text, w)), (255, 255, 255))
    panel.paste(overlay_mask(image, mask, gt), (0, 0))
    panel.paste(coarse_view(image, coarse_prob, point_xy), (w, 0))
    font = _font(w)
    line = font.getbbox("Ag")[3] + 4
    draw = ImageDraw.Draw(panel)
    for i, row in enumerate(_wrap(text, font, 2 * w - 8)):
        draw.text((4, h + 4 + i * line), row, fill=(0, 0, 0), font=font)
    return panel


# ---------------------------------------------------------------------------------------------
# Training curves: one small plot per loss term and per validation mIoU, from train.py's log.jsonl
# ---------------------------------------------------------------------------------------------

CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (23, 190, 207))
_NOT_CURVES = ("step", "epoch", "stage", "lr", "images_per_s", "elapsed_s", "skipped_images")  # log.jsonl keys that are no loss


def read_curves(log_jsonl) -> dict[str, list[tuple[int, float]]]:
    """{series: [(step, value), ...]} from a train.py log.jsonl: "loss" and every loss term of the
    training lines, then "val <output> mIoU" of the validation lines ({"step", "val": metrics})."""
    series: dict[str, list] = {}
    with open(log_jsonl) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "val" in record:
                    series.setdefault(f"val {record['val']['output']} mIoU", []).append(
                        (record["step"], record["val"]["mIoU"]))
                    continue
                for key, value in record.items():
                    if key not in _NOT_CURVES:
                        series.setdefault(key, []).append((record["step"], float(value)))
            except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
                raise ValueError(f"{log_jsonl}: line {n} is not a train.py log record ({type(e).__name__}: {e})")
    order = sorted(series, key=lambda k: (k != "loss") + k.startswith("val "))  # loss, terms, validations
    return {k: series[k] for k in order}


def draw_curves(log_jsonl, png_path, columns: int = 3, cell: tuple[int, int] = (360, 220)) -> Image.Image:
    """Plot every series of read_curves against the step, each in its own cell with its own value range
    (the terms differ by orders of magnitude) and a shared step axis; written to png_path, returned."""
    series = read_curves(log_jsonl)
    if not series:
        raise ValueError(f"{log_jsonl}: no training or validation lines to draw")
    columns = min(columns, len(series))
    rows = -(-len(series) // columns)
    width, height = cell
    canvas = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    last_step = max(step for points in series.values() for step, _ in points) or 1
    left, top, right, bottom = 56, 24, 12, 22  # margins of each plot inside its cell
    for i, (name, points) in enumerate(series.items()):
        x0, y0 = (i % columns) * width + left, (i // columns) * height + top
        x1, y1 = (i % columns + 1) * width - right, (i // columns + 1) * height - bottom
        values = [v for _, v in points]
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        xy = [(x0 + (x1 - x0) * step / last_step, y1 - (y1 - y0) * (v - low) / (high - low)) for step, v in points]
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        draw.rectangle((x0, y0, x1, y1), outline=(190, 190, 190))
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 20 else xy[-1:]:  # few points (validations): mark each one
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((x0, y0 - 18), f"{name}   last {values[-1]:.4g} (step {points[-1][0]})", fill=(0, 0, 0), font=font)
        for value, y in ((high, y0), (low, y1 - 12)):
            draw.text((x0 - 4, y), f"{value:.3g}", fill=(90, 90, 90), font=font, anchor="ra")
        draw.text((x0, y1 + 4), "0", fill=(90, 90, 90), font=font)
        draw.text((x1, y1 + 4), f"step {last_step}", fill=(90, 90, 90), font=font, anchor="ra")
    canvas.save(png_path)
    return canvas
