"""Speed of our CLIP, SAM and Prompt-RIS next to the reference implementations, in one run.

    python bench.py            # tiny and paper (ViT-B/16 + SAM ViT-B) sizes
    python bench.py --quick    # tiny sizes only
    python bench.py --json     # also one JSON line at the end
    python bench.py --train-step --config paper --images 2 [--micro-batch 1] [--grad-checkpoint]
                               # real training steps: time, peak memory, FLOPs, projected epoch and run

Every comparison runs both implementations on the same machine, the same random weights (loaded
into ours through load_weights.py from a safetensors file written in the reference's naming) and
the same inputs; the two are timed alternately (warmup, then the median of the repeats) so that
a busy machine slows both alike, and each line reports ours / reference. References, when installed:
`transformers`' CLIPModel and `segment_anything`'s ImageEncoderViT (its modeling files are loaded
directly: the package's __init__ imports torchvision). Run by hand; not part of the test suite.
"""
import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from functools import partial

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import checkpoints
import data
import runtime
import train

from clip_vit import CLIPConfig, cut_tokens
from keyed_random import combine_keys
from load_weights import load_clip, load_sam
from prompt_ris import PromptRIS, PromptRISConfig, total_loss
from sam import SAM, SAMConfig
from sam_cache import sam_embeddings

SIZES = {"tiny": PromptRISConfig.tiny, "paper": PromptRISConfig.paper}
# Training images of the paper's run (§4.2: RefCOCO + RefCOCO+ + G-Ref, evaluation images removed), an
# upper-bound estimate from the published split sizes: 16,994 RefCOCO unc train images (RefCOCO+ unc train
# uses the same images) + 21,899 G-Ref umd train images; images in both are counted twice. train.py prints
# the exact number as steps per epoch x 16.
PAPER_TRAIN_IMAGES = 16994 + 21899
DEMO_TRAIN_IMAGES = 600  # synth.make_synth's training split


# ---- timing ----


