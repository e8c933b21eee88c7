"""train.py: the loop learns, resumes bitwise, runs under DDP and fails loudly.

Every run uses a micro configuration on a micro built-in dataset (8 training images of 32 x 32
pixels for both towers, batches of 4 images x 2 sentences, 2 steps per epoch), so the whole file
stays within a few minutes on 2 CPU cores.
"""
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import prompt_ris
import train
from helpers import pin_point_prompt
from sam import ImageEncoderViT
from test_data import WritesMarker, tiny_records, write_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_args(root, out, *extra):
    """2 steps per epoch, stage 1 (coarse mask only) in epoch 0, end to end from epoch 1."""
    return ["--config", "demo", "--data-root", root, "--out", str(out), "--clip-size", "32", "--sam-size", "32",
            "--images-per-batch", "4", "--sentences-per-image", "2", "--epochs", "4", "--stage1-epochs", "1",
            "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def one_step_run(micro_root, tmp_path_factory):
    """A finished 1-step micro run, read by several tests; a test that changes it works on a copy (copy_run)."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    train.main(micro_args(micro_root, out, "--max-steps", "1"))
    return out


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_state(out):
    """Weights (model.safetensors) and the optimizer's moments of a finished run."""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    moments = {f"{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}
    return load_file(os.path.join(out, "model.safetensors")), moments, ckpt


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


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
    draw_curves = train.draw_curves
    monkeypatch.setattr(train, "draw_curves", draw_and_record)
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
    model, tc = micro_model(micro_root, "--no-train-towers")
    train_set, _, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    first = train_set[0]  # one sentence: the chunks' shares of images (3/4) and sentences (5/7) then differ
    items = [{**first, **{k: first[k][:1] for k in ("tokens", "sentences", "masks", "ann_ids", "ref_ids",
                                                       "category_ids")}}] + [train_set[i] for i in range(1, 4)]
    procs = train.Processes(0, 0, 1, torch.device("cpu"))
    condition_model(model)  # both sides free of float ties (issue 9): the chunks only reorder the rounding
    grads, values = [], []
    for size in (0, 3):
        model.zero_grad(set_to_none=True)
        chunks = train.collate_micro_batches(items, size, seed=0, epoch=0)
        terms = train.accumulate_gradients(model, model, chunks, 2, tc, procs, None, None, False)
        values.append({k: float(v) for k, v in terms.items()})
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert values[0].keys() == values[1].keys() == {"clip_seg", "icl_clip", "sam_seg", "icl_sam", "loss"}
    # whole vectors are compared: a few gradients (e.g. of key biases) are exactly 0 up to rounding noise
    for k in values[0]:
        assert values[1][k] == pytest.approx(values[0][k], rel=1e-4), k
    assert grads[0].shape == grads[1].shape
    assert (grads[1] - grads[0]).norm() < 1e-3 * grads[0].norm()


def test_global_batch_is_the_same_images_for_any_number_of_processes():
    one = train.epoch_batches(50, epoch=3, seed=7, images_per_batch=8, rank=0, world=1)
    assert len(one) == 6 and sorted(i for b in one for i in b) != list(range(48))  # shuffled, tail dropped
    for world in (2, 4, 8):
        shares = [train.epoch_batches(50, 3, 7, 8, rank, world) for rank in range(world)]
        assert [sum((s[t] for s in shares), []) for t in range(6)] == one  # ranks laid end to end
    assert train.epoch_batches(50, 4, 7, 8, 0, 1) != one  # a new shuffle every epoch


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


# ---- resume ----


def test_resume_after_stop_reproduces_uninterrupted_run_bitwise(micro_root, tmp_path):
    # 6 steps cross the stage switch (step 3) and an epoch boundary; the stop at 3 is mid-epoch
    common = ["--save-every", "2", "--eval-every", "2"]
    train.main(micro_args(micro_root, tmp_path / "straight", *common, "--max-steps", "6"))
    train.main(micro_args(micro_root, tmp_path / "stopped", *common, "--max-steps", "3"))
    train.main(micro_args(micro_root, tmp_path / "stopped", *common, "--max-steps", "6", "--resume"))
    weights_a, moments_a, ckpt_a = saved_state(tmp_path / "straight")
    weights_b, moments_b, ckpt_b = saved_state(tmp_path / "stopped")
    assert_bitwise_equal(weights_a, weights_b)
    assert_bitwise_equal(moments_a, moments_b)
    assert (ckpt_a["step"], ckpt_a["epoch"], ckpt_a["batch_in_epoch"]) == (ckpt_b["step"], 3, 0)
    steps = [r["step"] for r in read_log(tmp_path / "stopped") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_after_sigkill_reproduces_uninterrupted_run_bitwise(micro_root, tmp_path):
    killed = tmp_path / "killed"
    args = micro_args(micro_root, killed, "--epochs", "100", "--save-every", "1")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            log = killed / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    resumed_from = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert resumed_from >= 2
    n = resumed_from + 2
    train.main(micro_args(micro_root, killed, "--epochs", "100", "--save-every", "1", "--max-steps", str(n),
                          "--resume"))
    # the uninterrupted run saves only at its end: a checkpoint reads the random state, never advances it
    train.main(micro_args(micro_root, tmp_path / "straight", "--epochs", "100", "--max-steps", str(n)))
    weights_a, moments_a, _ = saved_state(tmp_path / "straight")
    weights_b, moments_b, _ = saved_state(killed)
    assert_bitwise_equal(weights_a, weights_b)
    assert_bitwise_equal(moments_a, moments_b)


def test_resume_with_another_model_config_is_refused(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: saved for a different model.*'n_prompts'"):
        train.main(micro_args(micro_root, out, "--resume", "--n-prompts", "2"))


def test_resume_with_another_number_of_processes_is_refused(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, out / "ckpt.pt")  # the RNG states of two ranks, as 2 processes save
    with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: written by 2 processes, resumed with 1"):
        train.main(micro_args(micro_root, out, "--resume"))


def test_resume_without_flags_takes_the_run_config(micro_root, one_step_run):
    out = one_step_run
    tc = train.parse_args(["--resume", "--out", str(out)])
    assert (tc.clip_size, tc.images_per_batch, tc.data_root, tc.max_steps) == (32, 4, micro_root, 0)


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
    log = train.RunLog(str(out), master=True, fresh=True)
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


# ---- the best checkpoint (--keep-best) ----


def scripted_validation(monkeypatch, scores: list, seen: list):
    """train.validate returns oIoU = the next of `scores` and mIoU = 100 - it, and keeps the weights it scored."""
    calls = iter(scores)

    def validate(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        score = next(calls)
        return {"output": "mask", "oIoU": score, "mIoU": 100.0 - score, "n": 8} | {
            f"P@{x}": 0.0 for x in (0.5, 0.6, 0.7, 0.8, 0.9)}

    monkeypatch.setattr(train, "validate", validate)


def test_best_checkpoint_keeps_the_earlier_weights_when_the_score_goes_down(micro_root, tmp_path, monkeypatch):
    # validations: untrained, steps 1-2 (stage 1: the coarse mask's scores, never the best), steps 3-5, final
    seen = []
    scripted_validation(monkeypatch, [50.0, 90.0, 95.0, 30.0, 40.0, 20.0, 20.0], seen)
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--eval-every", "1", "--max-steps", "5"))  # --keep-best oIoU
    assert json.load(open(out / "metrics.json"))["best"] == {"step": 4, "metric": "oIoU", "score": 40.0,
                                                             "expressions": 8}
    assert_bitwise_equal(load_file(out / "best.safetensors"), seen[4])  # the weights validated at step 4
    last = load_file(out / "model.safetensors")
    assert any(not torch.equal(v, last[k]) for k, v in seen[4].items())
    assert "step 4: best val oIoU so far (40.00), saved as best.safetensors" in (out / "train.log").read_text()


def test_keep_best_follows_the_chosen_score_and_keeps_the_earlier_of_a_tie(tmp_path):
    out = tmp_path / "run"
    log = train.RunLog(str(out), master=True, fresh=True)
    model = torch.nn.Linear(2, 1)
    for metric, best_step in (("mIoU", 2), ("oIoU", 1), ("none", None)):
        tc, state = train.parse_args(["--out", str(out), "--keep-best", metric]), train.TrainState()
        for step, (o, m) in enumerate([(60.0, 50.0), (40.0, 70.0), (60.0, 70.0)], start=1):
            state.step = step
            with torch.no_grad():
                model.bias.fill_(step)
            train.keep_best(model, {"oIoU": o, "mIoU": m, "n": 3}, state, tc, log)
        if best_step is None:
            assert state.best is None and not (out / "best.safetensors").exists()
        else:
            assert state.best["step"] == best_step
            assert train.read_best(str(out / "best.safetensors")) == state.best  # the record in the file's header
            assert load_file(out / "best.safetensors")["bias"].item() == best_step
            (out / "best.safetensors").unlink()


def test_resume_keeps_the_best_score(micro_root, tmp_path, monkeypatch):
    # all in stage 2; ckpt.pt of step 3 (saved before step 3's validation) holds the best of step 2
    common = ["--stage1-epochs", "0", "--eval-every", "1", "--save-every", "3"]
    scripted_validation(monkeypatch, [0.0, 10.0, 30.0, 20.0, 20.0], [])
    out, old = tmp_path / "run", tmp_path / "old"
    train.main(micro_args(micro_root, out, *common, "--max-steps", "3"))
    best_weights = (out / "best.safetensors").read_bytes()
    shutil.copytree(out, old)
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    assert ckpt["best"]["step"] == 2
    del ckpt["best"]  # a checkpoint written before --keep-best existed
    torch.save(ckpt, old / "ckpt.pt")

    scripted_validation(monkeypatch, [25.0, 25.0], [])  # step 4 and the final validation: below 30
    train.main(micro_args(micro_root, out, *common, "--max-steps", "4", "--resume"))
    assert json.load(open(out / "metrics.json"))["best"] == {"step": 2, "metric": "oIoU", "score": 30.0,
                                                             "expressions": 8}
    assert (out / "best.safetensors").read_bytes() == best_weights

    scripted_validation(monkeypatch, [25.0, 25.0], [])  # the old checkpoint resumes; its best starts anew
    train.main(micro_args(micro_root, old, *common, "--max-steps", "4", "--resume"))
    assert json.load(open(old / "metrics.json"))["best"]["step"] == 4


def test_resumed_best_describes_the_file_on_disk(tmp_path):
    out = tmp_path / "run"
    log = train.RunLog(str(out), master=True, fresh=True)
    record = {"step": 5, "metric": "oIoU", "score": 35.0, "expressions": 8}
    train.save_run_model(torch.nn.Linear(2, 1), str(out / "best.safetensors"), {"best": json.dumps(record)})
    older = {"step": 4, "metric": "oIoU", "score": 30.0, "expressions": 8}
    tc = train.parse_args(["--out", str(out)])
    # written at the checkpoint's step (the validation follows the save) or later: the file's record
    assert train.resumed_best(train.TrainState(step=5, best=older), tc, log) == record
    assert train.resumed_best(train.TrainState(step=6, best=older), tc, log) == older
    # another score now: the record is dropped; none also drops the file
    assert train.resumed_best(train.TrainState(step=6, best=older), replace(tc, keep_best="mIoU"), log) is None
    assert (out / "best.safetensors").exists()
    assert train.resumed_best(train.TrainState(step=6, best=older), replace(tc, keep_best="none"), log) is None
    assert not (out / "best.safetensors").exists()


# ---- checkpoints and failures ----


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    path = out / "ckpt.pt"
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint at all"):
        path.write_bytes(damaged)
        with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: corrupt or truncated checkpoint"):
            train.main(micro_args(micro_root, out, "--resume"))


def test_checkpoint_holding_code_is_refused_without_running_it(micro_root, one_step_run, tmp_path):
    """Untrusted files: ckpt.pt is read with torch.load(weights_only=True), which runs no pickled code."""
    out = copy_run(one_step_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": WritesMarker(str(marker))}, out / "ckpt.pt")
    with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: corrupt or truncated checkpoint"):
        train.main(micro_args(micro_root, out, "--resume"))
    assert not marker.exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")

    def crash_midway(f):
        f.write(b"half of a new checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train.atomic_write(str(path), crash_midway)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """The data is on disk before the new name points to it, and the rename itself is made durable after."""
    path, calls = tmp_path / "ckpt.pt", []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    train.atomic_write(str(path), lambda f: f.write(b"new"))
    tmp = f"{path}.tmp{os.getpid()}"
    assert calls == [("fsync", tmp), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_missing_weights_file_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    args = ["--clip-weights", str(tmp_path / "clip.safetensors"), "--sam-weights", str(tmp_path / "sam.safetensors"),
            "--data-root", str(tmp_path), "--out", str(out)]
    with pytest.raises(FileNotFoundError, match=r"--clip-weights .*clip\.safetensors: no such file; run .python load_weights.py download clip"):
        train.main(args)
    assert not out.exists()


def test_missing_data_fails_before_any_work(tmp_path):
    for name in ("clip.safetensors", "sam.safetensors"):
        (tmp_path / name).write_bytes(b"")  # present: the data check comes before reading them
    out = tmp_path / "run"
    args = ["--clip-weights", str(tmp_path / "clip.safetensors"), "--sam-weights", str(tmp_path / "sam.safetensors"),
            "--data-root", str(tmp_path / "refer"), "--out", str(out)]
    with pytest.raises(FileNotFoundError, match=r"refcoco/refs\(unc\)\.p.*python data.py download"):
        train.main(args)
    assert not out.exists()


def test_paper_config_without_weights_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="--config paper needs --clip-weights, --sam-weights, --data-root"):
        train.main(["--config", "paper", "--out", str(tmp_path / "run")])


def test_out_of_memory_stops_with_the_flags_that_lower_it(micro_root, tmp_path, monkeypatch):
    calls = []

    def out_of_memory_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward_losses(*args, **kwargs)

    real_forward_losses = train.forward_losses
    monkeypatch.setattr(train, "forward_losses", out_of_memory_at_third_step)
    out = tmp_path / "run"
    with pytest.raises(train.OutOfMemory) as error:
        train.main(micro_args(micro_root, out, "--save-every", "1"))
    message = str(error.value)
    assert message.startswith("step 3: out of memory on cpu") and "\n" not in message
    for flag in ("--micro-batch 2", "--grad-checkpoint", "--dtype bfloat16", "--cache-sam"):
        assert flag in message
    assert "(step 2)" in message and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_num_workers_auto_is_none_on_cpu_several_on_cuda(monkeypatch):
    tc = train.parse_args(["--num-workers", "-1"])  # -1 = auto
    assert tc.num_workers == -1 and train.parse_args([]).num_workers == -1
    assert train.loader_workers(tc, torch.device("cpu")) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.loader_workers(tc, torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert train.loader_workers(tc, torch.device("cuda")) == 8
    assert train.loader_workers(train.parse_args(["--num-workers", "3"]), torch.device("cuda")) == 3


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def nan_term(terms):
    terms["clip_seg"] = terms["clip_seg"] * float("nan")
    terms["loss"] = sum(v for k, v in terms.items() if k != "loss")


def infinite_gradient(terms):  # train.accumulate_gradients sums the terms again: break one of them
    terms["clip_seg"] = InfiniteGradient.apply(terms["clip_seg"])


@pytest.mark.parametrize("break_terms,message", [(nan_term, r"loss term 'clip_seg' is nan"),
                                                 (infinite_gradient, r"gradient norm is (inf|nan)")])
def test_a_non_finite_loss_or_gradient_stops_before_the_update(micro_root, tmp_path, monkeypatch, break_terms,
                                                               message):
    """At step 3 the loss or its gradient is not finite: the run stops naming the step and what, and the last
    checkpoint (step 2) stays finite."""
    calls = []

    def broken_at_third_step(*args, **kwargs):
        terms = real_total_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            break_terms(terms)
        return terms

    real_total_loss = train.total_loss
    monkeypatch.setattr(train, "total_loss", broken_at_third_step)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=rf"step 3: {message}.*\(step 2\)"):
        train.main(micro_args(micro_root, out, "--save-every", "1"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


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
            "--out", str(tmp_path / "run"), "--images-per-batch", "16"]  # no full batch: the error gives the count
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
        return train.epoch_batches(23, epoch, seed=0, images_per_batch=8, rank=rank, world=world)

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
    cached = torch.load(cache / key / f"{int(batch['image_ids'][0])}.pt", weights_only=True)
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
                              "--max-steps", "1", "--cache-sam", str(cache), "--seed", str(seed)))
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
