"""Load the official CLIP and SAM weights from safetensors files, in either official naming.

Two namings exist for each model: the original one (OpenAI CLIP's state dict, `segment_anything`'s
checkpoint) and the Hugging Face one (`openai/clip-vit-base-patch16`, `facebook/sam-vit-base`).
Our modules use the original names, so the original files load with a plain strict
`load_state_dict`; each Hugging Face naming is one readable rename table below.

    python load_weights.py download clip|sam|vocab [--out DIR]    # official file, checked, -> safetensors
    python load_weights.py convert IN.pth|IN.pt OUT.safetensors
    python load_weights.py inspect FILE.safetensors
"""
import argparse
import math
import os
import re
import sys
import tempfile
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clip_vit import CLIP, CLIPConfig
from fetch import DownloadError, download_from_mirrors
from sam import SAM, SAMConfig


class WeightsError(ValueError):
    """A weights file that cannot be loaded as asked; the message names the file and the keys."""


def read_safetensors(path) -> dict:
    """Every tensor of a safetensors file, or a WeightsError that says what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def check_and_load(module: torch.nn.Module, state: dict, path, ignore=(), assign=False) -> None:
    """Strict load: every missing, unexpected or mis-shaped tensor is listed in one error. assign: the module's
    tensors become the given ones (a module built on the meta device), else the values are copied in."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.endswith(s) for s in ignore)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise WeightsError(f"{path}: cannot load into {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=assign)


# ---- CLIP ----

# Entries that are not parameters: Hugging Face's `position_ids` buffers and the scalars OpenAI's
# TorchScript state dict carries (`input_resolution`, `context_length`, `vocab_size`).
_CLIP_NOT_PARAMETERS = ("position_ids", "input_resolution", "context_length", "vocab_size")

# Hugging Face CLIPModel -> OpenAI naming: the first row whose prefix starts a key renames it.
_HF_CLIP_PREFIXES = (
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic, HF's spelling
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"),  # nn.Linear weight (out, in): transposed
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_projection.weight", "text_projection"),  # nn.Linear weight (out, in): transposed
    ("logit_scale", "logit_scale"),
)
# inside one transformer block; HF's separate q/k/v projections are concatenated into in_proj
_HF_CLIP_BLOCK = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_HF_CLIP_TRANSPOSED = ("visual.proj", "text_projection")
_BLOCK_KEY = re.compile(r"(.*\.resblocks\.\d+\.)(.*)")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def _rename_prefix(key: str, table):
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def clip_naming(state: dict):
    """'openai', 'hf' (Hugging Face CLIPModel) or None when the state dict is neither."""
    if "visual.conv1.weight" in state:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in state:
        return "hf"
    return None


def clip_state_from_hf(state: dict) -> dict:
    """Hugging Face naming -> OpenAI naming. Keys no table row knows are kept as they are (and q/k/v
    projections of a block that lacks one of the three), so the strict load names them."""
    out, qkv = {}, {}  # qkv: (block prefix, weight|bias) -> {q|k|v: (hf key, tensor)}
    for key, value in state.items():
        new = _rename_prefix(key, _HF_CLIP_PREFIXES)
        block = _BLOCK_KEY.fullmatch(new or "")
        projection = block and _HF_QKV.fullmatch(block[2])
        if projection:
            letter, kind = projection.groups()
            qkv.setdefault((block[1], kind), {})[letter] = (key, value)
            continue
        if block:
            inner = _rename_prefix(block[2], _HF_CLIP_BLOCK)
            new = block[1] + inner if inner else None
        if new is None:
            out[key] = value
        else:
            out[new] = value.t() if new in _HF_CLIP_TRANSPOSED else value
    for (prefix, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:  # OpenAI's in_proj rows are q, then k, then v
            out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts[c][1] for c in "qkv"])
        else:
            out.update(parts.values())
    return out