@contextlib.contextmanager
def training_precision(device: str):
    """The precision train.py runs with on this device: TF32 matmuls and bf16 autocast on a GPU that has
    bf16 (runtime.setup_processes, runtime.autocast_dtype), plain float32 on the CPU. The comparisons with the
    reference implementations stay in float32: the matmul precision is restored on exit."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported()):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def median_times(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """{name: median seconds}: each fn runs `warmup` times, then the fns alternate for `repeats` rounds."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            runtime.sync(device)
            start = time.perf_counter()
            fn()
            runtime.sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(device: str, repeats: int) -> float:
    """Reference throughput: a large float32 square matmul (2 n^3 FLOPs)."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = median_times({"mm": lambda: a @ b}, device, warmup=1, repeats=repeats)["mm"]
    return 2 * n ** 3 / seconds / 1e9


# ---- references, when installed ----


def official_sam_encoder(cfg: SAMConfig):
    """segment_anything's ImageEncoderViT with the sizes of `cfg` (as its build_sam_vit_b does).

    Its modeling/ folder is registered as a package under a private name so that the relative
    imports resolve and segment_anything/__init__.py (which imports torchvision) never runs."""
    spec = importlib.util.find_spec("segment_anything")  # finds the package without executing it
    if spec is None:
        raise ImportError("segment_anything is not installed")
    package = types.ModuleType("_bench_segment_anything")
    package.__path__ = [os.path.join(spec.submodule_search_locations[0], "modeling")]
    sys.modules[package.__name__] = package
    modeling = importlib.import_module(f"{package.__name__}.image_encoder")
    return modeling.ImageEncoderViT(
        depth=cfg.encoder_depth, embed_dim=cfg.encoder_width, img_size=cfg.image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_heads, patch_size=cfg.patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=cfg.global_attn_indexes, window_size=cfg.window_size,
        out_chans=cfg.prompt_dim)


def hf_clip(cfg: CLIPConfig):
    """transformers' CLIPModel with the sizes of `cfg` (random weights). A reference, not a dependency:
    imported by name only when installed (requirements-dev.txt)."""
    transformers = importlib.import_module("transformers")
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=cfg.context_length, vocab_size=cfg.vocab_size,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu"),
        projection_dim=cfg.embed_dim)).eval()


def sam_encoder_flops(cfg: SAMConfig) -> int:
    """Multiply-adds x 2 of SAM's image encoder, counted from its architecture (norms, softmax,
    GELU and bias adds left out). Windowed blocks pad the grid up to a multiple of the window."""
    g, d, c = cfg.grid, cfg.encoder_width, cfg.prompt_dim
    tokens = g * g
    padded = -(-g // cfg.window_size) * cfg.window_size
    flops = 2 * tokens * 3 * cfg.patch_size ** 2 * d  # patch embedding
    for i in range(cfg.encoder_depth):
        side = g if i in cfg.global_attn_indexes else cfg.window_size  # attention span per axis
        attended = tokens if i in cfg.global_attn_indexes else padded * padded  # tokens through attention
        flops += 2 * attended * d * 4 * d  # qkv (3 d) + output projection (d)
        flops += 2 * 2 * attended * side * side * d  # q k^T and attn v
        flops += 2 * attended * 2 * side * d  # decomposed relative positions (height + width)
        flops += 2 * tokens * d * 8 * d  # MLP d -> 4d -> d
    return flops + 2 * tokens * d * c + 2 * tokens * c * c * 9  # neck: 1x1 then 3x3 convolution


# ---- benchmarks ----


def bench_clip(config: PromptRISConfig, folder: str, device: str, warmup: int, repeats: int) -> dict:
    """Our CLIP encoders vs transformers' CLIPModel, same weights (Hugging Face naming file -> load_clip).

    The image encoder runs at CLIP's native size and at Prompt-RIS's input size (480 in the paper,
    where both resize the positional embedding: ours once and cached, transformers per call)."""
    torch.manual_seed(0)
    hf = hf_clip(config.clip).to(device)
    path = os.path.join(folder, "clip_hf.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in hf.state_dict().items()}, path)
    ours = load_clip(path, device).eval()
    tokens = torch.randint(0, 49406, (8, config.clip.context_length), device=device)
    tokens[:, 0], tokens[:, 12] = 49406, 49407  # SOT ... EOT (argmax pooling)
    result = {}
    with torch.no_grad():
        for size in dict.fromkeys((config.clip.image_size, config.clip_image_size)):
            pixels = torch.randn(1, 3, size, size, device=device)
            resize = size != config.clip.image_size
            times = median_times({
                "ours": lambda: ours.encode_image(pixels),
                "reference": lambda: hf.get_image_features(pixel_values=pixels, interpolate_pos_encoding=resize)},
                device, warmup, repeats)
            result[f"clip_image_encoder_{size}"] = {**times, "ratio": times["ours"] / times["reference"],
                                                    "input": f"1x3x{size}^2"}
        text = median_times({"ours": lambda: ours.encode_text(tokens),
                             "reference": lambda: hf.get_text_features(input_ids=tokens)}, device, warmup, repeats)
    result["clip_text_encoder"] = {**text, "ratio": text["ours"] / text["reference"], "input": "8x77 tokens"}
    return result


def bench_sam_encoder(config: PromptRISConfig, folder: str, device: str, warmup: int, repeats: int,
                      matmul: float) -> dict:
    """Our SAM image encoder vs segment_anything's, same weights (segment_anything naming -> load_sam)."""
    cfg = config.sam
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=device)
    flops = sam_encoder_flops(cfg)
    result = {"input": f"1x3x{cfg.image_size}^2", "gflop": flops / 1e9}
    try:
        official = official_sam_encoder(cfg).to(device).eval()
    except ImportError as e:
        official = None
        result["reference"] = f"unavailable ({e})"
    if official is not None:
        with torch.no_grad():
            for p in official.parameters():  # pos_embed / rel_pos start at zero: make them count
                p.add_(0.02 * torch.randn_like(p))
        path = os.path.join(folder, "sam_official.safetensors")
        state = {k: v for k, v in SAM(cfg).state_dict().items() if not k.startswith("image_encoder.")}
        state.update({f"image_encoder.{k}": v.cpu() for k, v in official.state_dict().items()})
        save_file({k: v.contiguous() for k, v in state.items()}, path)  # a whole SAM checkpoint
        ours = load_sam(path, device, config=cfg).image_encoder.eval()
        with torch.no_grad():
            times = median_times({"ours": lambda: ours(pixels), "reference": lambda: official(pixels)},
                                 device, warmup, repeats)
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:  # counted on the reference: plain matmuls
                official(pixels)
        result.update(times, ratio=times["ours"] / times["reference"],
                      gflop_counted_on_reference=counter.get_total_flops() / 1e9)
    else:
        ours = SAM(cfg).image_encoder.to(device).eval()
        with torch.no_grad():
            result.update(median_times({"ours": lambda: ours(pixels)}, device, warmup, repeats))
    result["gflops_per_s"] = flops / result["ours"] / 1e9
    result["fraction_of_matmul"] = result["gflops_per_s"] / matmul
    return result


