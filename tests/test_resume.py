"""train.py's checkpoints: a stopped or killed run resumes bitwise, the best checkpoint survives a resume,
a bad checkpoint or an impossible resume is a clear error, a save never leaves a torn file, and a run stops
before an update that would corrupt it (non-finite loss or gradient, out of memory).

The same micro runs as test_train.py (tests/helpers.py: micro_args).
"""
import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import replace

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
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
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
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: saved for a different model.*'n_prompts'"):
        train.main(micro_args(micro_root, out, "--resume", "--n-prompts", "2"))


def test_resume_with_another_number_of_processes_is_refused(micro_root, one_step_run, tmp_path):
    out = copy_run(one_step_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, out / "ckpt.pt")  # the RNG states of two ranks, as 2 processes save
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt\.pt: written by 2 processes, resumed with 1"):
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
