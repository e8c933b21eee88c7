"""train.py: the loop learns, trains the same model in every batch layout and under DDP, and its options
(data hold-outs, the SAM cache, bf16, compile, memory flags) do what they say; resume, checkpoints and the
stops are in test_resume.py.

Every run uses a micro configuration on a micro built-in dataset (8 training images of 32 x 32
pixels for both towers, batches of 4 images x 2 sentences, 2 steps per epoch), so the whole file
stays within a few minutes on 2 CPU cores.
"""
import json
import math
import os
import pickle
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import prompt_ris
import runtime
import train
from helpers import assert_bitwise_equal, micro_args, pin_point_prompt, read_log, saved_state
from sam import ImageEncoderViT
from sam_cache import sam_cache_path
from test_data import tiny_records, write_tree

# ---- learning ----


def test_few_steps_lower_the_loss(micro_root, tmp_path):
    out = tmp_path / "run"
    result = train.main(micro_args(micro_root, out, "--images-per-batch", "8", "--epochs", "10",
                                   "--stage1-epochs", "10"))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 10 and result["step"] == 10
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    metrics = json.load(open(out / "metrics.json"))
    assert {"mIoU", "oIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"} <= metrics.keys()
    assert result["metrics"]["mIoU"] == metrics["mIoU"] and "mIoU" in result["untrained"]
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "train.log")
    assert result["peak_memory_mb"] > 0 and "peak memory" in (out / "train.log").read_text()  # printed at the end


def test_run_directory_loads_back_with_eval(one_step_run):
    out = one_step_run
    import eval as ris_eval
    model, _, run_config = ris_eval.load_run(str(out))
    trained = load_file(os.path.join(out, "model.safetensors"))
    assert_bitwise_equal(trained, {k: v for k, v in model.state_dict().items() if k in trained})
    assert run_config["train"]["max_steps"] == 1 and run_config["vocab"] is None
    assert run_config["held_out"]["synth:unc"]["kept"] == {"images": 8, "refs": 22}  # synth: one split per image


def test_curves_png_is_drawn_at_every_validation_and_at_the_end(micro_root, tmp_path, monkeypatch):
    out, drawn = tmp_path / "run", []

    def draw_and_record(log, png):
        drawn.append([r["step"] for r in read_log(out) if "val" in r])  # the validations logged so far
        return draw_curves(log, png)
    draw_curves = runtime.draw_curves
    monkeypatch.setattr(runtime, "draw_curves", draw_and_record)
    train.main(micro_args(micro_root, out, "--max-steps", "4", "--eval-every", "2"))
    assert drawn == [[2], [2, 4], [2, 4, 4]]  # steps 2 and 4, then the final validation (all val images)
    width, height = Image.open(out / "curves.png").size
    assert 600 <= width <= 1600 and 200 <= height <= 1000  # loss, clip_seg, icl_clip, sam_seg, icl_sam + 2 val


# ---- one randomness for every layout ----


# 2 steps of stage 1, then one end to end, where Gumbel noise and prompt dropout are drawn. Later steps are
# not compared: with near-uniform random masks, O of Eq. (7) is within 1e-4 of 1 and log(1 - O) turns the
# rounding of the summation order into 1e-3 of L_icl, which AdamW's first, sign-like updates amplify
LAYOUT_STEPS = 3


def conditioned_run(args: list) -> dict:
    """train.main(args) on condition_model's model, so that runs in two layouts differ only in float rounding."""
    real_build = train.build_model

    def build_model(tc):
        model, train_towers = real_build(tc)
        condition_model(model)
        return model, train_towers

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_model", build_model)
        return train.main(args)


@pytest.fixture(scope="module")
def whole_batch_log(micro_root, tmp_path_factory):
    """log.jsonl of one process running each global batch at once: the reference of the layout tests."""
    out = tmp_path_factory.mktemp("whole_batch")
    conditioned_run(micro_args(micro_root, out, "--max-steps", str(LAYOUT_STEPS)))
    return read_log(out)