def example_batch(config: PromptRISConfig, device: str, images: int = 1, sentences: int = 4) -> dict:
    """Random inputs of the batch dict's shapes: `images` images with `sentences` sentences each."""
    n = images * sentences
    tokens = torch.randint(0, 49406, (n, 77), device=device)
    tokens[:, 0], tokens[:, 10] = 49406, 49407
    return {"clip_images": torch.randn(images, 3, config.clip_image_size, config.clip_image_size, device=device),
            "sam_images": torch.randn(images, 3, config.sam.image_size, config.sam.image_size, device=device),
            "tokens": cut_tokens(tokens),
            "image_index": torch.arange(images, device=device).repeat_interleave(sentences),
            "instance_ids": torch.arange(n, device=device) % 2,
            "masks": (torch.rand(n, config.sam.image_size, config.sam.image_size, device=device) > 0.5).float()}


def bench_prompt_ris(config: PromptRISConfig, device: str, warmup: int, repeats: int) -> dict:
    """One inference forward of the whole model (1 image, 4 sentences), split into SAM encoder and rest."""
    torch.manual_seed(0)
    model = PromptRIS(config).to(device).eval()
    b = example_batch(config, device)
    with torch.no_grad(), training_precision(device):
        embedding = model.encode_sam_image(b["sam_images"])
        times = median_times({
            "sam_image_encoder": lambda: model.encode_sam_image(b["sam_images"]),
            "rest": lambda: model(b["clip_images"], b["tokens"], b["image_index"], sam_embeddings=embedding,
                                  prepared=True),  # as collated: no host sync
        }, device, warmup, repeats)
    return {**times, "forward": times["sam_image_encoder"] + times["rest"], "input": "1 image, 4 sentences"}


