"""Official implementations to test against, loaded without their package `__init__`.

`import segment_anything` imports torchvision (its predictor and mask generator), which is broken
beside torch 2.13 here. Its `modeling/` files only import each other and torch, so we register an
empty package under a private name whose `__path__` is that folder: their relative imports then
resolve, and `segment_anything/__init__.py` never runs. `utils/transforms.py` (ResizeLongestSide)
imports two torchvision functions at module level; we give it PIL-based stand-ins while it loads.
"""
import importlib
import importlib.util
import os
import sys
import types
from functools import lru_cache

import numpy as np
from PIL import Image

_PACKAGE = "_official_segment_anything"


def _segment_anything_dir() -> str:
    spec = importlib.util.find_spec("segment_anything")  # locates the package without executing it
    if spec is None:
        raise ImportError("segment_anything is not installed")
    return spec.submodule_search_locations[0]


@lru_cache(maxsize=None)
def segment_anything_modeling() -> types.ModuleType:
    """The official `segment_anything.modeling` package (Sam, ImageEncoderViT, PromptEncoder, ...)."""
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [os.path.join(_segment_anything_dir(), "modeling")]
    sys.modules[_PACKAGE] = package
    for name in ("common", "image_encoder", "prompt_encoder", "transformer", "mask_decoder", "sam"):
        module = importlib.import_module(f"{_PACKAGE}.{name}")
        for attr in dir(module):
            if not attr.startswith("_"):
                setattr(package, attr, getattr(module, attr))
    return package


@lru_cache(maxsize=None)
def resize_longest_side_class():
    """The official `ResizeLongestSide`, its torchvision imports replaced by PIL equivalents."""
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.to_pil_image = lambda array: Image.fromarray(np.asarray(array))
    functional.resize = lambda image, size: image.resize((size[1], size[0]), Image.BILINEAR)
    stubs = {"torchvision": types.ModuleType("torchvision"),
             "torchvision.transforms": types.ModuleType("torchvision.transforms"),
             "torchvision.transforms.functional": functional}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        path = os.path.join(_segment_anything_dir(), "utils", "transforms.py")
        spec = importlib.util.spec_from_file_location(f"{_PACKAGE}_transforms", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.ResizeLongestSide


def build_official_sam(cfg):
    """segment_anything's `Sam`, built as `build_sam._build_sam` does, with the sizes of a `sam.SAMConfig`."""
    from functools import partial

    import torch

    m = segment_anything_modeling()
    grid = cfg.image_size // cfg.patch_size
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_width, img_size=cfg.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(cfg.global_attn_indexes), window_size=cfg.window_size,
            out_chans=cfg.prompt_dim),
        prompt_encoder=m.PromptEncoder(
            embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=m.TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                            mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
            transformer_dim=cfg.prompt_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def build_hf_sam(cfg):
    """transformers' `SamModel` with the sizes of a `sam.SAMConfig` (random init)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    from transformers import SamModel

    vision = SamVisionConfig(
        hidden_size=cfg.encoder_width, num_hidden_layers=cfg.encoder_depth, num_attention_heads=cfg.encoder_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, window_size=cfg.window_size,
        global_attn_indexes=list(cfg.global_attn_indexes), output_channels=cfg.prompt_dim,
        num_pos_feats=cfg.prompt_dim // 2)
    prompt = SamPromptEncoderConfig(hidden_size=cfg.prompt_dim, image_size=cfg.image_size,
                                    patch_size=cfg.patch_size, mask_input_channels=cfg.mask_in_chans)
    decoder = SamMaskDecoderConfig(
        hidden_size=cfg.prompt_dim, mlp_dim=cfg.decoder_mlp_dim, num_hidden_layers=cfg.decoder_depth,
        num_attention_heads=cfg.decoder_heads, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim)
    return SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt,
                              mask_decoder_config=decoder)).eval()


def randomize_(module, seed: int = 0):
    """Give every tensor of the state dict a random value of a sensible scale, in place, so parity tests see
    non-trivial positional, relative-position and LayerNorm parameters (zeros/ones at init) and notice
    any swapped tensor. Decided by name and shape only, so both namings get the same treatment."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = {name for name, m in module.named_modules() if "norm" in type(m).__name__.lower()}
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():  # persistent only: not pixel_mean/std
            if not t.is_floating_point():
                continue
            owner, leaf = name.rpartition(".")[::2]
            noise = torch.randn(t.shape, generator=gen)
            if "rel_pos" in leaf:
                t.copy_(0.2 * noise)
            elif "pos_embed" in leaf:
                t.copy_(0.5 * noise)
            elif "gaussian" in leaf or "positional_embedding" in leaf:
                t.copy_(noise)  # SAM's Fourier matrix is N(0, 1)
            elif owner in norms:
                t.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * noise)
            elif isinstance(_parent(module, owner), torch.nn.Embedding):
                t.copy_(noise)
            elif t.dim() >= 2 and leaf == "weight":
                fan_in = t[0].numel() if not isinstance(_parent(module, owner), torch.nn.ConvTranspose2d) \
                    else t.shape[0] * t[0, 0].numel()
                t.copy_(noise / fan_in ** 0.5)
            else:
                t.copy_(0.1 * noise)
    return module


def _parent(module, owner: str):
    return module.get_submodule(owner) if owner else module