def assert_same_losses(got, expected):
    """Loss terms of the same steps: 1e-4 relative at step 1 (the same weights, only summation order
    differs), 1e-3 after (the updates' rounding differences grow)."""
    got, expected = ([r for r in log if "loss" in r] for log in (got, expected))
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, LAYOUT_STEPS + 1))
    terms = [k for k in expected[-1] if k.startswith(("clip_seg", "icl", "sam_seg", "loss"))]
    assert "sam_seg" in terms and "icl_sam" in terms
    for a, b in zip(got, expected):
        for k in (k for k in terms if k in b):
            assert a[k] == pytest.approx(b[k], rel=1e-4 if a["step"] == 1 else 1e-3), (a["step"], k)


def test_micro_batches_train_the_same_model(micro_root, tmp_path, whole_batch_log):
    out = tmp_path / "micro"
    conditioned_run(micro_args(micro_root, out, "--max-steps", str(LAYOUT_STEPS), "--micro-batch", "2"))
    assert_same_losses(read_log(out), whole_batch_log)
    assert all(0 <= r["data_wait"] <= 1 for r in whole_batch_log if "loss" in r)


def test_micro_batch_gradient_equals_the_whole_batch_gradient(micro_root):
    """Eq. (9) of 4 images x 2 sentences at once, and as chunks of 3 + 1 images with each term weighted by its
    share (sentences for the seg terms, images for ICL): the same gradient. Training mode, keyed draws."""
    model, tc = micro_model(micro_root, "--no-train-towers", "--grad-clip", "0")
    train_set, _, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    first = train_set[0]  # one sentence: the chunks' shares of images (3/4) and sentences (5/7) then differ
    items = [{**first, **{k: first[k][:1] for k in ("tokens", "sentences", "masks", "ann_ids", "ref_ids",
                                                       "category_ids")}}] + [train_set[i] for i in range(1, 4)]
    procs = runtime.Processes(0, 0, 1, torch.device("cpu"))
    condition_model(model)  # both sides free of float ties (issue 9): the chunks only reorder the rounding
    grads, values = [], []

    class GradientOf:  # the optimizer train_step updates with: records the summed gradient instead
        def step(self):
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))

        def zero_grad(self, set_to_none):
            model.zero_grad(set_to_none=set_to_none)
    for size in (0, 3):
        chunks = train.collate_micro_batches(items, size, seed=0, epoch=0)
        values.append(train.train_step(model, model, chunks, GradientOf(), model.trainable_parameters(), 2, tc,
                                       procs, None, None, False, checkpoints.TrainState()))
    assert values[0].keys() == values[1].keys() == {"clip_seg", "icl_clip", "sam_seg", "icl_sam", "loss", "grad_norm"}
    # whole vectors are compared: a few gradients (e.g. of key biases) are exactly 0 up to rounding noise
    for k in values[0]:
        assert values[1][k] == pytest.approx(values[0][k], rel=1e-4), k
    assert grads[0].shape == grads[1].shape
    assert (grads[1] - grads[0]).norm() < 1e-3 * grads[0].norm()


def test_global_batch_is_the_same_images_for_any_number_of_processes():
    one = data.epoch_batches(50, epoch=3, seed=7, images_per_batch=8, rank=0, world=1)
    assert len(one) == 6 and sorted(i for b in one for i in b) != list(range(48))  # shuffled, tail dropped
    for world in (2, 4, 8):
        shares = [data.epoch_batches(50, 3, 7, 8, rank, world) for rank in range(world)]
        assert [sum((s[t] for s in shares), []) for t in range(6)] == one  # ranks laid end to end
    assert data.epoch_batches(50, 4, 7, 8, 0, 1) != one  # a new shuffle every epoch


def test_sample_keys_follow_the_image_not_the_layout(micro_root):
    tc = train.parse_args(micro_args(micro_root, "unused"))
    train_set, _, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    items = [train_set[i] for i in range(4)]
    whole = train.collate_micro_batches(items, 0, seed=0, epoch=1)
    chunks = train.collate_micro_batches(items[2:] + items[:2], 1, seed=0, epoch=1)
    assert len(whole) == 1 and len(chunks) == 4
    keys = whole[0]["sample_keys"]
    assert torch.equal(torch.cat([c["sample_keys"] for c in chunks]), torch.cat([keys[4:], keys[:4]]))
    assert len(set(keys.tolist())) == 8
    assert not torch.equal(train.collate_micro_batches(items, 0, seed=0, epoch=2)[0]["sample_keys"], keys)


