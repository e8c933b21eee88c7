"""Segment Anything (SAM, Kirillov et al. 2023): image encoder, prompt encoder and mask decoder.

Prompt-RIS (§3.1) uses SAM frozen: its ViT image encoder embeds the image once, its prompt encoder
turns CLIP's coarse mask and chosen point into prompts, and its mask decoder produces the final mask
(Eq. 4). Parameter names equal `segment_anything`'s checkpoint names, so `sam_vit_b_01ec64.pth`
(converted to safetensors) loads with a plain strict `load_state_dict`.

Differences from `segment_anything` (outputs equal to float32 round-off, see tests/test_sam.py):
- every attention runs through `F.scaled_dot_product_attention`; the image encoder's decomposed
  relative-position bias is its additive `attn_mask`;
- `MaskDecoder` takes one image embedding for all prompt sets (batch 1, broadcast) or one per prompt
  set (same batch); the original `repeat_interleave`s the image batch and so assumes a single image;
- `PromptEncoder.forward` builds embeddings without in-place writes, so gradients reach the point
  coordinates and the embeddings (Prompt-RIS back-propagates through the mask and point prompts);
- no `@torch.no_grad()` on any forward: freezing is the caller's decision.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SAM_MEAN = (123.675, 116.28, 103.53)  # RGB pixel mean, 0..255 units
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class SAMConfig:
    """SAM sizes; the defaults are ViT-B (`sam_vit_b_01ec64.pth`)."""
    image_size: int = 1024
    patch_size: int = 16
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple = (2, 5, 8, 11)
    window_size: int = 14
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def grid(self) -> int:
        """Side of the image embedding: 64 for a 1024 input."""
        return self.image_size // self.patch_size

    @classmethod
    def tiny(cls) -> "SAMConfig":
        """Same architecture, small numbers: for fast tests. The mask embedding keeps ViT-B's 16 channels: its
        first LayerNorm spans mask_in_chans // 4 of them, and over a single one it returns a constant."""
        return cls(image_size=256, encoder_width=64, encoder_depth=2, encoder_heads=2, global_attn_indexes=(1,),
                   window_size=4, prompt_dim=32, mask_in_chans=16, decoder_depth=2, decoder_heads=2,
                   decoder_mlp_dim=64, iou_head_hidden_dim=32)

    @classmethod
    def vit_l(cls) -> "SAMConfig":
        return cls(encoder_width=1024, encoder_depth=24, encoder_heads=16, global_attn_indexes=(5, 11, 17, 23))

    @classmethod
    def vit_h(cls) -> "SAMConfig":
        return cls(encoder_width=1280, encoder_depth=32, encoder_heads=16, global_attn_indexes=(7, 15, 23, 31))


def resize_longest_side_shape(h: int, w: int, target: int) -> Tuple[int, int]:
    """(new_h, new_w) with the longest side equal to `target`, rounded as SAM's ResizeLongestSide does."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


# ---- common blocks ----

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt style, eps 1e-6 as in SAM)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two-layer transformer MLP: lin1 -> act -> lin2 (GELU in the encoder, ReLU in the decoder)."""

    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`depth` linear layers with ReLU between them (the mask decoder's hypernetworks and IoU head)."""

    def __init__(self, dim: int, hidden: int, out: int, depth: int):
        super().__init__()
        sizes = [dim] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


# ---- image encoder (ViTDet-style ViT) ----

def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(2*size-1, d) embeddings of offsets -> (size, size, d) table with R[i, j] = rel_pos[i - j + size - 1]."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, a side of {size} needs "
                         f"{2 * size - 1}: the input grid differs from the one the weights were built for")
    offsets = torch.arange(size, device=rel_pos.device)
    return rel_pos[offsets[:, None] - offsets[None, :] + size - 1]


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, window, window, C) zero-padded windows, and the padded (Hp, Wp)."""
    B, H, W, C = x.shape
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.view(B, Hp // window, window, Wp // window, window, C).transpose(2, 3)  # (B, nH, nW, win, win, C)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: Tuple[int, int],
                       size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nH * nW, window, window, C) -> (B, H, W, C), padding dropped."""
    (Hp, Wp), (H, W) = padded, size
    x = windows.view(-1, Hp // window, Wp // window, window, window, windows.shape[-1]).transpose(2, 3)
    return x.reshape(-1, Hp, Wp, windows.shape[-1])[:, :H, :W]


class Attention(nn.Module):
    """Multi-head self-attention over a (h, w) token grid with decomposed relative positions (MViTv2).

    The logit between query i = (hi, wi) and key j = (hj, wj) is
        q_i . k_j / sqrt(d)  +  q_i . Rh[hi - hj]  +  q_i . Rw[wi - wj]
    where the last two terms (unscaled q, as in SAM) form the additive `attn_mask` of SDPA.
    """

    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, h, w, D)."""
        B, h, w, D = x.shape
        q, k, v = self.qkv(x).view(B, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, hw, d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos_bias(q, h, w))  # (B, heads, hw, d)
        return self.proj(x.transpose(1, 2).reshape(B, h, w, D))

    def rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, heads, hw, d) queries -> (B, heads, hw, hw) additive bias; only two small einsums
        (B, heads, h, w, h) and (B, heads, h, w, w) are computed, then broadcast-added once."""
        B, heads, _, d = q.shape
        q = q.view(B, heads, h, w, d)
        bias_h = torch.einsum("bnhwd,hkd->bnhwk", q, relative_position_table(self.rel_pos_h, h)).contiguous()
        bias_w = torch.einsum("bnhwd,wkd->bnhwk", q, relative_position_table(self.rel_pos_w, w)).contiguous()
        return (bias_h[..., :, None] + bias_w[..., None, :]).view(B, heads, h * w, h * w)  # contiguous: no copy