def infer_clip_config(state: dict, path="state dict") -> CLIPConfig:
    """Architecture from tensor shapes, as OpenAI's `build_model` does.

    The head count is not in any shape: like OpenAI we use width // 64, which holds for every released
    CLIP (ViT-B: 12 and 8 heads, ViT-L: 16 and 12) but not for CLIPConfig.tiny() (width 64, 2 heads).
    """
    if clip_naming(state) == "hf":
        state = clip_state_from_hf(state)

    def shape(key):
        if key not in state:
            raise WeightsError(f"{path}: no '{key}', cannot infer the CLIP architecture")
        return state[key].shape

    def layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    vision_width, _, patch, _ = shape("visual.conv1.weight")
    grid = math.isqrt(shape("visual.positional_embedding")[0] - 1)
    if grid * grid + 1 != shape("visual.positional_embedding")[0]:
        raise WeightsError(f"{path}: visual.positional_embedding {tuple(shape('visual.positional_embedding'))} "
                           "is not 1 + a square grid")
    text_width = shape("ln_final.weight")[0]
    return CLIPConfig(
        embed_dim=shape("text_projection")[1], image_size=grid * patch, patch_size=patch,
        vision_width=vision_width, vision_layers=layers("visual.transformer.resblocks."),
        vision_heads=vision_width // 64, context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0], text_width=text_width,
        text_layers=layers("transformer.resblocks."), text_heads=text_width // 64)


def load_clip(path, device="cpu") -> CLIP:
    """CLIP from a safetensors file in OpenAI or Hugging Face naming (detected), sizes inferred.

    Strict: every missing, unexpected or mis-shaped tensor raises WeightsError. Half-precision files
    are copied into the float32 model.
    """
    state = {k: v for k, v in read_safetensors(path).items() if k.rsplit(".", 1)[-1] not in _CLIP_NOT_PARAMETERS}
    naming = clip_naming(state)
    if naming is None:
        raise WeightsError(f"{path}: not a CLIP checkpoint (neither OpenAI's 'visual.conv1.weight' nor "
                           "Hugging Face's 'vision_model.embeddings.patch_embedding.weight' is in it)")
    if naming == "hf":
        state = clip_state_from_hf(state)
    with torch.device("meta"):  # shapes only: no random init (~2 s for ViT-B/16), the load sets every tensor
        model = CLIP(infer_clip_config(state, path))
    check_and_load(model, {k: v.to(device, torch.float32).contiguous() for k, v in state.items()}, path, assign=True)
    return model


# ---- SAM ----

# transformers' SamModel keeps the point-encoding Gaussian under one or both of these keys (tied).
_HF_SAM_GAUSSIAN = ("shared_image_embedding.positional_embedding",
                    "prompt_encoder.shared_embedding.positional_embedding")
_SAM_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# Hugging Face SamModel -> segment_anything naming: the first pattern matching the start of a key renames
# it; keys no row matches are already equal in both namings (attn.qkv, q_proj, iou_token, ...).
# Numerical difference: transformers builds the two-way blocks' layer_norm1..4 with eps 1e-6
# (config.layer_norm_eps) where segment_anything uses nn.LayerNorm's 1e-5. The weights are the same;
# we follow the original, so an HF file reproduces segment_anything's outputs, not transformers'.
_HF_SAM_RENAMES = tuple((re.compile("^" + old), new) for old, new in (
    (r"vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"vision_encoder\.layers\.", "image_encoder.blocks."),  # attn.qkv (fused in both), attn.proj, rel_pos, mlp
    (r"vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"vision_encoder\.", "image_encoder."),  # pos_embed
    (r"prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
))
# HF's MLP heads name their n linears proj_in, layers.0 .. layers.{n-3}, proj_out;
# segment_anything's are layers.0 .. layers.{n-1}.
_HF_SAM_MLP = re.compile(r"(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))"
                         r"\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)")


def sam_naming(state: dict):
    """'segment_anything', 'hf' (transformers SamModel) or None when the state dict is neither."""
    if "image_encoder.patch_embed.proj.weight" in state:
        return "segment_anything"
    if "vision_encoder.patch_embed.projection.weight" in state:
        return "hf"
    return None


def sam_state_from_hf(state: dict, path="state dict") -> dict:
    """Hugging Face naming -> segment_anything naming. Unknown keys are kept, so the strict load names them."""
    state = dict(state)
    gaussians = [(key, state.pop(key)) for key in _HF_SAM_GAUSSIAN if key in state]
    if len(gaussians) == 2 and not torch.equal(gaussians[0][1], gaussians[1][1]):
        raise WeightsError(f"{path}: {gaussians[0][0]} and {gaussians[1][0]} differ; transformers ties them, "
                           "so the file is inconsistent")
    out = {_SAM_GAUSSIAN: gaussians[0][1]} if gaussians else {}
    hidden = {}  # MLP prefix -> number of hidden `layers.j`
    for key in state:
        mlp = _HF_SAM_MLP.fullmatch(key)
        if mlp and mlp[3] is not None:
            hidden[mlp[1]] = max(hidden.get(mlp[1], 0), int(mlp[3]) + 1)
    for key, value in state.items():
        new = _hf_sam_key(key, hidden)
        if new in out:
            raise WeightsError(f"{path}: '{key}' and another tensor both map to '{new}'")
        out[new] = value
    return out


def _hf_sam_key(key: str, hidden: dict) -> str:
    mlp = _HF_SAM_MLP.fullmatch(key)
    if mlp:
        prefix, part, j, kind = mlp.groups()
        index = 0 if part == "proj_in" else hidden.get(prefix, 0) + 1 if part == "proj_out" else int(j) + 1
        return f"{prefix}.layers.{index}.{kind}"
    for pattern, new in _HF_SAM_RENAMES:
        renamed, n = pattern.subn(new, key, count=1)
        if n:
            return renamed
    return key


def infer_sam_config(state: dict, path="state dict") -> SAMConfig:
    """SAM sizes from tensor shapes (either naming): ViT-B/L/H and smaller variants.

    Widths, depths and the encoder's heads (width / rel_pos head dim) are in the shapes; the global
    attention blocks are those whose rel_pos table spans the whole grid (2 * grid - 1 rows), the others
    give the window size. Not in the shapes: the decoder's head count, left at 8 (every released SAM);
    pass `config=` to `load_sam` for other models.
    """
    if sam_naming(state) == "hf":
        state = sam_state_from_hf(state, path)

    def shape(key):
        if key not in state:
            raise WeightsError(f"{path}: no '{key}', cannot infer the SAM architecture")
        return state[key].shape

    def count(prefix, suffix):
        return sum(1 for i in range(len(state)) if f"{prefix}{i}{suffix}" in state)

    width, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = count("image_encoder.blocks.", ".norm1.weight")
    rows = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    windows = {(n + 1) // 2 for n in rows if n != 2 * grid - 1}
    if len(windows) > 1:
        raise WeightsError(f"{path}: windowed blocks disagree on the window size ({sorted(windows)})")
    return SAMConfig(
        image_size=grid * patch, patch_size=patch, encoder_width=width, encoder_depth=depth,
        encoder_heads=width // shape("image_encoder.blocks.0.attn.rel_pos_h")[1],
        global_attn_indexes=tuple(i for i, n in enumerate(rows) if n == 2 * grid - 1),
        window_size=windows.pop() if windows else SAMConfig.window_size,
        prompt_dim=shape("image_encoder.neck.0.weight")[0],
        mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=count("mask_decoder.transformer.layers.", ".norm1.weight"),
        decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=count("mask_decoder.iou_prediction_head.layers.", ".weight"),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0])


def load_sam(path, device="cpu", config: SAMConfig = None) -> SAM:
    """SAM from a safetensors file in segment_anything or Hugging Face naming (detected), sizes inferred
    unless `config` is given. Strict: every missing, unexpected or mis-shaped tensor raises WeightsError."""
    state = read_safetensors(path)
    naming = sam_naming(state)
    if naming is None:
        raise WeightsError(f"{path}: not a SAM checkpoint (neither segment_anything's "
                           "'image_encoder.patch_embed.proj.weight' nor Hugging Face's "
                           "'vision_encoder.patch_embed.projection.weight' is in it)")
    if naming == "hf":
        state = sam_state_from_hf(state, path)
    with torch.device(device):
        model = SAM(config or infer_sam_config(state, path))
    check_and_load(model, state, path)
    return model


# ---- downloading the official files ----

# The defaults of `download`: (mirrors, SHA-256 or None, converted to safetensors?).
# - CLIP: OpenAI's ViT-B/16 file from _MODELS in openai/CLIP's clip/clip.py; the path carries the file's
#   SHA-256 (clip.py checks it the same way). openaipublic.azureedge.net is the CDN in front of the
#   storage account openaipublic.blob.core.windows.net, which serves the same path.
# - SAM: the ViT-B checkpoint linked from the facebookresearch/segment-anything README, which documents no
#   checksum; the file is checked by loading it.
# - vocab: clip/bpe_simple_vocab_16e6.txt.gz of openai/CLIP (one version since 2021; the SHA-256 is that
#   file's, identical to the copy shipped in the open_clip package).
_CLIP_B16 = "clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"
OFFICIAL_FILES = {
    "clip": ((f"https://openaipublic.azureedge.net/{_CLIP_B16}",
              f"https://openaipublic.blob.core.windows.net/{_CLIP_B16}"), _CLIP_B16.split("/")[2], True),
    "sam": (("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",), None, True),
    "vocab": (("https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz",),
              "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a", False),
}
_NAMING = {"clip": clip_naming, "sam": sam_naming}


def download_official(kind: str, out_dir, url: str | None = None, sha256: str | None = None) -> str:
    """Fetch one of OFFICIAL_FILES (or `url` instead, checked only against `sha256`) into out_dir and,
    for weights, convert it to a .safetensors beside it; returns the path to give train.py."""
    mirrors, default_sha256, to_safetensors = OFFICIAL_FILES[kind]
    if url is not None:
        mirrors, default_sha256 = (url,), None
    sha256 = sha256 or default_sha256
    original = os.path.join(out_dir, os.path.basename(mirrors[0].split("?")[0]) or f"{kind}.download")
    print(f"{mirrors[0]} -> {original} (SHA-256 {'checked' if sha256 else 'not known: not checked'})",
          file=sys.stderr)
    download_from_mirrors(mirrors, original, sha256)
    if not to_safetensors:
        return original
    converted = os.path.splitext(original)[0] + ".safetensors"
    if not (os.path.isfile(converted) and os.path.getmtime(converted) >= os.path.getmtime(original)):
        state = convert(original, converted)
        if _NAMING[kind](state) is None:
            os.remove(converted)
            raise WeightsError(f"{original}: not a {kind.upper()} checkpoint in a known naming")
    return converted


# ---- command line ----

_VIT_SIZES = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}


def read_original(path) -> dict:
    """Tensors of an original checkpoint: a pickled state dict (`.pth`, loaded with weights_only=True)
    or a TorchScript archive (OpenAI's CLIP `.pt`), recognised by its `constants.pkl` entry."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if _is_torchscript(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for unreadable files
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("model", "state_dict"):
        state = next(iter(state.values()))  # training checkpoints wrap the weights
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:8]))}")
    return state


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def convert(src, dst) -> dict:
    """Write the tensors of an original checkpoint to a safetensors file; returns them.

    Tensors are cloned (safetensors refuses tensors sharing storage, e.g. tied weights) and made
    contiguous; the file appears atomically (temporary file in the same folder, then os.replace).
    """
    state = {k: v.detach().clone().contiguous() for k, v in read_original(src).items()}
    dst = os.fspath(dst)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dst)), suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return state


def describe(path) -> str:
    """Which model a safetensors file holds, in which naming, and its inferred config."""
    state = read_safetensors(path)
    millions = sum(v.numel() for v in state.values()) / 1e6
    if clip_naming(state):
        naming, config = clip_naming(state), infer_clip_config(state, path)
        model = f"CLIP {_VIT_SIZES.get(config.vision_width, f'ViT (width {config.vision_width})')}/{config.patch_size}"
    elif sam_naming(state):
        naming, config = sam_naming(state), infer_sam_config(state, path)
        model = f"SAM {_VIT_SIZES.get(config.encoder_width, f'ViT (width {config.encoder_width})')}"
    else:
        raise WeightsError(f"{path}: neither a CLIP nor a SAM checkpoint in a known naming")
    return f"{path}: {model}, {naming} naming, {len(state)} tensors, {millions:.1f}M parameters\n{config}"


def _sha256_hex(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a SHA-256 (64 hexadecimal digits)")
    return text.lower()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Download, convert and inspect CLIP / SAM weight files.")
    commands = parser.add_subparsers(dest="command", required=True)
    download_cmd = commands.add_parser(
        "download", help="fetch an official file (resumable, SHA-256 checked when known), convert weights to "
                         ".safetensors; the last line printed is the path to give train.py")
    download_cmd.add_argument("what", choices=tuple(OFFICIAL_FILES),
                              help="clip: OpenAI ViT-B/16, sam: SAM ViT-B, vocab: CLIP's BPE vocabulary")
    download_cmd.add_argument("--out", default="weights", help="folder for the files (default: weights)")
    download_cmd.add_argument("--url", help="fetch this URL instead of the official one")
    download_cmd.add_argument("--sha256", type=_sha256_hex,
                              help="expected SHA-256 of the file (default: the official file's, where known)")
    convert_cmd = commands.add_parser("convert", help="original .pth / TorchScript .pt -> .safetensors")
    convert_cmd.add_argument("src", help="original checkpoint (.pth state dict or OpenAI TorchScript .pt)")
    convert_cmd.add_argument("dst", help="output .safetensors file")
    inspect_cmd = commands.add_parser("inspect", help="print the model, naming and size a .safetensors holds")
    inspect_cmd.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            path = download_official(args.what, args.out, args.url, args.sha256)
            if path.endswith(".safetensors"):
                print(describe(path))
            print(path)
        elif args.command == "convert":
            state = convert(args.src, args.dst)
            print(f"wrote {len(state)} tensors to {args.dst}")
        else:
            print(describe(args.file))
    except DownloadError as e:
        url = args.url or OFFICIAL_FILES[args.what][0][0]
        dest = os.path.join(args.out, os.path.basename(url.split("?")[0]))
        print(f"error: {e}. By hand: fetch it elsewhere (a browser, or `curl -L -C - -o {dest} {url}`), put it at "
              f"{dest} and run this command again: a file there is checked and converted, not fetched again",
              file=sys.stderr)
        return 1
    except (WeightsError, OSError) as e:  # unreadable or missing files, a folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