# ---- what the hold-out of evaluation images takes from training ----


def write_gref(root, micro_root) -> tuple[list, int]:
    """G-Ref's two partitions over the same images: umd = the micro synth split; google's val holds two umd train
    images, one with all its refs and one through a single ref (google splits objects, not images), and its train
    the umd val/test images. Returns (the two images, how many umd train refs they carry)."""
    folder = root / "refcocog"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(micro_root, "synth", "instances.json"), folder)
    with open(os.path.join(micro_root, "synth", "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    with open(folder / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f)
    a, b = sorted({r["image_id"] for r in refs if r["split"] == "train"})[:2]
    one_of_b = next(r["ref_id"] for r in refs if r["image_id"] == b)
    google = [dict(r, split="val" if r["image_id"] == a or r["ref_id"] == one_of_b else "train") for r in refs]
    with open(folder / "refs(google).p", "wb") as f:
        pickle.dump(google, f)
    return [a, b], sum(r["split"] == "train" and r["image_id"] in (a, b) for r in refs)


@pytest.mark.parametrize("hold_out", [True, False])
def test_gref_other_partition_hold_out_is_a_choice_and_its_cost_is_logged(micro_root, tmp_path, hold_out):
    images, refs = write_gref(tmp_path, micro_root)
    out = tmp_path / "run"
    flag = "--hold-out-other-partition" if hold_out else "--no-hold-out-other-partition"
    tc = train.parse_args(micro_args(str(tmp_path), out, "--datasets", "refcocog", "--val-dataset", "refcocog", flag))
    train_set, _, report = train.build_data(tc, train.Tokenizer(None), master=True)
    log = runtime.RunLog(str(out), master=True, fresh=True)
    log.held_out(report)  # what main does right after build_data

    counts, google = report["refcocog:umd"], {"images": 2, "refs": refs}
    assert (counts["images"], counts["refs"]) == (8, 22)  # the micro synth train split
    assert counts["removed"]["val/test of the same dataset"] == {"images": 0, "refs": 0}
    lines = (out / "train.log").read_text().splitlines()
    if hold_out:
        assert counts["removed"]["G-Ref google val/test"] == google and "not_held_out" not in counts
        assert counts["kept"] == {"images": 6, "refs": 22 - refs}
        assert not set(images) & set(train_set.image_ids)
        assert lines == [f"refcocog:umd train: 8 images, 22 refs; held out 0 images / 0 refs (val/test of the same "
                         f"dataset), 2 images / {refs} refs (G-Ref google val/test); trained on 6 images, "
                         f"{22 - refs} refs"]
    else:
        assert list(counts["removed"]) == ["val/test of the same dataset"]
        assert counts["not_held_out"] == {"G-Ref google val/test": google}
        assert counts["kept"] == {"images": 8, "refs": 22} and set(images) <= set(train_set.image_ids)
        assert lines[1] == (f"refcocog:umd train: 2 images / {refs} refs of G-Ref google val/test are trained on "
                            "(--no-hold-out-other-partition): a score on that partition is not held out")
    assert len(train_set) == counts["kept"]["images"]
    assert json.load(open(out / "config.json"))["held_out"] == report


# ---- G-Ref's two partitions ----


def gref_records():
    """tiny_records plus image 5 with a training ref: umd trains on images 9 and 5, google evaluates on 5."""
    refs, instances = tiny_records()
    instances["images"].append({"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 20, "width": 30})
    instances["annotations"].append({**instances["annotations"][0], "id": 103, "image_id": 5})
    refs.append({**refs[0], "ref_id": 3, "ann_id": 103, "image_id": 5})
    google = [dict(r, split="val") if r["image_id"] == 5 else r for r in refs]
    return refs, google, instances


def test_gref_training_holds_out_the_eval_images_of_the_other_partition(tmp_path):
    """§4.2 / README "Training data": G-Ref umd and google split the same refs differently, so training on
    umd must not see google's val images when that refs file is present (its val(G) is reported too)."""
    umd, google, instances = gref_records()
    root = str(tmp_path / "refer")
    write_tree(root, umd, instances, dataset="refcocog", split_by="umd")
    args = ["--config", "demo", "--data-root", root, "--datasets", "refcocog", "--val-dataset", "refcocog",
            "--out", str(tmp_path / "run"), "--images-per-batch", "16",  # no full batch: the error gives the count
            "--overwrite"]  # the second start goes into the first's folder
    with pytest.raises(ValueError, match="^2 training images give no full batch"):
        train.main(args)
    write_tree(root, google, instances, dataset="refcocog", split_by="google")
    with pytest.raises(ValueError, match="^1 training images give no full batch"):
        train.main(args)


# ---- the distributed sampler ----


def test_ranks_together_see_exactly_the_global_batch_of_one_process():
    """Several GPUs (README "Running for days"): at every step of every epoch the two ranks' images are
    exactly one process's global batch of 8; the incomplete last batch is dropped alike."""
    def batches(world, rank, epoch):  # 23 images, as train.epoch_loader asks for them
        return data.epoch_batches(23, epoch, seed=0, images_per_batch=8, rank=rank, world=world)

    for epoch in (0, 1):
        one, (rank0, rank1) = batches(1, 0, epoch), (batches(2, rank, epoch) for rank in (0, 1))
        assert len(one) == len(rank0) == len(rank1) == 2  # 23 // 8
        for step in range(2):
            assert len(rank0[step]) == len(rank1[step]) == 4
            assert sorted(rank0[step] + rank1[step]) == sorted(one[step])
    assert batches(1, 0, 0) != batches(1, 0, 1)  # reshuffled every epoch


# ---- command line ----


def test_help_lists_every_knob_with_paper_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in train.TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "(paper: 0.0001; demo: 0.002)" in text and "[§4.2]" in text


def test_presets_paper_values_and_auto_choice(tmp_path):
    paper = train.parse_args(["--config", "paper"])
    assert (paper.lr, paper.lr_power, paper.epochs, paper.stage1_epochs) == (1e-4, 0.9, 50, 20)
    assert (paper.images_per_batch, paper.sentences_per_image, paper.clip_size, paper.sam_size,
            paper.n_prompts) == (16, 4, 480, 1024, 16)
    assert train.parse_args([]).config == "demo" and train.parse_args([]).out == "runs/demo"
    assert train.parse_args(["--data-root", str(tmp_path)]).config == "paper"
    assert train.parse_args(["--out", "elsewhere", "--lr", "3e-4"]).lr == 3e-4


def test_polynomial_decay_schedule():
    tc = train.parse_args(["--config", "paper"])
    assert train.lr_at(0, 100, tc) == 1e-4
    assert train.lr_at(50, 100, tc) == pytest.approx(1e-4 * 0.5 ** 0.9)
    assert train.lr_at(99, 100, tc) == pytest.approx(1e-4 * 0.01 ** 0.9)


# ---- memory and speed options ----


def micro_model(root, *extra):
    tc = train.parse_args(micro_args(root, "unused", *extra))
    torch.manual_seed(0)
    model, _ = train.build_model(tc)
    return model, tc


def micro_batch(root, tc, images):
    tokenizer = train.Tokenizer(None)
    train_set, _, _ = train.build_data(tc, tokenizer, master=True)
    return data.collate([train_set[i] for i in images])


def test_no_icl_removes_both_icl_terms_of_eq_9(micro_root):
    model, tc = micro_model(micro_root)
    batch = micro_batch(micro_root, tc, range(4))
    with_icl = train.forward_losses(model.eval(), batch, "cpu", use_sam=True)
    without = train.forward_losses(model, batch, "cpu", use_sam=True, icl=False)
    assert with_icl.keys() == {"clip_seg", "icl_clip", "sam_seg", "icl_sam", "loss"}
    assert without.keys() == {"clip_seg", "sam_seg", "loss"}
    torch.testing.assert_close(without["loss"], without["clip_seg"] + without["sam_seg"])
    assert train.parse_args(["--no-icl"]).icl is False and train.parse_args([]).icl is True


def test_seen_only_trains_on_refs_of_seen_categories(tmp_path):
    from test_data import write_ov_refer  # refs of seen, unseen and neither-split COCO categories
    root = write_ov_refer(str(tmp_path))
    flags = ["--config", "demo", "--data-root", root, "--datasets", "refcoco", "--val-dataset", "refcoco"]
    for extra, dropped, categories in (([], 0, [1, 18, 10, 3, 5, 88]), (["--seen-only"], 4, [1, 3])):
        train_set, _, _ = train.build_data(train.parse_args(flags + extra), train.Tokenizer(None), master=True)
        assert train_set.dropped_refs == dropped
        assert [r["category_id"] for p in train_set.pairs for r, _ in p[::2]] == categories


def sentence_pattern(tokens: torch.Tensor, cells: int) -> torch.Tensor:
    """A fixed pattern per sentence, from its token ids alone: tokens (N, L) -> (N, cells), values in +-[1, 3].
    Integer arithmetic, then float64, so a sentence gets the same pattern in every batch layout; zero padding
    does not change it."""
    code = (tokens * torch.arange(1, tokens.shape[1] + 1)).sum(1) % 9973  # (N,)
    wave = torch.sin(code.double()[:, None] * torch.arange(1, cells + 1, dtype=torch.float64) * 0.618034)
    return (wave.sign() * (1 + 2 * wave.abs())).float()


def condition_model(model):
    """A random model made safe for comparing runs that differ only in float rounding (issue 9).

    A random model's masks hardly depend on the sentence and sit near 0. ICL's w_i (Eq. 8) thresholds them
    at 0, and for two sentences of different instances O_ij = 1 - 1e-6 lies at Eq. (8)'s clamp 1 - eps, where
    one ulp of O_ij switches a gradient of size 1 / eps. Forward hooks add a fixed pattern to every sentence's
    coarse logits S'_C (all cells but the first) and final mask logits, pixel by pixel (sentence_pattern of its
    tokens: a constant, so the gradient is unchanged). Masks are then well away from the threshold and O_ij
    well below 1. The point of Eq. (3) is pinned at cell 0 (helpers.pin_point_prompt)."""
    tokens = {}

    def keep_tokens(module, args, kwargs):
        tokens["now"] = (args[1] if len(args) > 1 else kwargs["tokens"]).cpu()

    def add_pattern(logits, skip_first=False):  # logits (N, ...) + each sentence's pattern over its cells
        pattern = sentence_pattern(tokens["now"], logits[0].numel()).view_as(logits).to(logits.device)
        if skip_first:
            pattern[:, 0] = 0
        return logits + pattern

    model.register_forward_pre_hook(keep_tokens, with_kwargs=True)
    model.decoder.register_forward_hook(lambda module, args, coarse: add_pattern(coarse, skip_first=True))
    pin_point_prompt(model)
    model.register_forward_hook(lambda module, args, out: {**out, "mask": add_pattern(out["mask"])}
                                if "mask" in out else out)


def test_grad_checkpoint_gives_the_same_gradients(micro_root, monkeypatch):
    calls = []
    real_checkpoint = prompt_ris.checkpoint
    monkeypatch.setattr(prompt_ris, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    grads = []
    for extra in ((), ("--grad-checkpoint",)):
        model, tc = micro_model(micro_root, *extra)
        model.cmp.grad_checkpoint = bool(extra)
        model.eval()  # deterministic: no Gumbel noise, no prompt dropout
        condition_model(model)
        batch = micro_batch(micro_root, tc, range(4))  # recomputation may round differently
        train.forward_losses(model, batch, "cpu", use_sam=True)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 4  # tiny CLIP: 2 vision + 2 text blocks recomputed, only with the flag
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_sam_embedding_cache_matches_the_encoder(micro_root, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    train.main(micro_args(micro_root, out, "--no-train-towers", "--stage1-epochs", "0", "--max-steps", "2",
                          "--cache-sam", str(cache)))
    (key,) = os.listdir(cache)
    files = sorted(os.listdir(cache / key))
    assert len(files) == 8  # every training image once after one epoch
    model, tc = micro_model(micro_root, "--no-train-towers")
    batch = micro_batch(micro_root, tc, [0])
    with torch.no_grad():
        expected = model.encode_sam_image(batch["sam_images"])[0]
    image_id = int(batch["image_ids"][0])
    path = data.load_refs(micro_root, "synth", "unc").images[image_id]["path"]
    cached = torch.load(sam_cache_path(str(cache / key), image_id, path), weights_only=True)
    torch.testing.assert_close(cached, expected)


def autocast_during_forward(monkeypatch) -> list:
    """(autocast enabled, its dtype) on the CPU at every PromptRIS forward."""
    states, forward = [], prompt_ris.PromptRIS.forward

    def recording(self, *args, **kwargs):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(prompt_ris.PromptRIS, "forward", recording)
    return states


@pytest.mark.parametrize("dtype, autocast", [("bfloat16", True), ("auto", False)])  # auto: float32 on CPU
def test_dtype_flag_runs_training_and_validation_under_bf16_autocast(micro_root, tmp_path, monkeypatch, dtype,
                                                                     autocast):
    states = autocast_during_forward(monkeypatch)
    result = train.main(micro_args(micro_root, tmp_path / "run", "--dtype", dtype, "--stage1-epochs", "0",
                                   "--max-steps", "1"))
    assert len(states) >= 3  # validation before and after, and the training step
    if autocast:
        assert set(states) == {(True, torch.bfloat16)}
    else:
        assert not any(enabled for enabled, _ in states)
    assert math.isfinite(result["metrics"]["mIoU"])


def test_compile_flag_compiles_the_model_and_checkpoints_the_plain_module(micro_root, tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile (here a stand-in that adds a prefix, as the real one adds
    `_orig_mod.`); checkpoints and model.safetensors hold the unwrapped module."""
    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or Compiled(module))
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--compile", "--max-steps", "1"))
    assert len(compiled) == 1 and isinstance(compiled[0], prompt_ris.PromptRIS)
    model, _ = micro_model(micro_root)
    weights, _, ckpt = saved_state(out)
    assert ckpt["model"].keys() == model.state_dict().keys() and weights.keys() <= model.state_dict().keys()


def test_sam_cache_is_keyed_by_the_sam_weights(micro_root, tmp_path):
    """--cache-sam: another SAM (seed 1) gets its own entry, the same SAM (seed 0 again) finds its own."""
    cache = tmp_path / "cache"
    for seed in (0, 1, 0):
        train.main(micro_args(micro_root, tmp_path / f"run{seed}", "--no-train-towers", "--stage1-epochs", "0",
                              "--max-steps", "1", "--cache-sam", str(cache), "--seed", str(seed), "--overwrite"))
    assert len(os.listdir(cache)) == 2


def test_sam_image_encoder_runs_once_per_image_of_a_training_batch(micro_root, tmp_path, monkeypatch):
    """4 images x 2 sentences per step: SAM's image encoder sees the 4 images (here SAM trains, so the model
    encodes them itself; frozen, train.py encodes them once or reads the cache, see above)."""
    encoded, forward = [], ImageEncoderViT.forward
    monkeypatch.setattr(ImageEncoderViT, "forward",
                        lambda self, x: encoded.append((self.training, len(x))) or forward(self, x))
    train.main(micro_args(micro_root, tmp_path / "run", "--stage1-epochs", "0", "--max-steps", "2"))
    assert [n for training, n in encoded if training] == [4, 4]


# ---- several processes ----


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _ddp_worker(rank, world, port, grad_port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # the real path: torchrun's environment, gloo, each rank's share in micro-batches, rank-0 files
    conditioned_run(micro_args(root, os.path.join(out, "run"), "--max-steps", str(LAYOUT_STEPS), "--micro-batch", "1"))
    # gradients of one global batch of 4 images, 2 per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{grad_port}", rank=rank, world_size=world)
    model, tc = micro_model(root)
    condition_model(model)
    batch = micro_batch(root, tc, [rank, rank + 2])
    outputs = []
    model.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    ddp = DDP(model, find_unused_parameters=True)
    grads = {}
    for use_sam in (False, True):
        model.train(not use_sam)  # stage 2 in eval mode: no Gumbel noise, no prompt dropout
        train.forward_losses(ddp, batch, "cpu", use_sam=use_sam)["loss"].backward()
        grads[use_sam] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    torch.save({"grads": grads, "point": outputs[-1]["point"]}, os.path.join(out, f"grads{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_ddp_averages_gradients_like_one_process(micro_root, tmp_path, whole_batch_log):
    mp.start_processes(_ddp_worker, args=(2, *_free_ports(2), micro_root, str(tmp_path)), nprocs=2, start_method="fork")
    run = tmp_path / "run"
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == LAYOUT_STEPS and len(ckpt["rng"]) == 2  # both ranks' random states
    model, tc = micro_model(micro_root)
    assert ckpt["model"].keys() == model.state_dict().keys()  # the unwrapped module, no "module." prefix
    assert_same_losses(read_log(run), whole_batch_log)  # rank 0 logs alone, the same run as one process

    # gradients of the same global batch in one process, both runs free of float ties (issue 9)
    condition_model(model)
    batch = micro_batch(micro_root, tc, [0, 2, 1, 3])
    outputs = []
    model.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    saved = [torch.load(tmp_path / f"grads{rank}.pt", weights_only=True) for rank in (0, 1)]
    for use_sam in (False, True):
        model.train(not use_sam)
        train.forward_losses(model, batch, "cpu", use_sam=use_sam)["loss"].backward()
        single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for rank in (0, 1):
            ddp_grads = saved[rank]["grads"][use_sam]
            for name in single.keys() | ddp_grads.keys():  # an unused parameter: None or zeros
                expected = single.get(name, torch.zeros_like(ddp_grads.get(name, torch.empty(0))))
                got = ddp_grads.get(name, torch.zeros_like(expected))
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6,
                                           msg=f"rank {rank} {name} (use_sam={use_sam})")
        model.zero_grad(set_to_none=True)
    # what the SAM-side comparison relies on: the same point everywhere, no mask logit near the threshold
    assert outputs[-1]["point"].eq(0).all() and all(s["point"].eq(0).all() for s in saved)
    assert outputs[-1]["mask"].abs().min() > 0.5


def test_skip_bad_images_flag_reaches_the_training_set_and_evaluation_never_skips(micro_root):
    for flags, skips in (([], False), (["--skip-bad-images"], True)):
        train_set, val_set, _ = train.build_data(train.parse_args(micro_args(micro_root, "unused", *flags)),
                                                 train.Tokenizer(None), master=True)
        assert train_set.skip_bad_images is skips and not hasattr(val_set, "skip_bad_images")


def test_skipped_training_images_are_counted_at_each_epoch_end(micro_root, tmp_path, monkeypatch):
    read_image = data.RefTrainSet.read_image

    def image_3_is_broken(self, i):
        if i == 3:
            raise OSError(f"cannot open image {self.data.images[self.image_ids[i]]['path']}")
        return read_image(self, i)

    monkeypatch.setattr(data.RefTrainSet, "read_image", image_3_is_broken)
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--skip-bad-images", "--max-steps", "2"))  # epoch 0: steps 1 and 2
    train_set, _, _ = train.build_data(train.parse_args(micro_args(micro_root, out)), train.Tokenizer(None), True)
    path = train_set.data.images[train_set.image_ids[3]]["path"]
    assert f"epoch 0: 1 training images skipped (--skip-bad-images): {path}" in (out / "train.log").read_text()
    assert {"step": 2, "epoch": 0, "skipped_images": [path]} in read_log(out)
