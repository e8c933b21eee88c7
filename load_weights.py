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
import ast
import io
import math
import os
import pickle
import re
import sys
import tempfile
import zipfile

import torch
from safetensors import SafetensorError, safe_open
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


def safetensors_shapes(path) -> dict:
    """{key: shape} of a safetensors file from its header alone: no tensor is read, so a file can be checked
    against a model's config before the model is built."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def check_and_load(module: torch.nn.Module, state: dict, path, ignore=(), assign=False) -> None:
    """Strict load: every missing, unexpected or mis-shaped tensor, and every integer or bool tensor meant for a
    floating-point parameter, is listed in one error. assign: the module's
    tensors become the given ones (a module built on the meta device), else the values are copied in."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.endswith(s) for s in ignore)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    # load_state_dict would copy int8 or bool values into a float parameter without a word; integer buffers
    # (Hugging Face CLIP's position_ids) are not floating in the model either and stay accepted
    dtypes = sorted(f"{k}: file {state[k].dtype} vs model {own[k].dtype}" for k in own.keys() & state.keys()
                    if own[k].is_floating_point() and not state[k].is_floating_point())
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                                   ("not floating point", dtypes)) if keys]
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
    state = {k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype) for k, v in state.items()}
    check_and_load(model, {k: v.contiguous() for k, v in state.items()}, path, assign=True)  # names int tensors
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


# ---- OpenAI's TorchScript archive, read without running it ----
#
# OpenAI ships CLIP as a TorchScript archive: a zip whose one folder holds data.pkl (a pickle of the module
# objects, each tensor a reference to a storage record), data/<key> (the raw bytes of each storage) and
# code/ (each class's TorchScript source). torch.jit.load compiles that source and runs it (a class's
# __setstate__ runs while loading), so a crafted archive would run its own code. Here data.pkl is read by an
# unpickler that imports nothing and calls only the handful of functions below, and the source is parsed,
# never run, for what torch.jit.load takes from it: which attributes are parameters and buffers.

# storage type in data.pkl -> dtype (the types torch.save and torch.jit.save write for real and bool tensors)
_STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}


class _ScriptObject:
    """Stands in for an object of a TorchScript class (`__torch__.…`), whose own code is never imported or
    run: pickle's BUILD hands the stored attributes (name -> value) to this __setstate__, which keeps them."""
    qualified_name: str  # `__torch__.torch.nn.modules.linear.Linear`: find_class makes one subclass per name

    def __setstate__(self, state):
        self.attributes = state


class _TorchScriptUnpickler(pickle.Unpickler):
    """data.pkl -> a tree of _ScriptObject holding tensors. Every callable a pickle can reach goes through
    find_class (GLOBAL, STACK_GLOBAL and the copyreg EXT opcodes), so its whitelist is all that can run."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, path: str):
        super().__init__(io.BytesIO(archive.read(folder + "data.pkl")))
        self.archive, self.folder, self.path = archive, folder, path
        self.storages = {}  # key -> flat tensor: tied weights refer to one storage twice

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"qualified_name": f"{module}.{name}"})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a dtype names the storage's element type and cannot be called
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._tensor,
            ("collections", "OrderedDict"): dict,  # a tensor's backward hooks: empty, and dropped
            # type tags and typed lists of TorchScript containers: the plain value is what matters here
            ("torch.jit._pickle", "restore_type_tag"): self._container,
            **{("torch.jit._pickle", f"build_{kind}list"): self._container
               for kind in ("int", "double", "bool", "tensor")},
        }
        if (module, name) not in allowed:
            raise WeightsError(f"{self.path}: refuses to load global '{module}.{name}' (not plain weights)")
        return allowed[module, name]

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel) -> the storage's elements as a flat CPU tensor."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and _naturals((pid[4],))):
            raise WeightsError(f"{self.path}: malformed storage reference {str(pid)[:80]}")
        _, dtype, key, _, numel = pid  # the location (cpu, cuda:0) is ignored: everything is read to the CPU
        if key not in self.storages:
            self.storages[key] = self._read_storage(f"{self.folder}data/{key}", dtype, numel)
        storage = self.storages[key]
        if (storage.dtype, storage.numel()) != (dtype, numel):
            raise WeightsError(f"{self.path}: storage '{key}' is referred to as {numel} x {dtype} and as "
                               f"{storage.numel()} x {storage.dtype}")
        return storage

    def _read_storage(self, record: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if record not in self.archive.NameToInfo:
            raise WeightsError(f"{self.path}: no storage record '{record}'")
        size = self.archive.getinfo(record).file_size  # checked before reading: a wrong count reads nothing
        if size != numel * dtype.itemsize:
            raise WeightsError(f"{self.path}: storage record '{record}' holds {size} bytes, "
                               f"not {numel} x {dtype} ({numel * dtype.itemsize} bytes)")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(self.archive.read(record)), dtype=dtype)

    def _tensor(self, storage, offset, size, stride, *training_state):
        """torch._utils._rebuild_tensor_v2's arguments -> a view of the storage. The rest (requires_grad,
        backward hooks, metadata) is training state, not weights, and is dropped."""
        if not (isinstance(storage, torch.Tensor) and _naturals((offset,)) and _naturals(size)
                and _naturals(stride) and len(size) == len(stride)):
            raise WeightsError(f"{self.path}: malformed tensor record (offset {offset!r}, size {size!r}, "
                               f"stride {stride!r})")
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
        if end > storage.numel():
            raise WeightsError(f"{self.path}: a tensor of size {tuple(size)}, stride {tuple(stride)} at offset "
                               f"{offset} reaches past its storage of {storage.numel()} elements")
        return storage.as_strided(size, stride, offset)

    def _container(self, value, *type_tag):
        return value


def _naturals(values) -> bool:
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


class _ClassSources:
    """What the archive's TorchScript source declares about each class, from its syntax tree (never run)."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, path: str):
        self.archive, self.folder, self.path = archive, folder, path
        self.files = {}  # qualifier (`__torch__.torch.nn.modules.linear`) -> {class name: ast.ClassDef}

    def find(self, qualified_name: str) -> ast.ClassDef:
        """The class `a.b.C` is defined in code/a/b.py, as torch.jit.load looks for it."""
        qualifier, _, name = qualified_name.rpartition(".")
        if qualifier not in self.files:
            record = f"{self.folder}code/{qualifier.replace('.', '/')}.py"
            if record not in self.archive.NameToInfo:
                raise WeightsError(f"{self.path}: no source '{record}' for class '{qualified_name}'")
            tree = ast.parse(self.archive.read(record).decode("utf-8"), record)
            self.files[qualifier] = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        if name not in self.files[qualifier]:
            raise WeightsError(f"{self.path}: class '{qualified_name}' is not defined in its source")
        return self.files[qualifier][name]

    def is_module(self, obj) -> bool:
        return isinstance(obj, _ScriptObject) and any(
            isinstance(base, ast.Name) and base.id == "Module" for base in self.find(obj.qualified_name).bases)

    def weights(self, obj: _ScriptObject) -> tuple:
        """(parameter names, buffer names) a module class declares (`__parameters__ = ["weight", ]`)."""
        node = self.find(obj.qualified_name)
        if any(isinstance(s, ast.FunctionDef) and s.name == "__setstate__" for s in node.body):
            raise WeightsError(f"{self.path}: class '{obj.qualified_name}' restores its attributes with its own "
                               "__setstate__ code, which is not run (not plain weights)")
        names = _declared_names(node, "__parameters__"), _declared_names(node, "__buffers__")
        if not all(isinstance(n, list) and all(isinstance(s, str) for s in n) for n in names):
            raise WeightsError(f"{self.path}: class '{obj.qualified_name}' declares its parameters or buffers "
                               "as something other than a list of names")
        return names


