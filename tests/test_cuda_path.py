"""What the first CUDA run depends on, checked on the CPU: bf16 autocast exactness, no host syncs (one
graph under torch.compile), light batches, validation on every rank, torchrun's devices (mocked).

CPU autocast to bfloat16 casts the same matmuls as CUDA autocast, so the float32 islands (positional
encodings, Eq. (2), Eq. (3), the losses) are exercised here exactly as they run on a GPU.
"""
import dataclasses
import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import bench
import checkpoints
import data
import eval as eval_module
import runtime
import sam as sam_module
import sam_cache
import synth
import train
from clip_vit import cut_tokens
from helpers import micro_args
from prompt_ris import PromptRIS, PromptRISConfig, total_loss
from sam import PositionEmbeddingRandom, SAMConfig
from test_prompt_ris import make_tokens, tiny_batch, tiny_model

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


# ---- 1. exact under bf16 ----


def test_dense_pe_is_float32_exact_under_bf16_autocast():
    """SAM's grid encoding at the paper's 64 x 64 image embedding: sin/cos of arguments up to ~30 rad
    lose everything in bf16 (0.14 off on values in [-1, 1] before the fix)."""
    torch.manual_seed(0)
    pe = PositionEmbeddingRandom(128)
    expected = pe((64, 64))
    with torch.autocast(**BF16):
        got = pe((64, 64))
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-6


def test_point_and_box_encodings_are_float32_exact_under_bf16_autocast():
    torch.manual_seed(0)
    encoder = sam_module.SAM(SAMConfig.tiny()).prompt_encoder
    points = torch.rand(2, 3, 2) * 255, torch.tensor([[1, 0, 1], [0, 1, -1]])
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [0.0, 0.0, 255.0, 255.0]])
    expected = [encoder.embed_points(*points, pad=True), encoder.embed_boxes(boxes), encoder.get_dense_pe()]
    with torch.autocast(**BF16):
        got = [encoder.embed_points(*points, pad=True), encoder.embed_boxes(boxes), encoder.get_dense_pe()]
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert (g - e).abs().max() <= 1e-6


def paper_shaped_model():
    """Tiny widths at the paper's grids: CLIP 480 (30 x 30), SAM 1024 (64 x 64 embedding, 256 x 256 table)."""
    torch.manual_seed(0)
    config = dataclasses.replace(PromptRISConfig.tiny(), clip_image_size=480,
                                 sam=dataclasses.replace(SAMConfig.tiny(), image_size=1024))
    return PromptRIS(config).eval()


def test_paper_shaped_forward_under_bf16_agrees_with_float32():
    """Stated tolerance: the coarse logits S'_C float32 and within 0.1 of float32's (they span +-3.3; measured
    0.05), the final logits within 15% of their range (measured 8.8%: a random tiny SAM's logits span only
    +-0.2 while bf16 rounds activations ~50x larger in every decoder layer), the same point prompt. Before, the
    coarse logits came out bf16 (and SAM's positional encodings 0.14 off)."""
    model = paper_shaped_model()
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(1, 3, 480, 480, generator=g), make_tokens([3, 14])
    embeddings = torch.randn(1, model.config.sam.prompt_dim, 64, 64, generator=g)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        expected = model(images, tokens, index, sam_embeddings=embeddings)
        with torch.autocast(**BF16):
            got = model(images, tokens, index, sam_embeddings=embeddings)
    assert got["coarse"].dtype == torch.float32
    assert (got["coarse"] - expected["coarse"]).abs().max() <= 0.1
    mask_range = expected["mask"].abs().max()
    assert (got["mask"].float() - expected["mask"]).abs().max() <= 0.15 * mask_range
    assert torch.equal(got["point"], expected["point"])