class Block(nn.Module):
    """Pre-norm ViT block; attention is global (window 0) or within non-overlapping windows."""

    def __init__(self, dim: int, heads: int, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, window or grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) -> (B, H, W, D)."""
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window:
            return self.attn(x)
        windows, padded = window_partition(x, self.window)  # padded tokens are zeros and stay visible, as in SAM
        return window_unpartition(self.attn(windows), self.window, padded, x.shape[1:3])


class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, S/p, S/p, D) channels-last patch tokens."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's image encoder: (B, 3, S, S) normalized pixels -> (B, prompt_dim, S/16, S/16) embedding."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.img_size = cfg.image_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.encoder_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.encoder_width))
        self.blocks = nn.ModuleList(
            Block(cfg.encoder_width, cfg.encoder_heads, 0 if i in cfg.global_attn_indexes else cfg.window_size,
                  cfg.grid) for i in range(cfg.encoder_depth))
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.encoder_width, cfg.prompt_dim, kernel_size=1, bias=False), LayerNorm2d(cfg.prompt_dim),
            nn.Conv2d(cfg.prompt_dim, cfg.prompt_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.prompt_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"SAM image encoder expects (B, 3, {self.img_size}, {self.img_size}) input, "
                             f"got {tuple(x.shape)}; use SAM.preprocess to resize and pad")
        x = self.patch_embed(x) + self.pos_embed  # (B, g, g, D)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, D, g, g) -> (B, C, g, g)


# ---- prompt encoder ----

def full_precision(device: torch.device):
    """A region where autocast is off, so the math stays float32 (shape-only `meta` tensors have no autocast)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D positions: (x, y) in [0, 1] -> [sin(2 pi p G), cos(2 pi p G)],
    p = 2 (x, y) - 1, with a fixed Gaussian matrix G (2, C/2).

    Always float32, also under autocast: arguments reach about +-30 rad, where bf16 would be off by up to
    0.14 on values in [-1, 1], which is not what the frozen SAM was trained with. The encodings of the grids
    in `cached_grids` (the image embedding's, for the dense PE) are computed once, kept as buffers (so they
    follow the module to its device), and recomputed whenever G is loaded, however the state dict arrives.
    """

    def __init__(self, num_pos_feats: int, cached_grids: Sequence[Tuple[int, int]] = ()):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))
        self.cached_grids: Tuple[Tuple[int, int], ...] = ()
        for size in cached_grids:
            self.cache_grid(size)
        self.register_load_state_dict_post_hook(PositionEmbeddingRandom._refresh_grid_tables)

    def cache_grid(self, size: Tuple[int, int]) -> None:
        """Keep the encoding of the (h, w) grid as a buffer from now on (Prompt-RIS's point table E)."""
        size = tuple(size)
        if size not in self.cached_grids:
            self.register_buffer(f"grid_table_{len(self.cached_grids)}", self.grid_table(size), persistent=False)
            self.cached_grids += (size,)

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions in [0, 1] as (x, y) -> (..., C), float32."""
        gaussian = self.positional_encoding_gaussian_matrix.float()
        with full_precision(coords.device):
            coords = 2 * math.pi * ((2 * coords.float() - 1) @ gaussian)
            return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(..., 2) pixel positions (x, y) in an (H, W) = `image_size` frame -> (..., C)."""
        scale = torch.tensor([image_size[1], image_size[0]], device=coords.device, dtype=torch.float32)
        return self.encode(coords.float() / scale)

    def grid_table(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid, row-major -> (h * w, C)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)  # (h, w, 2) as (x, y)
        with torch.no_grad():
            return self.encode(grid.flatten(0, 1))

    def cached_table(self, size: Tuple[int, int]) -> torch.Tensor:
        """grid_table(size), read from the buffer when `size` is one of the cached grids."""
        size = tuple(size)
        if size in self.cached_grids:
            return getattr(self, f"grid_table_{self.cached_grids.index(size)}")
        return self.grid_table(size)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid -> (C, h, w) (a view of the cached table)."""
        return self.cached_table(size).t().unflatten(1, tuple(size))

    @staticmethod
    def _refresh_grid_tables(module: "PositionEmbeddingRandom", incompatible_keys) -> None:
        """load_state_dict post-hook (also when a parent module is loaded): the tables follow the new G."""
        for i, size in enumerate(module.cached_grids):
            setattr(module, f"grid_table_{i}", module.grid_table(size))


class PromptEncoder(nn.Module):
    """Points, boxes and masks -> sparse (B, N', C) and dense (B, C, h, w) prompt embeddings."""

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int], input_image_size: Tuple[int, int],
                 mask_in_chans: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, cached_grids=(image_embedding_size,))
        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(  # (B, 1, 4h, 4w) -> (B, C, h, w)
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans),
            nn.GELU(), nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size)[None]

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixel (x, y) in the input frame, (B, N) labels -> (B, N + pad, C).

        Label 1 = foreground, 0 = background, -1 = "not a point" (its embedding replaces the position);
        `pad` appends one not-a-point, as SAM does when no box follows the points.
        """
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        labels = labels[..., None]
        emb = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # +0.5: pixel centre
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (labels == 0) * self.point_embeddings[0].weight
        return emb + (labels == 1) * self.point_embeddings[1].weight

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) boxes (x0, y0, x1, y1) in input-frame pixels -> (B, 2, C) corner embeddings."""
        corners = self.pe_layer.forward_with_coords(boxes.reshape(-1, 2, 2) + 0.5, self.input_image_size)
        return corners + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """points (B, N, 2) + labels (B, N), boxes (B, 4), masks (B, 1, 4h, 4w) logits, each optional ->
        sparse (B, N', C) with N' = N + 1 (padding) or N + 2 (box corners), dense (B, C, h, w)."""
        given = [t for t in (points[0] if points is not None else None, boxes, masks) if t is not None]
        batch = given[0].shape[0] if given else 1
        sparse = [self.not_a_point_embed.weight.new_zeros(batch, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self.embed_points(*points, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.view(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return torch.cat(sparse, dim=1), dense


# ---- mask decoder (two-way transformer) ----

class DecoderAttention(nn.Module):
    """Multi-head attention whose q/k/v live in a `dim / downsample` wide space (SAM's cross-attention)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        self.heads = heads
        inner = dim // downsample
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C), key_mask (B, Nk) bool (True = may be attended) -> (B, Nq, C)."""
        q, k, v = (self.split(proj(t)) for proj, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Nq, d)
        return self.out_proj(x.transpose(1, 2).flatten(2))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * d) -> (B, heads, N, d)."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, attend to the image, pass an MLP; then the image attends to the tokens.
    Positional encodings are re-added to queries and keys at every attention (not to values)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = DecoderAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5 as in segment_anything (transformers uses 1e-6 here)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, downsample=2)

    def forward(self, queries, keys, query_pe, key_pe, token_mask=None):
        """queries (B, Nt, C), keys (B, hw, C) with their positional encodings -> updated (queries, keys).
        token_mask (B, Nt) bool: tokens marked False are never attended to (they still attend themselves)."""
        if self.skip_first_layer_pe:  # first layer: the queries are the prompt embeddings themselves
            queries = self.norm1(self.self_attn(queries, queries, queries, token_mask))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries, token_mask))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks and a final token-to-image attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = DecoderAttention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                token_mask: Optional[torch.Tensor] = None):
        """image and image_pe (B, C, h, w), tokens (B, Nt, C), token_mask (B, Nt) bool or None (all real) ->
        tokens (B, Nt, C), image (B, hw, C)."""
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)  # (B, hw, C)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, token_mask)
        out = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> mask logits at 4x the embedding resolution and IoU scores."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        dim = cfg.prompt_dim
        self.num_mask_tokens = cfg.num_multimask_outputs + 1  # one for single-mask output, the rest multimask
        self.transformer = TwoWayTransformer(dim, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.decoder_depth)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(  # (B, C, h, w) -> (B, C/8, 4h, 4w)
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool,
                sparse_prompt_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (1 or B, C, h, w), image_pe (1, C, h, w), sparse (B, N, C), dense (B, C, h, w) ->
        masks (B, k, 4h, 4w) logits and iou_pred (B, k); k = num_multimask_outputs if multimask_output else 1.
        sparse_prompt_mask (B, N) bool, True = real token: False tokens (padding, dropped prompts) are never
        attended to, which equals removing them; None = all real (the official behaviour)."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings, sparse_prompt_mask)
        keep = slice(1, None) if multimask_output else slice(0, 1)  # token 0 is the single-mask output
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(self, image_embeddings, image_pe, sparse, dense, sparse_mask=None):
        """All mask tokens' outputs: masks (B, num_mask_tokens, 4h, 4w), iou_pred (B, num_mask_tokens)."""
        B = sparse.shape[0]
        if image_embeddings.shape[0] not in (1, B):
            raise ValueError(f"image_embeddings batch {image_embeddings.shape[0]} must be 1 (shared image) or "
                             f"equal the prompt batch {B}")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (1 + num_mask_tokens, C)
        tokens = torch.cat([output_tokens.expand(B, -1, -1), sparse], dim=1)  # (B, Nt, C)
        src = (image_embeddings + dense).expand(B, -1, -1, -1)  # broadcast a single image over the prompts
        token_mask = None if sparse_mask is None else torch.cat(  # the output tokens are always real
            [sparse_mask.new_ones(B, output_tokens.shape[0]), sparse_mask.bool()], dim=1)  # (B, Nt)
        hs, src = self.transformer(src, image_pe.expand(B, -1, -1, -1), tokens, token_mask)
        iou_out, mask_out = hs[:, 0], hs[:, 1:1 + self.num_mask_tokens]
        h, w = image_embeddings.shape[-2:]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(B, -1, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ upscaled.flatten(2)).view(B, -1, *upscaled.shape[-2:])  # (B, k, C/8) @ (B, C/8, 16hw)
        return masks, self.iou_prediction_head(iou_out)


# ---- SAM ----

class SAM(nn.Module):
    """The three SAM components and its pixel pre/post-processing (no end-to-end forward: Prompt-RIS
    calls the components itself, and freezing is decided where the model is assembled)."""

    def __init__(self, cfg: Optional[SAMConfig] = None):
        super().__init__()
        cfg = cfg or SAMConfig()
        self.config = cfg
        self.image_encoder = ImageEncoderViT(cfg)
        self.prompt_encoder = PromptEncoder(cfg.prompt_dim, (cfg.grid, cfg.grid), (cfg.image_size, cfg.image_size),
                                            cfg.mask_in_chans)
        self.mask_decoder = MaskDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(SAM_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_STD).view(3, 1, 1), persistent=False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) RGB in 0..255 -> same rank at (S, S): longest side resized to S
        (ResizeLongestSide rounding, bilinear with antialias), normalized, zero-padded bottom/right.
        The valid region is `resize_longest_side_shape(H, W, S)`, the `input_size` of `postprocess_masks`."""
        S = self.config.image_size
        x = image.float() if image.dim() == 4 else image.float()[None]
        if max(x.shape[-2:]) != S:
            x = F.interpolate(x, resize_longest_side_shape(*x.shape[-2:], S), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, S - x.shape[-1], 0, S - x.shape[-2]))
        return x if image.dim() == 4 else x[0]

    def postprocess_masks(self, masks: torch.Tensor, input_size: Tuple[int, int],
                          original_size: Tuple[int, int]) -> torch.Tensor:
        """(B, k, h, w) low-res logits -> (B, k, H, W) logits at the original image size: upsample to the
        padded S x S frame, crop the valid `input_size`, resize to `original_size` (both bilinear)."""
        S = self.config.image_size
        masks = F.interpolate(masks, (S, S), mode="bilinear", align_corners=False)
        masks = masks[..., :int(input_size[0]), :int(input_size[1])]
        return F.interpolate(masks, tuple(int(s) for s in original_size), mode="bilinear", align_corners=False)