def train_step_memory(size: str, device: str) -> dict:
    """Peak memory of one training step (forward, Eq. (9) loss, backward, AdamW step) on 1 image x 4
    sentences, measured in this (fresh) process: CUDA allocator peak, or the growth of max RSS on CPU."""
    config = SIZES[size]()
    torch.manual_seed(0)
    model = PromptRIS(config).to(device).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    b = example_batch(config, device)

    def step():
        with training_precision(device):
            out = model(b["clip_images"], b["tokens"], b["image_index"], sam_images=b["sam_images"], prepared=True)
            loss = total_loss(out, b["masks"], b["instance_ids"], b["image_index"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.sync(device)

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    step()  # the first step also allocates AdamW's state
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mib": peak / 2 ** 20, "peak_mib_above_model": (peak - before) / 2 ** 20, "step_s": seconds,
            "trainable_params": model.count_parameters(), "input": "1 image, 4 sentences"}


def train_step_memory_in_subprocess(size: str, device: str) -> dict:
    """Run train_step_memory in a fresh interpreter: a CPU high-water mark is per process."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--train-step-memory", size, "--device", device,
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_step_batches(config: PromptRISConfig, device: str, images: int, sentences: int, micro_batch: int,
                       seed: int = 0) -> list[dict]:
    """Random micro-batches of a global step, as train.collate_micro_batches makes them (sample keys included)."""
    torch.manual_seed(seed)
    chunks, size = [], micro_batch or images
    for first in range(0, images, size):
        b = example_batch(config, device, min(size, images - first), sentences)
        b["image_ids"] = torch.arange(first, first + len(b["clip_images"]))
        index = b["image_index"].cpu()
        sentence = torch.arange(len(index)) - torch.searchsorted(index, index)
        b["sample_keys"] = combine_keys(seed, 0, b["image_ids"][index], sentence)
        chunks.append(b)
    return chunks


def bench_train_step(args) -> dict:
    """Real training steps (train.train_step) on random weights: the preset's model and freezing (paper: CLIP
    and SAM frozen, SAM's embeddings precomputed into a --cache-sam folder as in stage 2; demo: the towers
    train too). The first step is counted with FlopCounterMode (forward, backward, recomputation); the next
    --steps are timed. Peak memory: the CUDA allocator's, or on CPU the resident set's high-water mark
    (VmHWM), both reset after the embeddings are precomputed."""
    flags = ["--config", args.config, "--images-per-batch", str(args.images), "--micro-batch", str(args.micro_batch),
             "--dtype", args.dtype, "--grad-checkpoint" if args.grad_checkpoint else "--no-grad-checkpoint"]
    tc = train.parse_args(flags + (["--no-train-towers"] if args.config == "paper" else []))
    device = torch.device(args.device)
    if device.type == "cpu":
        unmap_freed_blocks()
    procs = runtime.Processes(0, 0, 1, device)
    amp_dtype = runtime.autocast_dtype(tc, device)
    torch.manual_seed(0)
    model, train_towers = train.build_model(tc)
    model.to(device).train()
    model.cmp.grad_checkpoint = tc.grad_checkpoint
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type in ("cpu", "cuda"))
    chunks = train_step_batches(model.config, args.device, args.images, tc.sentences_per_image, tc.micro_batch)
    stage = args.stage
    with tempfile.TemporaryDirectory() as cache:
        cache_dir = None if train_towers or stage == 1 else cache
        if cache_dir:  # stage 2 with a frozen SAM: F_IS precomputed, and read back as the loader's workers do
            with torch.no_grad(), runtime.autocast(device, amp_dtype):
                for chunk in chunks:
                    # these images have no files (sam_cache_path's version): their cache files are named by id only
                    files = [os.path.join(cache_dir, f"{int(i)}.pt") for i in chunk["image_ids"]]
                    for i in range(len(chunk["clip_images"])):  # one image at a time: not the step's peak
                        sam_embeddings(model, {"sam_images": chunk["sam_images"][i:i + 1],
                                               "sam_cache_files": files[i:i + 1],
                                               "sam_embeddings": [None]}, device, cache_dir)
                    chunk["sam_embeddings"] = [torch.load(f, weights_only=True) for f in files]
                    chunk["sam_images"] = None
        runtime.sync(args.device)
        before = memory_now(device)  # the built model, its inputs and the cached embeddings
        reset_peak_memory(device)

        def step():
            train.train_step(model, model, chunks, optimizer, params, stage, tc, procs, amp_dtype, cache_dir,
                             train_towers, checkpoints.TrainState())
            runtime.sync(args.device)

        times = []
        for n in range(1 + args.steps):
            start = time.perf_counter()
            with FlopCounterMode(display=False) if n == 0 else contextlib.nullcontext() as counter:
                step()  # the first also allocates AdamW's state
            times.append(time.perf_counter() - start)
            if n == 0:
                flops = counter.get_total_flops()
            peak = peak_memory(device)
            report_step(n, times[-1], peak, flops, tc.epochs, args)
    step_s = statistics.median(times[1:] or times)  # --steps 0: the counted step's time (counter overhead included)
    epoch_s = step_s * args.train_images / args.images
    return {"config": args.config, "stage": stage, "images": args.images, "sentences_per_image": tc.sentences_per_image,
            "micro_batch": tc.micro_batch, "grad_checkpoint": tc.grad_checkpoint,
            "dtype": str(amp_dtype or torch.float32), "device": args.device, "threads": torch.get_num_threads(),
            "step_s": step_s, "peak_mib": peak / 2**20, "peak_mib_above_model": (peak - before) / 2**20,
            "flops_per_step": flops, "flops_per_s": flops / step_s, "train_images": args.train_images,
            "epoch_s": epoch_s, "run_s": epoch_s * tc.epochs, "epochs": tc.epochs,
            "trainable_params": model.count_parameters()}


def unmap_freed_blocks() -> None:
    """On glibc, give every block of 128 KiB or more its own mapping, returned to the system when freed. By
    default the threshold grows with the blocks freed (up to 32 MiB); freed tensors below it then stay in
    the heap, and the resident set (the CPU peak measured here) overstates the memory in use by gigabytes
    and differs between runs. Fixing the threshold also stops its growth. Elsewhere: nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