def test_inference_point_is_the_argmax_of_float32_logits_where_bf16_would_tie():
    """A bias of 256 puts every coarse logit where bf16 steps by 2: rounded to bf16 they tie (the argmax
    would be the first cell), in float32 they do not, and the point is their float32 argmax."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.decoder.bias.fill_(256.0)
    batch = tiny_batch()
    with torch.no_grad(), torch.autocast(**BF16):
        out = model(batch["clip_images"], batch["tokens"], batch["image_index"], sam_images=batch["sam_images"])
    assert out["coarse"].dtype == torch.float32
    upsampled = F.interpolate(out["coarse"][:, None], size=model.sam.prompt_encoder.mask_input_size,
                              mode="bilinear", align_corners=False).flatten(1)  # S_C, float32
    ties = upsampled.bfloat16() == upsampled.bfloat16().max(dim=1, keepdim=True).values
    assert (ties.sum(1) > 1).all()  # bf16 logits would tie for every sentence
    assert torch.equal(out["point"], upsampled.argmax(dim=1))
    assert (out["point"] != ties.float().argmax(dim=1)).any()  # ... and pick another cell than float32


# ---- 2. no host syncs in a step ----


def test_loss_of_eq_9_has_no_graph_breaks():
    """Eq. (9) reads nothing back from the device: ICL counts its images on the device (before: torch.unique
    and .max() broke the graph). The model's forward is checked in the compiled training run below."""
    model = tiny_model().train()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch["clip_images"], cut_tokens(batch["tokens"]), batch["image_index"],
                    sam_images=batch["sam_images"], prepared=True)
    explained = torch._dynamo.explain(lambda out: total_loss(out, batch["masks"], batch["instance_ids"],
                                                             batch["image_index"])["loss"])(out)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_plain_forward_still_cuts_and_checks_its_inputs():
    """Without prepared=True (eval, tests, notebooks) the forward cuts the tokens and checks image_index itself."""
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        plain = model(batch["clip_images"], batch["tokens"], batch["image_index"], sam_images=batch["sam_images"])
        prepared = model(batch["clip_images"], cut_tokens(batch["tokens"]), batch["image_index"],
                         sam_images=batch["sam_images"], prepared=True)
    torch.testing.assert_close(plain["mask"], prepared["mask"])
    with pytest.raises(ValueError, match="image_index must lie in"):
        model(batch["clip_images"], batch["tokens"], batch["image_index"] + 5, sam_images=batch["sam_images"])


def test_compiled_training_compiles_one_graph_per_stage(micro_root, tmp_path, monkeypatch):
    """8 steps (2 of stage 1, 6 of stage 2) of train.main under torch.compile with an eager backend that
    counts what dynamo hands it: one graph per stage, whatever the text length (marked dynamic; lengths are
    multiples of 8) or the step. A graph break or a read-back of a device value (the text cut, the checks of
    image_index: 11 before) would split a stage's forward into several graphs."""
    graphs, lengths = [], []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile, real_forward_losses = torch.compile, train.forward_losses
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend))
    monkeypatch.setattr(train, "forward_losses", lambda model, batch, *a, **k: lengths.append(
        batch["tokens"].shape[1]) or real_forward_losses(model, batch, *a, **k))
    torch._dynamo.reset()
    result = train.main(micro_args(micro_root, tmp_path / "run", "--compile", "--max-steps", "8"))
    torch._dynamo.reset()
    assert result["step"] == 8 and len(lengths) == 8 and len(set(lengths)) >= 2
    assert len(graphs) == 2, f"{len(graphs)} graphs compiled in 8 steps"


def test_point_prompt_forward_is_the_exact_table_row_and_backward_the_straight_through_gradient():
    """Eq. (3) reads E's row (no matmul to round, TF32 included); the gradient is that of M E."""
    model = tiny_model().eval()
    coarse_up = torch.randn(3, 1, 64, 64, requires_grad=True)
    e_p, point = model.point_prompt(coarse_up)
    label = model.sam.prompt_encoder.point_embeddings[1].weight
    assert torch.equal(e_p[:, 0], model.point_pe_table[point] + 0.0 + label)
    v = torch.randn_like(e_p)
    (e_p * v).sum().backward()
    logits = coarse_up.detach().flatten(1).clone().requires_grad_()
    (torch.softmax(logits, dim=-1) @ model.point_pe_table * v[:, 0]).sum().backward()  # through M E (tau = 1)
    torch.testing.assert_close(coarse_up.grad.flatten(1), logits.grad)