def _declared_names(node: ast.ClassDef, key: str):
    for statement in node.body:
        if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == [key]:
            return ast.literal_eval(statement.value)
    return []


def _module_state(module: _ScriptObject, sources: _ClassSources, path: str, prefix: str = "") -> dict:
    """What torch.jit.load(path).state_dict() holds: a module's parameters, then its buffers (each in
    attribute order, None left out), then each submodule's under `name.`."""
    weights = sources.weights(module)
    attributes = getattr(module, "attributes", None)
    if not isinstance(attributes, dict):
        raise WeightsError(f"{path}: module '{module.qualified_name}' was stored without its attributes")
    state = {}
    for names in weights:
        for name, value in attributes.items():
            if name in names and value is not None:
                if not isinstance(value, torch.Tensor):
                    raise WeightsError(f"{path}: '{prefix}{name}' is declared a tensor but holds a "
                                       f"{type(value).__name__}")
                state[prefix + name] = value
    for name, value in attributes.items():
        if sources.is_module(value):
            state.update(_module_state(value, sources, path, f"{prefix}{name}."))
    return state


def read_torchscript(path) -> dict:
    """The state dict torch.jit.load(path).state_dict() gives, read without running any of the archive's
    code; WeightsError for anything that is not plain weights (a foreign global, a class with its own
    __setstate__, a storage record of the wrong size)."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            folders = {name.split("/", 1)[0] for name in archive.namelist()}
            if len(folders) != 1:
                raise WeightsError(f"{path}: a TorchScript archive holds one folder, this one {len(folders)}")
            folder = folders.pop() + "/"
            if folder + "byteorder" in archive.NameToInfo and archive.read(folder + "byteorder") != b"little":
                raise WeightsError(f"{path}: tensors stored big-endian; only little-endian archives are read")
            root = _TorchScriptUnpickler(archive, folder, path).load()
            if not isinstance(root, _ScriptObject):
                raise WeightsError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
            return _module_state(root, _ClassSources(archive, folder, path), path)
    except WeightsError:
        raise
    except Exception as e:  # a damaged zip, pickle or source: BadZipFile, UnpicklingError, SyntaxError, ...
        raise WeightsError(f"{path}: not a readable TorchScript archive ({type(e).__name__}: {e})") from e


# ---- command line ----

_VIT_SIZES = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}


def read_original(path) -> dict:
    """Tensors of an original checkpoint: a pickled state dict (`.pth`, loaded with weights_only=True)
    or a TorchScript archive (OpenAI's CLIP `.pt`, recognised by its `constants.pkl` entry), whose
    tensors read_torchscript reads without running the archive's code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _is_torchscript(path):
        state = read_torchscript(path)
    else:
        try:
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