def memory_now(device: torch.device) -> int:
    """Bytes in use: CUDA tensors, or this process's resident set (Linux /proc, else its peak)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: the CUDA allocator's, or the process's resident set (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def peak_memory(device: torch.device) -> int:
    """Bytes at the high-water mark since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):  # not Linux: the peak since the process started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def report_step(n: int, seconds: float, peak: float, flops: int, epochs: int, args) -> None:
    epoch_s = seconds * args.train_images / args.images
    print(f"step {n}{' (FLOPs counted)' if n == 0 else ''}: {seconds:.2f} s, peak {'allocated' if args.device == 'cuda' else 'max RSS'} "
          f"{peak / 2**20:.0f} MiB, {flops / 1e12:.3f} TFLOP -> {flops / seconds / 1e9:.1f} GFLOP/s; "
          f"{args.train_images} images: epoch {epoch_s / 3600:.2f} h, {epochs} epochs {epochs * epoch_s / 86400:.2f} days",
          flush=True)


def bench_loading(workers: list[int], batches: int, images: int = 16) -> dict:
    """Seconds per loaded batch of `images` images (4 sentences each) at paper sizes (CLIP 480, SAM 1024 input,
    1024 x 1024 masks) from the built-in data through train.py's collate, for each worker count: the mean over
    `batches` batches with the workers' start-up (the first batch's time, reported apart) included."""
    import synth
    from clip_vit import Tokenizer
    result = {}
    with tempfile.TemporaryDirectory() as root:
        synth.make_synth(root, seed=0, n_train=images * batches, n_val=1, n_testA=1, n_testB=1)
        train_set = data.RefTrainSet(data.load_refs(root, "synth", "unc"), Tokenizer(None), clip_size=480,
                                     sam_size=1024, sentences_per_image=4)
        for n in workers:
            order = list(range(len(train_set)))
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=[order[i:i + images] for i in range(0, len(order), images)], num_workers=n,
                collate_fn=partial(train.collate_micro_batches, size=0, seed=0, epoch=0),
                prefetch_factor=4 if n else None)
            start, cpu = time.perf_counter(), time.process_time()
            stamps = [time.perf_counter() for _ in loader]
            result[n] = {"first_batch_s": stamps[0] - start, "batch_s": (stamps[-1] - start) / len(stamps)}
            if n == 0:  # the CPU time of loading one batch, whatever else the machine runs
                result[n]["cpu_s_per_batch"] = (time.process_time() - cpu) / len(stamps)
            print(f"{n} workers: {result[n]['batch_s']:.2f} s per batch of {images} images over {len(stamps)} "
                  f"batches, start-up included (first batch {result[n]['first_batch_s']:.2f} s)"
                  + (f"; {result[n]['cpu_s_per_batch']:.2f} CPU s per batch" if n == 0 else ""), flush=True)
    return result


