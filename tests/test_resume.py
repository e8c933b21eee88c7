"""train.py's checkpoints: a stopped or killed run resumes bitwise, the best checkpoint survives a resume,
a bad checkpoint or an impossible resume is a clear error, a save never leaves a torn file, and a run stops
before an update that would corrupt it (non-finite loss or gradient, out of memory).

The same micro runs as test_train.py (tests/helpers.py: micro_args).
"""
import contextlib
import errno
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import fields, replace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import checkpoints
import runtime
import train
from helpers import assert_bitwise_equal, copy_run, micro_args, read_log, saved_state
from test_data import WritesMarker


# ---- resume ----


def test_resume_after_stop_reproduces_uninterrupted_run_bitwise(micro_root, tmp_path):
    # 6 steps cross the stage switch (step 3) and an epoch boundary; the stop at 3 is mid-epoch. The
    # uninterrupted run saves and validates only at its end: saving and validating must not move the random streams
    common = ["--save-every", "2", "--eval-every", "2"]
    train.main(micro_args(micro_root, tmp_path / "straight", "--max-steps", "6"))
    train.main(micro_args(micro_root, tmp_path / "stopped", *common, "--max-steps", "3"))
    train.main(micro_args(micro_root, tmp_path / "stopped", *common, "--max-steps", "6", "--resume"))
    weights_a, moments_a, ckpt_a = saved_state(tmp_path / "straight")
    weights_b, moments_b, ckpt_b = saved_state(tmp_path / "stopped")
    assert_bitwise_equal(weights_a, weights_b)
    assert_bitwise_equal(moments_a, moments_b)
    assert (ckpt_a["step"], ckpt_a["epoch"], ckpt_a["batch_in_epoch"]) == (ckpt_b["step"], 3, 0)
    steps = [r["step"] for r in read_log(tmp_path / "stopped") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def _train_quietly(args):
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        train.main(args)


def test_resume_after_sigkill_reproduces_uninterrupted_run_bitwise(micro_root, tmp_path):
    killed = tmp_path / "killed"
    args = micro_args(micro_root, killed, "--epochs", "100", "--save-every", "1")
    # a forked process: it starts with this one's imports (a new interpreter would spend ~4 s importing them)
    proc = mp.get_context("fork").Process(target=_train_quietly, args=(args,), daemon=True)
    proc.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.is_alive():
            log = killed / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.is_alive(), "the run ended before it could be killed"
        # a second process on the same folder is refused while the first runs, naming it
        with pytest.raises(BlockingIOError, match=rf"--out {killed}: train.py \(pid {proc.pid}\) is running in "
                                                  r"this folder"):
            train.main([*args, "--resume", "--max-steps", "1"])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    resumed_from = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert resumed_from >= 2
    n = resumed_from + 2
    train.main(micro_args(micro_root, killed, "--epochs", "100", "--save-every", "1", "--eval-every", "1",
                          "--max-steps", str(n), "--resume"))
    # the uninterrupted run saves only at its end: a checkpoint reads the random state, never advances it
    train.main(micro_args(micro_root, tmp_path / "straight", "--epochs", "100", "--eval-every", "1",
                          "--max-steps", str(n)))
    assert_same_run_files(tmp_path / "straight", killed)


TIMINGS = ("s_per_expression", "s_per_expression_no_reuse", "reuse_speedup", "sam_encoder_s_per_image")  # Timing's


def metric_values(out):
    """metrics.json without the validation timings."""
    record = json.load(open(out / "metrics.json"))
    for metrics in (record, record["untrained"]):
        for key in TIMINGS:
            metrics.pop(key, None)
    return record


def assert_same_run_files(a, b):
    """Weights, optimizer moments, best weights and metric values of two runs: bitwise the same."""
    weights_a, moments_a, _ = saved_state(a)
    weights_b, moments_b, _ = saved_state(b)
    assert_bitwise_equal(weights_a, weights_b)
    assert_bitwise_equal(moments_a, moments_b)
    assert (a / "best.safetensors").read_bytes() == (b / "best.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert metric_values(a) == metric_values(b)


def _fork(target, *args):
    # a forked process: it starts with this one's imports (a new interpreter would spend ~4 s importing them)
    proc = mp.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def caller_step() -> int:
    """The step of the TrainState of the nearest calling frame that has one (train.main, final_evaluation)."""
    frame = inspect.currentframe()
    while not isinstance(frame.f_locals.get("state"), checkpoints.TrainState):
        frame = frame.f_back
    return frame.f_locals["state"].step


STEP_SCORES = {0: 0.0, 1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0}  # the best validation is step 2's


def score_by_step(monkeypatch):
    """train.validate scores by the step it validates (STEP_SCORES): the same whatever order a resume brings."""
    def validate(*args, **kwargs):
        score = STEP_SCORES[caller_step()]
        return {"output": "mask", "oIoU": score, "mIoU": 100.0 - score, "n": 8} | {
            f"P@{x}": 0.0 for x in (0.5, 0.6, 0.7, 0.8, 0.9)}

    monkeypatch.setattr(train, "validate", validate)


def _killed_in_validation(args, step):
    validate = train.validate

    def killed_at_step(*a, **k):
        if caller_step() == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return validate(*a, **k)

    train.validate = killed_at_step
    _train_quietly(args)


def test_sigkill_between_a_save_and_the_validation_of_its_step_keeps_the_best_of_an_uninterrupted_run(
        micro_root, tmp_path, monkeypatch):
    # --save-every = --eval-every: a kill in step 2's validation. Saved before it, the checkpoint of step 2 would
    # skip that validation on resume, and its best (step 2's) would be lost
    score_by_step(monkeypatch)
    common = ["--stage1-epochs", "0", "--save-every", "1", "--eval-every", "1", "--max-steps", "4"]
    killed = tmp_path / "killed"
    proc = _fork(_killed_in_validation, micro_args(micro_root, killed, *common), 2)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    train.main(micro_args(micro_root, killed, *common, "--resume"))
    train.main(micro_args(micro_root, tmp_path / "straight", *common))
    assert json.load(open(killed / "metrics.json"))["best"]["step"] == 2
    assert_same_run_files(tmp_path / "straight", killed)


def test_resume_with_another_model_config_is_refused(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: saved for a different model.*'n_prompts'"):
        train.main(micro_args(micro_root, out, "--resume", "--n-prompts", "2"))


def test_resume_with_another_number_of_processes_is_refused(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, out / "ckpt.pt")  # the RNG states of two ranks, as 2 processes save
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: written by 2 processes, resumed with 1"):
        train.main(micro_args(micro_root, out, "--resume"))


def test_resume_past_the_end_of_a_shrunken_epoch_is_refused_not_looped(micro_root, one_step_run, tmp_path):
    """A checkpoint whose position lies beyond the epoch the data gives now (the data shrank since the run began):
    its epoch would never end, and the loop would wait forever for a batch."""
    out = copy_run(one_step_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "batch_in_epoch": 10**6}, out / "ckpt.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: saved after step 1000000 of epoch 0, but the "
                                                          r"training set now gives \d+ steps per epoch"):
        train.main(micro_args(micro_root, out, "--resume"))


def test_resume_without_flags_takes_the_run_config(micro_root, one_step_run):
    out = one_step_run
    tc = train.parse_args(["--resume", "--out", str(out)])
    assert (tc.clip_size, tc.images_per_batch, tc.data_root, tc.max_steps) == (32, 4, micro_root, 0)


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
    log = runtime.RunLog(str(out), master=True, fresh=True)
    model = torch.nn.Linear(2, 1)
    for metric, best_step in (("mIoU", 2), ("oIoU", 1), ("none", None)):
        tc, state = train.parse_args(["--out", str(out), "--keep-best", metric]), checkpoints.TrainState()
        for step, (o, m) in enumerate([(60.0, 50.0), (40.0, 70.0), (60.0, 70.0)], start=1):
            state.step = step
            with torch.no_grad():
                model.bias.fill_(step)
            checkpoints.keep_best(model, {"oIoU": o, "mIoU": m, "n": 3}, state, tc, log)
        if best_step is None:
            assert state.best is None and not (out / "best.safetensors").exists()
        else:
            assert state.best["step"] == best_step
            assert checkpoints.read_best(str(out / "best.safetensors")) == state.best  # the record in the file's header
            assert load_file(out / "best.safetensors")["bias"].item() == best_step
            (out / "best.safetensors").unlink()


def test_resume_keeps_the_best_score(micro_root, tmp_path, monkeypatch):
    # all in stage 2; ckpt.pt of step 3 (saved after step 3's validation, which scores below) holds the best of step 2
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
    log = runtime.RunLog(str(out), master=True, fresh=True)
    record = {"step": 5, "metric": "oIoU", "score": 35.0, "expressions": 8}
    checkpoints.save_run_model(torch.nn.Linear(2, 1), str(out / "best.safetensors"), {"best": json.dumps(record)})
    older = {"step": 4, "metric": "oIoU", "score": 30.0, "expressions": 8}
    tc = train.parse_args(["--out", str(out)])
    # written at the checkpoint's step (the validation follows the save) or later: the file's record
    assert checkpoints.resumed_best(checkpoints.TrainState(step=5, best=older), tc, log) == record
    assert checkpoints.resumed_best(checkpoints.TrainState(step=6, best=older), tc, log) == older
    # another score now: the record is dropped; none also drops the file
    assert checkpoints.resumed_best(checkpoints.TrainState(step=6, best=older), replace(tc, keep_best="mIoU"), log) is None
    assert (out / "best.safetensors").exists()
    assert checkpoints.resumed_best(checkpoints.TrainState(step=6, best=older), replace(tc, keep_best="none"), log) is None
    assert not (out / "best.safetensors").exists()


# ---- checkpoints and failures ----


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    path = out / "ckpt.pt"
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint at all"):
        path.write_bytes(damaged)
        with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: corrupt or truncated checkpoint"):
            train.main(micro_args(micro_root, out, "--resume"))


def test_checkpoint_holding_code_is_refused_without_running_it(micro_root, one_step_run, tmp_path):
    """Untrusted files: ckpt.pt is read with torch.load(weights_only=True), which runs no pickled code."""
    out = copy_run(one_step_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": WritesMarker(str(marker))}, out / "ckpt.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: corrupt or truncated checkpoint"):
        train.main(micro_args(micro_root, out, "--resume"))
    assert not marker.exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")

    def crash_midway(f):
        f.write(b"half of a new checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_write(str(path), crash_midway)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """The data is on disk before the new name points to it, and the rename itself is made durable after."""
    path, calls = tmp_path / "ckpt.pt", []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    checkpoints.atomic_write(str(path), lambda f: f.write(b"new"))
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
    with pytest.raises(runtime.OutOfMemory) as error:
        train.main(micro_args(micro_root, out, "--save-every", "1"))
    message = str(error.value)
    assert message.startswith("step 3: out of memory on cpu") and "\n" not in message
    for flag in ("--micro-batch 2", "--grad-checkpoint", "--dtype bfloat16", "--cache-sam"):
        assert flag in message
    assert "(step 2)" in message and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_out_of_memory_before_any_checkpoint_says_none_was_saved(micro_root, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "forward_losses", out_of_memory)
    with pytest.raises(runtime.OutOfMemory, match=r"^step 1: out of memory .* no checkpoint was saved yet\.$"):
        train.main(micro_args(micro_root, tmp_path / "run"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_num_workers_auto_is_none_on_cpu_several_on_cuda(monkeypatch):
    tc = train.parse_args(["--num-workers", "-1"])  # -1 = auto
    assert tc.num_workers == -1 and train.parse_args([]).num_workers == -1
    assert runtime.loader_workers(tc, torch.device("cpu")) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.loader_workers(tc, torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.loader_workers(tc, torch.device("cuda")) == 8
    assert runtime.loader_workers(train.parse_args(["--num-workers", "3"]), torch.device("cuda")) == 3


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


def infinite_gradient(terms):
    terms["clip_seg"] = InfiniteGradient.apply(terms["clip_seg"])
    terms["loss"] = sum(v for k, v in terms.items() if k != "loss")


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


def test_clip_weights_without_a_bpe_vocabulary_are_refused_before_any_work(tmp_path):
    for name in ("clip.safetensors", "sam.safetensors"):
        (tmp_path / name).write_bytes(b"")  # present: the vocabulary is checked before they are read
    out = tmp_path / "run"
    args = ["--clip-weights", str(tmp_path / "clip.safetensors"), "--sam-weights", str(tmp_path / "sam.safetensors"),
            "--data-root", str(tmp_path / "data"), "--datasets", "synth", "--val-dataset", "synth", "--out", str(out)]
    with pytest.raises(ValueError, match=r"--clip-weights .*clip\.safetensors without --vocab: .*BPE .*run "
                                         r"`python load_weights.py download vocab`"):
        train.main(args)
    assert not out.exists()


# ---- the run folder: flags that define a run, one run per folder, signals, torn and failed writes ----


def test_every_knob_is_either_run_defining_or_free_on_resume():
    names = [f.name for f in fields(train.TrainConfig)]
    assert sorted(train.RUN_DEFINING_FLAGS + train.FREE_FLAGS) == sorted(names)
    assert set(train.PER_RUN_FLAGS) <= set(train.FREE_FLAGS)


def test_resume_refuses_a_changed_flag_that_defines_the_run_naming_saved_and_given(micro_root, one_step_run):
    config = one_step_run / "config.json"
    for flags, named in ((["--images-per-batch", "8"], "--images-per-batch 8 (saved 4)"),  # a shorter epoch
                         (["--images-per-batch", "2"], "--images-per-batch 2 (saved 4)"),  # images would repeat
                         (["--seed", "1", "--epochs", "5"], "--epochs 5 (saved 4), --seed 1 (saved 0)"),
                         (["--datasets", "refcoco"], "--datasets refcoco (saved synth)")):
        with pytest.raises(ValueError, match=rf"^--resume: {config} was saved with other flags that define the "
                                             rf"run: {re.escape(named)}; "):
            train.parse_args(micro_args(micro_root, one_step_run, "--resume", *flags))
    free = ["--num-workers", "2", "--log-every", "5", "--eval-every", "3", "--max-steps", "9", "--save-every", "7",
            "--threads", "2", "--device", "cpu", "--micro-batch", "2", "--keep-best", "mIoU"]
    assert train.parse_args(micro_args(micro_root, one_step_run, "--resume", *free)).max_steps == 9


def test_a_fresh_run_into_a_used_out_is_refused_unless_overwrite(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"}
    with pytest.raises(FileExistsError, match=rf"^--out {out} is not empty \(.*ckpt\.pt.*\): continue its run "
                                              r"with --resume, or pass --overwrite to delete the run's files first"):
        train.main(micro_args(micro_root, out, "--max-steps", "1"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"} == before
    train.main(micro_args(micro_root, out, "--max-steps", "1", "--overwrite", "--keep-best", "none"))
    assert not (out / "best.safetensors").exists()  # the earlier run's best is not left beside the new run
    assert json.load(open(out / "config.json"))["train"]["keep_best"] == "none"


def test_the_demo_run_twice_keeps_the_earlier_run_in_a_numbered_folder(micro_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's run folder is runs/demo, where `python eval.py` looks
    args = micro_args(micro_root, "unused", "--max-steps", "1")
    del args[args.index("--out"):args.index("--out") + 2]  # as `python train.py`: no --out
    train.main(args)
    demo = tmp_path / "runs" / "demo"
    first = {p.name: p.read_bytes() for p in demo.iterdir() if p.name != "train.lock"}
    train.main(args)
    assert {p.name: p.read_bytes() for p in (demo / "previous-1").iterdir()} == first
    assert "the earlier demo run in runs/demo moved to runs/demo/previous-1" in (demo / "train.log").read_text()
    assert (demo / "model.safetensors").exists() and (demo / "previous-1" / "ckpt.pt").exists()


def test_sigterm_saves_at_the_next_step_and_exits_143(micro_root, tmp_path):
    out = tmp_path / "run"
    proc = _fork(_train_quietly, micro_args(micro_root, out, "--epochs", "100", "--save-every", "1000"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").exists() and
                                              len((out / "log.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(120)
    finally:
        proc.kill()
    assert proc.exitcode == 143
    steps = [r["step"] for r in read_log(out) if "loss" in r]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == steps[-1] >= 2
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    assert (f"stopped by SIGTERM at step {steps[-1]}: {out / 'ckpt.pt'} saved; continue with `python train.py "
            f"--resume --out {out}`") in (out / "train.log").read_text()


def test_temporary_files_of_dead_writers_are_removed_at_the_next_start(micro_root, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = micro_args(micro_root, out, "--no-train-towers", "--stage1-epochs", "0", "--cache-sam", str(cache))
    train.main([*common, "--max-steps", "1"])
    (folder,) = cache.iterdir()
    writer = subprocess.Popen(["true"])
    writer.wait()  # its pid is no process's now
    stale = [out / f"ckpt.pt.tmp{writer.pid}", folder / f"3.pt.tmp{writer.pid}"]
    alive = folder / f"4.pt.tmp{os.getpid()}"  # another run sharing the cache, still writing
    for path in [*stale, alive]:
        path.write_bytes(b"half a file")
        os.utime(path, (0, 0))
    train.main([*common, "--max-steps", "2", "--resume"])
    assert not any(path.exists() for path in stale) and alive.exists()


def test_a_torn_last_line_of_log_jsonl_is_dropped_on_resume(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.4')  # killed in the middle of the write
    train.main(micro_args(micro_root, out, "--resume", "--max-steps", "2"))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]


@pytest.mark.parametrize("bad", ["not json", "[" * 100_000])  # deeply nested JSON: a RecursionError
def test_a_bad_line_inside_log_jsonl_or_a_bad_config_json_names_the_file(micro_root, one_step_run, tmp_path, bad):
    out = copy_run(one_step_run, tmp_path)
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text(bad + "\n" + "".join(lines))
    with pytest.raises(ValueError, match=rf"^{out / 'log.jsonl'}: line 1 is not a log record"):
        train.main(micro_args(micro_root, out, "--resume"))
    (out / "config.json").write_text(bad)
    with pytest.raises(ValueError, match=rf"^{out / 'config.json'}: not valid JSON"):
        train.main(micro_args(micro_root, out, "--resume"))


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter "
                                                "failed writing file data/3: file write failed"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_names_the_checkpoint_and_the_step_and_keeps_the_last_good_one(micro_root, tmp_path,
                                                                                    monkeypatch, error):
    real_save, saves = torch.save, []

    def disk_full_at_second_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"the first bytes")
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_second_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=rf"^step 2: could not write {out / 'ckpt.pt'} \(.*\); disk full\? The "
                                      r"step 1 checkpoint is kept"):
        train.main(micro_args(micro_root, out, "--save-every", "1"))
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_saved(micro_root, tmp_path, monkeypatch):
    def nan_loss(*args, **kwargs):
        terms = real_total_loss(*args, **kwargs)
        nan_term(terms)
        return terms

    real_total_loss = train.total_loss
    monkeypatch.setattr(train, "total_loss", nan_loss)
    with pytest.raises(FloatingPointError) as error:
        train.main(micro_args(micro_root, tmp_path / "run"))
    assert str(error.value) == ("step 1: loss term 'clip_seg' is nan; stopped before the update, no checkpoint was "
                                "saved yet")