# ---- 6. DDP and devices (torchrun's environment and CUDA mocked) ----


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two bf16-capable GPUs and a process group that only records how it was started."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", torch.device(d))))
    monkeypatch.setattr(runtime.dist, "init_process_group",
                        lambda backend, **kw: events.append(("init", backend, kw.get("device_id"))))
    precision = torch.get_float32_matmul_precision()
    yield events
    torch.set_float32_matmul_precision(precision)  # setup_processes switched this process to TF32


def torchrun_env(monkeypatch, rank, local_rank, world):
    for key, value in dict(RANK=rank, LOCAL_RANK=local_rank, WORLD_SIZE=world).items():
        monkeypatch.setenv(key, str(value))


def processes(*flags):
    return runtime.setup_processes(train.parse_args(["--config", "demo", "--threads", "0", *flags]))


def test_torchrun_on_cuda_uses_local_rank_and_sets_the_device_before_nccl(fake_gpus, monkeypatch):
    torchrun_env(monkeypatch, rank=3, local_rank=1, world=4)
    procs = processes()
    assert procs.device == torch.device("cuda", 1) and (procs.rank, procs.world) == (3, 4)
    assert fake_gpus == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1))]
    assert torch.get_float32_matmul_precision() == "high"  # the training path runs TF32 matmuls


def test_explicit_gpu_under_torchrun_and_missing_gpus_are_clear_errors(fake_gpus, monkeypatch):
    torchrun_env(monkeypatch, rank=0, local_rank=0, world=2)
    with pytest.raises(ValueError, match=r"--device cuda:1: under torchrun each process uses cuda:LOCAL_RANK"):
        processes("--device", "cuda:1")
    torchrun_env(monkeypatch, rank=2, local_rank=2, world=4)
    with pytest.raises(ValueError, match=r"cuda:2 asked for, but this machine has 2 GPU\(s\) \(LOCAL_RANK=2"):
        processes()
    assert not any(e[0] == "init" for e in fake_gpus)