# ---- command line ----


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time ours vs the reference implementations (ratios).")
    p.add_argument("--quick", action="store_true", help="tiny sizes only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a machine that "
                   "other jobs share, 1 avoids threads waiting for a busy core")
    p.add_argument("--json", action="store_true", help="also print all numbers as one JSON line")
    p.add_argument("--train-step-memory", choices=tuple(SIZES), help=argparse.SUPPRESS)  # internal
    t = p.add_argument_group("--train-step: real training steps, their memory, FLOPs and the projected run")
    t.add_argument("--train-step", action="store_true", help="run training steps instead of the comparisons")
    t.add_argument("--config", choices=("paper", "demo"), default="paper", help="train.py preset (default paper)")
    t.add_argument("--images", type=int, default=16, help="images per step (paper: 16, with 4 sentences each)")
    t.add_argument("--micro-batch", type=int, default=0, help="train.py --micro-batch (0 = all images at once)")
    t.add_argument("--grad-checkpoint", action="store_true", help="train.py --grad-checkpoint")
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="train.py --dtype")
    t.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1: CLIP + CMP + ICL; 2: end to end "
                   "(default; 30 of the 50 epochs and the costlier)")
    t.add_argument("--steps", type=int, default=2, help="timed steps after the FLOP-counted first one (0: time "
                   "that one; peak memory is reached in the first step already)")
    t.add_argument("--train-images", type=int, help="training images of one epoch for the projection (default: "
                   f"paper {PAPER_TRAIN_IMAGES}, an estimate from the split sizes, see bench.py; demo "
                   f"{DEMO_TRAIN_IMAGES}, the built-in data)")
    p.add_argument("--loading", type=str, metavar="WORKERS", help="time loading paper-size batches of 16 images "
                   "from the built-in data with these worker counts, e.g. 0,2,4")
    args = p.parse_args(argv)
    if args.loading:
        result = bench_loading([int(n) for n in args.loading.split(",")], batches=8)
        if args.json:
            print(json.dumps(result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step_memory:
        print(json.dumps(train_step_memory(args.train_step_memory, args.device)))
        return 0
    if args.train_step:
        if args.train_images is None:
            args.train_images = PAPER_TRAIN_IMAGES if args.config == "paper" else DEMO_TRAIN_IMAGES
        if min(args.images, args.train_images) < 1 or min(args.micro_batch, args.steps) < 0:
            p.error("--images and --train-images must be >= 1, --micro-batch and --steps >= 0")
        result = bench_train_step(args)
        print(f"median step {result['step_s']:.2f} s for {args.images} images; peak {result['peak_mib']:.0f} MiB "
              f"({result['peak_mib_above_model']:.0f} above the built model); {result['flops_per_step'] / 1e12:.3f} "
              f"TFLOP per step; epoch of {args.train_images} images {result['epoch_s'] / 3600:.2f} h, "
              f"{result['epochs']} epochs {result['run_s'] / 86400:.2f} days")
        if args.json:
            print(json.dumps(result))
        return 0

    report = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "warmup": args.warmup, "repeats": args.repeats,
              "matmul_gflops_per_s": matmul_gflops(args.device, args.repeats)}
    print(f"torch {report['torch']} on {args.device}, {report['threads']} threads ({report['cpus']} CPUs); "
          f"float32 matmul {report['matmul_gflops_per_s']:.1f} GFLOP/s; median of {args.repeats} after "
          f"{args.warmup} warmup")
    sizes = ("tiny",) if args.quick else ("tiny", "paper")
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            config = SIZES[size]()
            part = {}
            try:
                part.update(bench_clip(config, folder, args.device, args.warmup, args.repeats))
            except ImportError as e:
                part["clip"] = f"reference unavailable ({e})"
            part["sam_image_encoder"] = bench_sam_encoder(config, folder, args.device, args.warmup, args.repeats,
                                                          report["matmul_gflops_per_s"])
            part["prompt_ris_forward"] = bench_prompt_ris(config, args.device, args.warmup, args.repeats)
            part["train_step"] = train_step_memory_in_subprocess(size, args.device)
            report[size] = part
            print_size(size, part)
    if args.json:
        print(json.dumps(report))
    return 0


def print_size(size: str, part: dict) -> None:
    print(f"[{size}]")
    for name, r in part.items():
        if isinstance(r, dict) and "ratio" in r:
            print(f"  {name:<24} ours {1e3 * r['ours']:9.1f} ms  reference {1e3 * r['reference']:9.1f} ms  "
                  f"ours/reference {r['ratio']:.2f}x  ({r['input']})")
    sam = part["sam_image_encoder"]
    print(f"  sam_image_encoder        {sam['gflop']:.1f} GFLOP -> {sam['gflops_per_s']:.1f} GFLOP/s = "
          f"{100 * sam['fraction_of_matmul']:.0f}% of the matmul's")
    f = part["prompt_ris_forward"]
    print(f"  prompt_ris_forward       {1e3 * f['forward']:9.1f} ms = SAM image encoder {1e3 * f['sam_image_encoder']:.1f}"
          f" + rest {1e3 * f['rest']:.1f} ms  ({f['input']})")
    t = part["train_step"]
    print(f"  train_step               {t['step_s']:.2f} s, peak memory {t['peak_mib']:.0f} MiB "
          f"(+{t['peak_mib_above_model']:.0f} MiB above the built model), {t['trainable_params'] / 1e6:.2f} M "
          f"trainable parameters ({t['input']})")


if __name__ == "__main__":
    sys.exit(main())