def test_torchrun_on_cpu_stays_gloo(fake_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torchrun_env(monkeypatch, rank=1, local_rank=1, world=2)
    procs = processes("--device", "auto")
    assert procs.device == torch.device("cpu") and fake_gpus == [("init", "gloo", None)]


def test_dtype_auto_picks_bf16_only_where_the_gpu_has_it(fake_gpus, monkeypatch):
    tc, gpu = train.parse_args(["--config", "demo"]), torch.device("cuda", 0)
    assert runtime.autocast_dtype(tc, gpu) == torch.bfloat16
    assert runtime.autocast_dtype(tc, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.autocast_dtype(tc, gpu) is None
    assert "does not support bfloat16" in runtime.describe_dtype(tc, gpu, None)
    with pytest.raises(ValueError, match="--dtype bfloat16: cuda:0 does not support bfloat16"):
        runtime.autocast_dtype(train.parse_args(["--config", "demo", "--dtype", "bfloat16"]), gpu)


def test_checkpoint_rng_holds_only_its_own_gpu_and_old_checkpoints_still_load(monkeypatch):
    """A rank on cuda:1 saves one CUDA state (its own), so a machine with fewer GPUs can resume it; a
    checkpoint of the old format (every GPU's state) gives each rank its own device's entry."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(("set", int(s[0]), device)))
    gpu1 = torch.device("cuda", 1)
    state = checkpoints.rng_state(gpu1)
    assert len(state["cuda"]) == 1 and calls == [("get", gpu1)]
    checkpoints.set_rng_state(state, gpu1)
    old_format = state | {"cuda": [torch.zeros(4), torch.full((4,), 7.0)]}
    checkpoints.set_rng_state(old_format, gpu1)
    assert calls[1:] == [("set", 1, gpu1), ("set", 7, gpu1)]
    assert checkpoints.rng_state(torch.device("cpu"))["cuda"] == []


def test_peak_memory_reports_allocated_and_reserved_of_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**20 if d.index == 1 else 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 5 * 2**20 if d.index == 1 else 0)
    assert runtime.peak_memory_mb(torch.device("cuda", 1)) == {"peak_memory_mb": 3, "peak_reserved_mb": 5}


def test_images_per_second_keep_two_significant_digits():
    """A paper step on CPU (16 images in ~640 s) showed img/s=0."""
    assert [runtime.significant(x) for x in (0.025, 0.0251, 1.234, 16.3, 123.4)] == ["0.025", "0.025", "1.2", "16", "123"]


# ---- 7. bench.py on CUDA ----


def test_timings_synchronise_the_gpu_they_run_on(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(torch.device(device)))
    runtime.sync("cuda:3")
    runtime.sync("cpu")
    assert synced == [torch.device("cuda", 3)]


@pytest.mark.parametrize("config,stage,encoded_before,encoded_in_steps",
                         [("paper", 2, 2, 0), ("paper", 1, 0, 0), ("demo", 2, 0, 4)])
def test_bench_train_step_runs_both_presets(monkeypatch, capsys, config, stage, encoded_before, encoded_in_steps):
    """bench.py --train-step at micro sizes (the paper preset's towers shrunk to the tiny config), 2 steps of 2
    images: stage 2 of the paper preset reads F_IS back as --cache-sam does (SAM's encoder runs once per image
    before the steps, never in them), stage 1 has no SAM, the demo trains SAM's encoder in every step. The
    projection and the JSON line follow from the measured step."""
    real_parse = train.parse_args
    monkeypatch.setattr(train, "parse_args", lambda argv: real_parse([*argv, "--clip-size", "32", "--sam-size", "32"]))
    monkeypatch.setattr(PromptRISConfig, "paper", classmethod(lambda cls: PromptRISConfig.tiny()))
    encodes = []
    real_encode = PromptRIS.encode_sam_image
    monkeypatch.setattr(PromptRIS, "encode_sam_image",
                        lambda self, images: encodes.append(len(images)) or real_encode(self, images))
    steps = []
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(len(encodes)) or real_step(*a, **k))
    assert bench.main(["--train-step", "--config", config, "--stage", str(stage), "--images", "2", "--micro-batch",
                       "1", "--steps", "1", "--train-images", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(steps) == 2
    assert (sum(encodes[:steps[0]]), sum(encodes[steps[0]:])) == (encoded_before, encoded_in_steps)
    assert {"step_s", "peak_mib", "flops_per_step", "epoch_s", "run_s"} <= result.keys()
    assert result["flops_per_step"] > 0 and result["peak_mib"] > 0 and result["micro_batch"] == 1
    assert result["epoch_s"] == pytest.approx(result["step_s"] * 10 / 2)
    assert result["run_s"] == pytest.approx(result["epoch_s"] * result["epochs"])


# ---- 5. validation on every rank ----


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validation_metrics(root, procs):
    """Both stages' validation of the untrained micro model on 5 val images (uneven shards over 2 ranks)."""
    tc = train.parse_args(micro_args(root, "unused"))
    torch.manual_seed(0)
    model, _ = train.build_model(tc)
    _, val_set, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    timing = ("s_per_expression", "s_per_expression_no_reuse", "reuse_speedup", "sam_encoder_s_per_image")
    return {stage: {k: v for k, v in train.validate(model, val_set, stage, tc, procs, None).items()
                    if k not in timing} for stage in (1, 2)}


def _validation_worker(rank, world, port, root, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scored, update = [], eval_module.RISMetrics.update  # what this rank scores itself
    eval_module.RISMetrics.update = lambda self, *a, **k: scored.append(1) or update(self, *a, **k)
    metrics = validation_metrics(root, runtime.Processes(rank, rank, world, torch.device("cpu")))
    torch.save({"metrics": metrics, "scored": len(scored)}, os.path.join(out, f"metrics{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_validation_gives_exactly_the_one_process_metrics(tmp_path):
    root = str(tmp_path / "data")
    synth.make_synth(root, seed=0, n_train=4, n_val=5, n_testA=1, n_testB=1)
    mp.start_processes(_validation_worker, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, start_method="fork")
    single = validation_metrics(root, runtime.Processes(0, 0, 1, torch.device("cpu")))
    assert single[1]["n"] > 5 and single[2]["output"] == "mask"
    results = [torch.load(tmp_path / f"metrics{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(r["metrics"] == single for r in results)  # exact, on every rank
    scored = [r["scored"] for r in results]  # each rank scored its own shard only
    assert min(scored) > 0 and sum(scored) == single[1]["n"] + single[2]["n"]


# ---- 4. --cache-sam that pays ----


def test_sam_cache_stores_the_encoders_dtype_and_is_read_by_the_dataset(micro_root, tmp_path, monkeypatch):
    """bf16 autocast: the cached F_IS is bf16 (half of float32's bytes); in the second epoch every image
    comes from the cache, read in the dataset, and no 1024 px (here 32 px) SAM input is built."""
    built = []
    real_preprocess = data.preprocess_image
    monkeypatch.setattr(data, "preprocess_image", lambda *a, **k: built.append(a[3]) or real_preprocess(*a, **k))
    out, cache = tmp_path / "run", tmp_path / "cache"
    train.main(micro_args(micro_root, out, "--no-train-towers", "--stage1-epochs", "0", "--max-steps", "4",
                          "--dtype", "bfloat16", "--cache-sam", str(cache)))
    (key,) = os.listdir(cache)
    files = sorted(os.listdir(cache / key))
    assert len(files) == 8 and all(f.endswith(".pt") for f in files)
    assert torch.load(cache / key / files[0], weights_only=True).dtype == torch.bfloat16
    training_items = built[-10:-2]  # epoch 2: 8 training items, then the final validation of 2 images
    assert built[-18:-10] == [True] * 8 and training_items == [False] * 8, built


def test_sam_cache_key_includes_the_data_root_and_ignores_torn_files(micro_root, tmp_path):
    model, _ = train.build_model(train.parse_args(micro_args(micro_root, "unused", "--no-train-towers")))
    assert sam_cache.sam_weights_hash(model, None, "a") != sam_cache.sam_weights_hash(model, None, "b")
    tc = train.parse_args(micro_args(micro_root, "unused"))
    train_set, _, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    train_set.use_sam_cache(str(tmp_path))
    image_id = train_set.image_ids[0]
    (tmp_path / f"{image_id}.pt.tmp123").write_bytes(b"torn")  # a crash mid-write
    assert train_set.cached_sam_embedding(image_id) is None
    assert train_set[0]["sam_embedding"] is None and train_set[0]["sam_image"] is not None


def test_sam_cache_says_its_size_and_stops_when_the_disk_lacks_it(micro_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sam_cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(OSError, match=r"--cache-sam .*: the cache needs 0\.00 GiB more, the disk has 0\.00 GiB free"):
        train.main(micro_args(micro_root, tmp_path / "run", "--no-train-towers", "--cache-sam", str(tmp_path / "c")))
    assert "8 images x 0.0 MiB" in capsys.readouterr().out


# ---- 3. light transfers ----


def test_bf16_images_give_bitwise_the_float32_images_result_under_bf16_autocast():
    """Under bf16 autocast the loader sends bfloat16 pixels (half of float32's bytes): both towers' first
    layer is a convolution that autocast feeds bf16 anyway, so nothing changes, to the bit."""
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad(), torch.autocast(**BF16):
        outs = [model(batch["clip_images"].to(dtype), batch["tokens"], batch["image_index"],
                      sam_images=batch["sam_images"].to(dtype)) for dtype in (torch.float32, torch.bfloat16)]
    for key in ("coarse", "mask", "point"):
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_stage1_masks_are_framed_at_clip_size_and_uint8(micro_root):
    tc = train.parse_args(micro_args(micro_root, "unused", "--clip-size", "48"))
    train_set, _, _ = train.build_data(tc, train.Tokenizer(None), master=True)
    train_set.set_epoch(0, stage=1)
    batch = data.collate([train_set[i] for i in range(2)])
    assert batch["masks"].shape[1:] == (48, 48) and batch["masks"].dtype == torch.uint8
    assert batch["sam_images"] is None
