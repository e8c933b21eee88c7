"""Prompt-RIS (Shang et al., CVPR 2024): CLIP and SAM bridged by prompts for referring image segmentation.

Read next to the paper: every equation is computed in one place marked `# Eq. (N)`, and the sections
below follow the paper (§3.1 structure, §3.2 Cross-Modal Prompting, the assembled model, §3.3 losses).
CLIP (clip_vit.py) and SAM (sam.py) are used through their public layers only. In the paper they stay
frozen and what this file adds is what trains; the demo, which starts from random towers (no official
weights), trains them too (train.py --train-towers, PromptRIS.freeze_backbones).

Paper symbol -> code name (N sentences, B images; sentence n shows image `image_index[n]`):
    F_IC^i, c^i        vision tokens between CLIP layers       `x_v` (N, 1 + N_C, D_IC)  CLS first
    F_T^i              text tokens between CLIP layers         `x_t` (N, L, D_T)
    T_V^i, T_L^i       learnable prompt queries of layer i     `cmp.v2l[i].queries`, `cmp.l2v[i].queries` (n, D)
    T_V2L^i, T_L2V^i   cross-modal prompts, Eq. (5), (6)       `to_text` (N, n, D_T), `to_vision` (N, n, D_IC)
    F_IC, F_T          CLIP outputs in the joint space          `f_ic` (N, N_C, D), `f_t` (N, L, D)
    F'_IC, F'_T        tiny cross-modal decoder, Eq. (1)        inside `CoarseMaskDecoder`
    t_g                [EOS] feature of F'_T                    `t_g` (N, D)
    S'_C               coarse mask logits, Eq. (2)              output "coarse" (N, H_C, W_C)
    S_C                S'_C upsampled to 4H_S x 4W_S            `coarse_up` (N, 1, 4h, 4w)
    M, E, e_p          point one-hot, point embedding table,    `m` (N, 16hw), `point_pe_table` (16hw, C)
                       point prompt P_point, Eq. (3)            + SAM's foreground label embedding; `e_p`
    P_mask, P_text     mask and text prompts for SAM            `dense` (N, C, h, w), `p_text` (N, L, C)
    F_IS               SAM image embedding (once per image)     `sam_embeddings` (B, C, h, w)
    S', S              SAM mask (4h x 4w), x4 upsampled (S x S) output "mask" (N, S, S), Eq. (4)
    O, Y, w            overlaps, same-instance targets, IoU     in `icl_loss`, Eq. (7), (8)
    L                  total loss                               `total_loss`, Eq. (9)
Sizes: h = w = H_S = S / 16 (64 at S = 1024), C = SAM prompt_dim (256), D = CLIP embed_dim (512).
"""
import math
import reprlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_vit import CLIP, CLIPConfig, cut_tokens, text_attention_mask
from keyed_random import DROPOUT_STREAM, GUMBEL_STREAM, keyed_uniform
from sam import SAM, SAMConfig, full_precision

CMP_MODES = ("both", "v2l", "l2v", "none")  # Table 4: CMP, V2LP, L2VP, baseline
PROMPT_TYPES = ("mask", "point", "text")  # Table 5


# ---- configuration ----


def _config_from_dict(cls, d: dict, where: str):
    """Build dataclass `cls` from a JSON dict; lists become tuples (JSON has no tuples). A value of another type
    than its field's default ("16" for an int) is a ValueError naming the key, not a TypeError deep in a module."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    for f in fields(cls):
        if f.name in values and f.default is not MISSING and not _same_kind(values[f.name], f.default):
            kind = (f"a list of {type(f.default[0]).__name__}" if isinstance(f.default, tuple) and f.default
                    else type(f.default).__name__)  # as JSON writes it: a tuple is a list
            raise ValueError(f"{where}.{f.name} should be {kind}, got {type(d[f.name]).__name__} "
                             f"{reprlib.repr(d[f.name])}")
    return cls(**values)


def _same_kind(value, default) -> bool:
    """Whether a JSON value fits a field with this default: an int is a float, a bool is not an int, a tuple's items
    are of the kind of the default's first item."""
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, tuple) and (not default or all(_same_kind(v, default[0]) for v in value))
    return type(value) is type(default)


@dataclass
class PromptRISConfig:
    """Model sizes and ablation switches; defaults are the paper's (§4.2) where it gives them."""
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    clip_image_size: int = 480  # §4.2: H_C = W_C = 30
    n_prompts: int = 16  # §4.2: n prompt tokens per layer and direction
    cmp: str = "both"  # Table 4: "both" (CMP) | "v2l" | "l2v" | "none" (baseline)
    use_sam: bool = True  # Table 3: False -> the coarse mask is the output
    prompts: tuple = PROMPT_TYPES  # Table 5: prompt types given to SAM, any subset
    prompt_dropout: float = 0.2  # §4.2 drops prompts in training; the rate is not given, 0.2 is ours
    gumbel_tau: float = 1.0  # Eq. (3) temperature (not given; the standard 1)
    decoder_heads: int = 8  # tiny decoder of Eq. (1) (not given; 64-wide heads as in CLIP's text tower)
    text_prompt_layers: int = 2  # §3.1: "two transformer blocks" make the text prompts

    def __post_init__(self):
        self.prompts = tuple(self.prompts)
        if self.cmp not in CMP_MODES:
            raise ValueError(f"PromptRISConfig.cmp must be one of {CMP_MODES}, got {self.cmp!r}")
        if not set(self.prompts) <= set(PROMPT_TYPES):
            raise ValueError(f"PromptRISConfig.prompts must be a subset of {PROMPT_TYPES}, got {self.prompts}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"PromptRISConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.n_prompts < 1 or self.gumbel_tau <= 0 or self.text_prompt_layers < 1:
            raise ValueError("PromptRISConfig.n_prompts and text_prompt_layers must be >= 1, gumbel_tau > 0; "
                             f"got {self.n_prompts}, {self.text_prompt_layers}, {self.gumbel_tau}")
        if self.clip_image_size % self.clip.patch_size:
            raise ValueError(f"PromptRISConfig.clip_image_size {self.clip_image_size} is not a multiple of "
                             f"the CLIP patch size {self.clip.patch_size}")

    @classmethod
    def paper(cls) -> "PromptRISConfig":
        """§4.2: CLIP ViT-B/16 at 480, SAM ViT-B at 1024, n = 16."""
        return cls(clip=CLIPConfig(), sam=SAMConfig(), clip_image_size=480, n_prompts=16)

    @classmethod
    def tiny(cls) -> "PromptRISConfig":
        """Same code, small numbers, for CPU: the tests run it at these sizes (CLIP 224 -> 14x14 grid, SAM 256 ->
        16x16); the demo (`python train.py`) at CLIP 128 -> 8x8 and SAM 192 -> 12x12."""
        return cls(clip=CLIPConfig.tiny(), sam=SAMConfig.tiny(), clip_image_size=224, n_prompts=4,
                   decoder_heads=2)

    def to_dict(self) -> dict:
        """JSON-serialisable nested dict (tuples are written as lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptRISConfig":
        d = dict(d)
        clip = _config_from_dict(CLIPConfig, d.pop("clip", {}), "PromptRISConfig.clip")
        sam = _config_from_dict(SAMConfig, d.pop("sam", {}), "PromptRISConfig.sam")
        return _config_from_dict(cls, {**d, "clip": clip, "sam": sam}, "PromptRISConfig")


# ---- building blocks ----


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries (B, Lq, dim) over keys and values (B, Lk, dim) -> (B, Lq, out_dim).

    key_mask (B, Lk) bool, True = real token: padded text tokens are never attended to.
    kv_index (B,): keys and values hold one row per *image* (B_img, Lk, dim) and query row n reads row
    kv_index[n], so an image's keys and values are projected once, not once per sentence.
    """

    def __init__(self, dim: int, heads: int, out_dim: Optional[int] = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, out_dim or dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None, kv_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (self.split(proj(t)) for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        if kv_index is not None:
            k, v = k[kv_index], v[kv_index]  # (B_img, heads, Lk, d) -> (B, heads, Lk, d)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, Lk) -> (B, 1, 1, Lk)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Lq, d)
        return self.out_proj(x.transpose(1, 2).flatten(2))  # (B, heads, Lq, d) -> (B, Lq, dim) -> out_dim

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * d) -> (B, heads, L, d)."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttentionLayer(nn.Module):
    """Pre-norm transformer layer without self-attention: x + CrossAttn(LN(x), LN(context)), then + MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, Lx, D) attends to context (N, Lc, D) -> (N, Lx, D)."""
        context = self.norm_context(context)
        x = x + self.attn(self.norm_x(x), context, context, context_mask)
        return x + self.mlp(self.norm_mlp(x))


# ---- §3.1 CLIP-based prompting: tiny cross-modal decoder and coarse mask ----


class CoarseMaskDecoder(nn.Module):
    """F_IC and F_T (joint space) -> coarse mask logits S'_C, Eq. (1) and (2).

    Eq. (2) is a plain inner product; we divide by sqrt(D) (attention-logit scaling, so the logits start
    near unit scale) and add one learnable bias, so the background needs no anti-aligned features.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.image_from_text = CrossAttentionLayer(dim, heads)
        self.text_from_image = CrossAttentionLayer(dim, heads)
        self.image_norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, f_ic: torch.Tensor, f_t: torch.Tensor, text_valid: torch.Tensor,
                eot: torch.Tensor) -> torch.Tensor:
        """f_ic (N, N_C, D), f_t (N, L, D), text_valid (N, L) bool, eot (N,) -> S'_C (N, N_C) logits."""
        # Eq. (1): F'_IC = CrossAttn(F_IC, F_T); F'_T = CrossAttn(F_T, F_IC) (both read the un-updated inputs)
        f_ic_new = self.image_norm(self.image_from_text(f_ic, f_t, text_valid))  # F'_IC: (N, N_C, D)
        f_t_new = self.text_norm(self.text_from_image(f_t, f_ic))  # F'_T: (N, L, D)
        t_g = f_t_new[torch.arange(f_t.shape[0], device=f_t.device), eot]  # [EOS] feature t_g: (N, D)
        # Eq. (2): S'_C = F'_IC . t_g, in float32 also under autocast: its argmax becomes SAM's point
        with full_precision(f_ic.device):
            return torch.einsum("nkd,nd->nk", f_ic_new.float(), t_g.float()) / math.sqrt(f_ic.shape[-1]) + self.bias


# ---- §3.1 CLIP-based prompting: point prompt (Gumbel-softmax) and text prompts ----


def straight_through_gumbel(logits: torch.Tensor, tau: float = 1.0,
                            keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """M = Gumbel-SoftMax(S_C) of Eq. (3): logits (N, K) -> one-hot (N, K).

    Forward: the exact one-hot of argmax(logits + g), g ~ Gumbel(0, 1) keyed by keys (N,) (training);
    keys None = no noise (inference). Backward: the gradient of softmax((logits + g) / tau)
    (straight-through estimator).
    """
    logits = logits.float()  # under bf16 autocast, ties at the maximum would bias the argmax
    # keyed, not streamed: a sentence draws the same g in any batch, process or resumed run (keyed_random.py)
    if keys is not None:
        u = keyed_uniform(keys, logits.shape[-1], GUMBEL_STREAM)
        logits = logits - (-u.log()).log()  # g = -log(-log u) ~ Gumbel(0, 1)
    soft = torch.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # (soft - soft.detach()) is exactly 0: the forward is exactly one-hot


class TextPromptBlock(nn.Module):
    """Text tokens self-attend, attend to SAM's image features F_IS (with SAM's dense positional encoding
    on the keys, as SAM's own decoder does), then pass an MLP. Pre-norm residual sub-layers."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_dim)

    def forward(self, x: torch.Tensor, text_valid: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor,
                image_index: torch.Tensor) -> torch.Tensor:
        """x (N, L, C), text_valid (N, L), image (B, hw, C) one per image, image_pe (1, hw, C),
        image_index (N,) -> (N, L, C)."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, text_valid)
        x = x + self.cross_attn(self.norm_cross(x), image + image_pe, image, kv_index=image_index)
        return x + self.mlp(self.norm_mlp(x))


class TextPrompter(nn.Module):
    """CLIP text features F_T -> SAM text prompts P_text (§3.1): projection to SAM's width, then
    `depth` TextPromptBlocks conditioned on F_IS."""

    def __init__(self, text_dim: int, prompt_dim: int, heads: int, mlp_dim: int, depth: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, prompt_dim)
        self.blocks = nn.ModuleList(TextPromptBlock(prompt_dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(prompt_dim)

    def forward(self, f_t: torch.Tensor, text_valid: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor,
                image_index: torch.Tensor) -> torch.Tensor:
        """f_t (N, L, D), text_valid (N, L), image F_IS (B, C, h, w) one per image, image_pe (1, C, h, w),
        image_index (N,) -> (N, L, C)."""
        x = self.proj(f_t)  # (N, L, D) -> (N, L, C)
        image = image.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)
        image_pe = image_pe.flatten(2).transpose(1, 2)  # (1, C, h, w) -> (1, hw, C)
        for block in self.blocks:
            x = block(x, text_valid, image, image_pe, image_index)
        return self.norm(x)


# ---- §3.1 SAM decoding ----


def sam_decode(sam: SAM, image: torch.Tensor, sparse: torch.Tensor, sparse_mask: torch.Tensor,
               dense: torch.Tensor) -> torch.Tensor:
    """SAM's mask decoder on Prompt-RIS prompts -> final mask logits S (N, 16h, 16w) in the padded S x S frame.

    image F_IS (N, C, h, w), sparse [P_point; not-a-point; P_text] (N, T, C) with sparse_mask (N, T) (False =
    padded or dropped token, never attended to), dense P_mask or SAM's no-mask embedding (N, C, h, w).
    """
    # Eq. (4): S' = D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS); SAM prepends T_iou, T_out and
    # adds the dense prompt to F_IS itself; P_point carries SAM's not-a-point padding token (sam_prompts).
    # Single-mask output = SAM's first mask token.
    low_res, _ = sam.mask_decoder(image, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                  multimask_output=False, sparse_prompt_mask=sparse_mask)  # S': (N, 1, 4h, 4w)
    return F.interpolate(low_res, scale_factor=4, mode="bilinear", align_corners=False)[:, 0]  # S: (N, 16h, 16w)


# ---- §3.2 Cross-Modal Prompting ----


class PromptGenerator(nn.Module):
    """CrossAttn(T^i, F^i) of Eq. (5) / (6): n learnable queries T^i read one modality's tokens F^i
    (width `width`) and come out in the other modality's width `out_width`, ready to be prepended."""

    def __init__(self, n: int, width: int, out_width: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, width) * width ** -0.5)  # T_V^i or T_L^i: (n, width)
        self.norm = nn.LayerNorm(width)  # CLIP's residual stream is not normalised between layers
        self.attn = MultiHeadAttention(width, heads, out_dim=out_width)

    def forward(self, features: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features F^i (N, K, width), key_mask (N, K) -> prompts (N, n, out_width)."""
        kv = self.norm(features)
        return self.attn(self.queries.expand(features.shape[0], -1, -1), kv, kv, key_mask)


def run_with_prompts(block: nn.Module, x: torch.Tensor, prompts: Optional[torch.Tensor],
                     attn_mask: Optional[torch.Tensor] = None, recompute: bool = False) -> torch.Tensor:
    """[_; x'] = block([prompts; x]): prompts (N, n, D) are prepended for one layer, then dropped.
    recompute: activation checkpointing, the block keeps only its input and reruns in the backward pass."""
    if prompts is not None:
        x = torch.cat([prompts, x], dim=1)  # (N, n + L, D)
    x = checkpoint(block, x, attn_mask, use_reentrant=False) if recompute else block(x, attn_mask)
    return x if prompts is None else x[:, prompts.shape[1]:]


class CrossModalPrompting(nn.Module):
    """CLIP's two towers run layer by layer, exchanging prompts at every layer (Fig. 3).

    mode "both" builds a V2L and an L2V prompt generator per layer; "v2l" / "l2v" build one direction and
    "none" neither (plain CLIP, the Table 4 baseline): the ablation removes modules, the loop is the same.
    """

    def __init__(self, clip: CLIPConfig, n_prompts: int, mode: str):
        super().__init__()
        if clip.vision_layers != clip.text_layers:
            raise ValueError(f"Cross-Modal Prompting pairs the i-th vision and text layers, so CLIP needs equal "
                             f"depths; got vision_layers={clip.vision_layers}, text_layers={clip.text_layers}")
        depth = clip.vision_layers
        self.v2l = nn.ModuleList(PromptGenerator(n_prompts, clip.vision_width, clip.text_width, clip.vision_heads)
                                 for _ in range(depth)) if mode in ("both", "v2l") else None
        self.l2v = nn.ModuleList(PromptGenerator(n_prompts, clip.text_width, clip.vision_width, clip.text_heads)
                                 for _ in range(depth)) if mode in ("both", "l2v") else None
        self.grad_checkpoint = False  # train.py --grad-checkpoint: recompute CLIP blocks in backward (memory)

    def forward(self, clip: CLIP, images: torch.Tensor, image_index: torch.Tensor, tokens: torch.Tensor,
                text_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), image_index (N,), tokens (N, L), text_valid (N, L) ->
        last-layer vision tokens x_v (N, 1 + N_C, D_IC) and text tokens x_t (N, L, D_T)."""
        # Vision tokens depend on the sentence only through L2V prompts. Without L2V ("v2l", "none") x_v keeps
        # one row per image (B, ...) through the whole tower and `sentence_rows` = image_index picks each
        # sentence's row; with L2V each sentence gets its own copy (N, ...) after the patch embedding and
        # `sentence_rows` selects everything. Either way x_v[sentence_rows] is (N, ...).
        x_v = clip.visual.embed(images)  # [c^0; F_IC^0]: (B, 1 + N_C, D_IC)
        if self.l2v is not None:
            x_v = x_v[image_index]  # one copy per sentence: (N, 1 + N_C, D_IC)
        sentence_rows = image_index if self.l2v is None else slice(None)
        x_t = clip.embed_text(tokens)  # F_T^0: (N, L, D_T)
        n_text_prompts = 0 if self.v2l is None else self.v2l[0].queries.shape[0]
        # causal among text tokens, all see the prompts, EOT pooling unchanged
        text_mask = text_attention_mask(tokens.shape[1], n_text_prompts, device=tokens.device)
        layers = zip(clip.visual.transformer.resblocks, clip.transformer.resblocks)
        for i, (vision_layer, text_layer) in enumerate(layers):
            to_text = None if self.v2l is None else self.v2l[i](x_v[:, 1:])[sentence_rows]  # F_IC^i, no CLS: (N, n, D_T)
            to_vision = None if self.l2v is None else self.l2v[i](x_t, text_valid)  # padding masked: (N, n, D_IC)
            # Eq. (5): T_V2L^i = CrossAttn(T_V^i, F_IC^i); [_; F_T^{i+1}] = E_T^{i+1}([T_V2L^i; F_T^i])
            x_t = run_with_prompts(text_layer, x_t, to_text, text_mask, self.recompute)
            # Eq. (6): T_L2V^i = CrossAttn(T_L^i, F_T^i); [_; c^{i+1}; F_IC^{i+1}] = E_I^{i+1}([T_L2V^i; c^i; F_IC^i])
            x_v = run_with_prompts(vision_layer, x_v, to_vision, recompute=self.recompute)
        return x_v[sentence_rows], x_t

    @property
    def recompute(self) -> bool:
        return self.grad_checkpoint and torch.is_grad_enabled()


# ---- the assembled model (Fig. 2) ----


def is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def prepare_text(tokens: torch.Tensor, cut: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (N, L) -> tokens (N, L'), text_valid (N, L') (True up to and including EOT), eot (N,) positions.

    cut=True cuts after the longest sentence's EOT (clip_vit.cut_tokens, which reads that length on the host);
    data.collate cuts its batches on the CPU already, so a training step passes cut=False and never waits for
    the device. The cut is exact: the causal mask keeps every real token blind to later positions, and padded
    positions are masked wherever text tokens serve as keys."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, L) token ids, got shape {tuple(tokens.shape)}")
    if cut:
        tokens = cut_tokens(tokens)
    eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
    text_valid = torch.arange(tokens.shape[1], device=tokens.device) <= eot[:, None]
    return tokens, text_valid, eot


class PromptRIS(nn.Module):
    """CLIP + Cross-Modal Prompting -> coarse mask -> mask, point and text prompts -> SAM -> final mask."""

    def __init__(self, config: PromptRISConfig, clip: Optional[CLIP] = None, sam: Optional[SAM] = None):
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else CLIP(config.clip)
        self.sam = sam if sam is not None else SAM(config.sam)
        if self.clip.config != config.clip or self.sam.config != config.sam:
            raise ValueError("the given CLIP / SAM differ from config.clip / config.sam; build the config with "
                             "dataclasses.replace(config, clip=clip.config, sam=sam.config)")
        self.cmp = CrossModalPrompting(config.clip, config.n_prompts, config.cmp)  # §3.2
        self.decoder = CoarseMaskDecoder(config.clip.embed_dim, config.decoder_heads)  # Eq. (1), (2)
        s = config.sam
        self.text_prompter = TextPrompter(config.clip.embed_dim, s.prompt_dim, s.decoder_heads, s.decoder_mlp_dim,
                                          config.text_prompt_layers)
        # E of Eq. (3) without the label embedding: SAM's Fourier features of every cell of the 4h x 4w map.
        # A function of SAM's fixed Gaussian matrix only: SAM's positional encoding keeps it as a buffer and
        # recomputes it whenever that matrix is loaded (through this model, model.sam or its prompt encoder).
        self.sam.prompt_encoder.pe_layer.cache_grid(self.sam.prompt_encoder.mask_input_size)
        self.freeze_backbones()

    # -- what trains --

    def freeze_backbones(self, clip: bool = True, sam: bool = True) -> None:
        """The one place that decides what trains. Default (the paper): CLIP and SAM frozen, everything
        Prompt-RIS adds trains. A frozen backbone is also kept in eval mode (see `train`)."""
        self.clip.requires_grad_(not clip)
        self.sam.requires_grad_(not sam)
        self.train(self.training)

    def train(self, mode: bool = True) -> "PromptRIS":
        super().train(mode)
        for backbone in (self.clip, self.sam):
            if is_frozen(backbone):
                backbone.eval()
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def count_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- SAM side --

    def encode_sam_image(self, sam_images: torch.Tensor) -> torch.Tensor:
        """F_IS: SAM-normalized (B, 3, S, S) -> (B, C, h, w). Run once per image, not per sentence; no
        graph is kept while SAM is frozen, so training can also cache it across epochs."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not is_frozen(self.sam.image_encoder)):
            return self.sam.image_encoder(sam_images)

    @property
    def point_pe_table(self) -> torch.Tensor:
        """SAM's point encoding of the centre of every cell of the 4h x 4w grid -> (16hw, C) float32, row-major.

        The centre of cell (r, c) is ((c + 0.5) / 4w, (r + 0.5) / 4h) in normalized (x, y): SAM's own encoding
        of the point at input-frame pixel ((c + 0.5) S / 4w - 0.5, (r + 0.5) S / 4h - 0.5), whose +0.5
        pixel-centre shift lands it on the cell centre."""
        pe = self.sam.prompt_encoder
        return pe.pe_layer.cached_table(pe.mask_input_size)

    def point_prompt(self, coarse_up: torch.Tensor, keys: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """S_C (N, 1, 4h, 4w) logits -> P_point = e_p (N, 1, C) and the chosen flat index (N,); keys (N,) key
        the Gumbel noise (training), None = none."""
        # Eq. (3): M = Gumbel-SoftMax(S_C); e_p = sum_i M_i E_i, E = Fourier table + foreground label embedding.
        # M sums to one, so the label embedding is added once; it stays a live parameter (trainable SAM).
        m = straight_through_gumbel(coarse_up.flatten(1), self.config.gumbel_tau, keys)  # (N, 16hw)
        table, point = self.point_pe_table, m.argmax(dim=-1)  # E (16hw, C) float32, chosen cell (N,)
        with full_precision(m.device):  # forward: E's row itself (exact also with TF32 matmuls); backward: the
            straight_through = (m - m.detach()) @ table  # gradient of M E (exactly 0 in the forward)
            e_p = table[point] + straight_through + self.sam.prompt_encoder.point_embeddings[1].weight.float()
        return e_p[:, None], point  # (N, 1, C), (N,)

    def prompt_keep(self, n: int, prompts: Sequence[str], device, keys: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
        """(N, 3) bool, columns PROMPT_TYPES: which prompts each sentence gives SAM. The enabled subset
        (Table 5); with keys (N,) (training) each (sentence, prompt type) is dropped with prob. prompt_dropout
        (§4.2) and a sentence that lost all its prompts gets one enabled type back, chosen uniformly."""
        # built on the device from one scalar: a tensor copied from host memory would wait for the GPU's queue
        bits = sum(1 << i for i, t in enumerate(PROMPT_TYPES) if t in prompts)
        column = torch.arange(len(PROMPT_TYPES), device=device)
        enabled = ((torch.full_like(column, bits) >> column) & 1).bool().expand(n, -1)  # (N, 3)
        rate = self.config.prompt_dropout
        if keys is None or rate == 0 or len(prompts) == 0:
            return enabled
        u = keyed_uniform(keys, len(PROMPT_TYPES) + 1, DROPOUT_STREAM)  # (N, 3 + 1): one per type, one to revive
        keep = enabled & (u[:, :-1] >= rate)
        rank = enabled.cumsum(dim=1) - 1  # k for the k-th enabled type: (N, 3)
        pick = (u[:, -1:] * len(prompts)).long()  # uniform over the enabled types: (N, 1)
        revived = enabled & (rank == pick)
        return keep | (revived & ~keep.any(dim=1, keepdim=True))

    def sam_prompts(self, coarse: torch.Tensor, f_t: torch.Tensor, text_valid: torch.Tensor,
                    image: torch.Tensor, image_index: torch.Tensor, keep: torch.Tensor,
                    keys: Optional[torch.Tensor] = None):
        """Mask, point and text prompts (§3.1) -> (sparse (N, 2 + L, C), sparse_mask (N, 2 + L),
        dense (N, C, h, w), point index (N,)). coarse S'_C (N, H_C, W_C), image F_IS (B, C, h, w) one per
        image, image_index (N,), keys (N,) of the Gumbel noise (None at inference).
        sparse = [P_point; not-a-point; P_text]."""
        pe = self.sam.prompt_encoder
        keep_mask, keep_point, keep_text = keep.unbind(dim=1)  # (N,) each, in PROMPT_TYPES order
        coarse_up = F.interpolate(coarse.float()[:, None], size=pe.mask_input_size, mode="bilinear",
                                  align_corners=False)  # S_C: (N, 1, 4h, 4w)
        p_mask = pe.mask_downscaling(coarse_up)  # P_mask: (N, C, h, w)
        dense = torch.where(keep_mask[:, None, None, None], p_mask, pe.no_mask_embed.weight.view(1, -1, 1, 1))
        p_point, point = self.point_prompt(coarse_up, keys)  # P_point: (N, 1, C)
        p_text = self.text_prompter(f_t, text_valid, image, pe.get_dense_pe(), image_index)  # P_text: (N, L, C)
        # SAM appends a "not a point" token whenever points come without a box, and its decoder was trained
        # so: it follows P_point and is attended exactly when the point is (SAM without points has no
        # padding either). A choice the paper leaves open (README, design decisions).
        pad = pe.not_a_point_embed.weight.expand(p_point.shape[0], 1, -1)  # (N, 1, C)
        sparse = torch.cat([p_point, pad, p_text], dim=1)  # [P_point; pad; P_text]: (N, 2 + L, C)
        sparse_mask = torch.cat([keep_point[:, None], keep_point[:, None], text_valid & keep_text[:, None]],
                                dim=1)  # (N, 2 + L)
        return sparse, sparse_mask, dense, point

    # -- the whole model --

    def forward(self, clip_images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor,
                sam_embeddings: Optional[torch.Tensor] = None, sam_images: Optional[torch.Tensor] = None,
                use_sam: Optional[bool] = None, prompts: Optional[Sequence[str]] = None,
                prepared: bool = False, sample_keys: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """clip_images (B, 3, Hc, Hc), tokens (N, 77), image_index (N,) in [0, B); SAM's image features as
        sam_embeddings (B, C, h, w) (e.g. cached) or computed from sam_images (B, 3, S, S).
        use_sam / prompts override config.use_sam / config.prompts (training stage 1; Table 5 at inference).
        prepared: a data.collate batch, whose tokens are cut and whose image_index is valid by construction;
        the forward then reads no value back from the device (no host sync, one graph under torch.compile).
        sample_keys (N,) int64 key each sentence's Gumbel noise and prompt dropout in training (train.py
        derives them from seed, epoch and the sentence's image, so every batch layout draws the same);
        without them training draws fresh keys from torch's generator. Inference draws nothing.

        Returns "coarse" S'_C (N, Hc/16, Hc/16) logits and, with SAM, "mask" S (N, S, S) logits in the padded
        SAM frame and "point" (N,) the flat index into the 4h x 4w map chosen by Eq. (3).
        """
        use_sam = self.config.use_sam if use_sam is None else use_sam
        prompts = self.config.prompts if prompts is None else tuple(prompts)
        prepared = prepared or torch.compiler.is_compiling()  # compiled: no host reads (uncut text is exact too)
        self._check_inputs(clip_images, tokens, image_index, sam_embeddings, sam_images, use_sam, prompts, prepared)
        tokens, text_valid, eot = prepare_text(tokens, cut=not prepared)
        x_v, x_t = self.cmp(self.clip, clip_images, image_index, tokens, text_valid)  # §3.2, per sentence
        f_ic = self.clip.visual.ln_post(x_v[:, 1:]) @ self.clip.visual.proj  # F_IC: (N, N_C, D)
        f_t = self.clip.ln_final(x_t) @ self.clip.text_projection  # F_T: (N, L, D)
        coarse = self.decoder(f_ic, f_t, text_valid, eot)  # S'_C: (N, N_C)
        out = {"coarse": coarse.view(-1, *self.clip.visual.grid(clip_images))}  # (N, H_C, W_C)
        if not use_sam:
            return out
        if sam_embeddings is None:
            sam_embeddings = self.encode_sam_image(sam_images)
        keys = None
        if self.training:  # (N,) int64
            keys = sample_keys if sample_keys is not None else torch.randint(
                -2**63, 2**63 - 1, tokens.shape[:1], device=tokens.device)
        keep = self.prompt_keep(tokens.shape[0], prompts, tokens.device, keys)
        sparse, sparse_mask, dense, point = self.sam_prompts(out["coarse"], f_t, text_valid, sam_embeddings,
                                                             image_index, keep, keys)
        image = sam_embeddings[image_index]  # F_IS per sentence, as P_mask is added to it: (N, C, h, w)
        return {**out, "mask": sam_decode(self.sam, image, sparse, sparse_mask, dense), "point": point}  # S: (N, S, S)

    def _check_inputs(self, clip_images, tokens, image_index, sam_embeddings, sam_images, use_sam, prompts, prepared):
        """Shapes always; the values of image_index (a host sync) only when data.collate did not build it."""
        B = clip_images.shape[0]
        if tokens.dim() != 2 or image_index.shape != (tokens.shape[0],):
            raise ValueError(f"tokens must be (N, L) and image_index (N,); got {tuple(tokens.shape)} and "
                             f"{tuple(image_index.shape)}")
        if not prepared and len(image_index) and not 0 <= int(image_index.min()) <= int(image_index.max()) < B:
            raise ValueError(f"image_index must lie in [0, {B}) (the number of clip_images)")
        if not set(prompts) <= set(PROMPT_TYPES):
            raise ValueError(f"prompts must be a subset of {PROMPT_TYPES}, got {prompts}")
        if use_sam and sam_embeddings is None and sam_images is None:
            raise ValueError("use_sam needs sam_embeddings (B, C, h, w) or sam_images (B, 3, S, S)")
        sam_input = sam_embeddings if sam_embeddings is not None else sam_images
        if use_sam and sam_input.shape[0] != B:
            raise ValueError(f"sam_embeddings / sam_images must hold one entry per image ({B}), "
                             f"got {sam_input.shape[0]}")


# ---- §3.3 Instance Contrastive Learning and the losses ----


@dataclass
class LossConfig:
    icl: bool = True  # Table 3: Instance Contrastive Learning on / off


def dice_coefficient(a: torch.Tensor, b: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """V-Net Dice (Milletari et al.) per sample: (2 sum ab + s) / (sum a^2 + sum b^2 + s); (N, ...) -> (N,).
    Equal inputs give exactly 1; the smoothing s keeps empty-vs-empty at 1 and the gradient finite."""
    a, b = a.flatten(1), b.flatten(1)
    return (2 * (a * b).sum(1) + smooth) / (a.pow(2).sum(1) + b.pow(2).sum(1) + smooth)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice loss (§3.3) of mask logits (N, H, W) against a target in [0, 1] of the same shape."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + (1 - dice_coefficient(logits.sigmoid(), target)).mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with their (possibly soft) targets: (N, ...) -> (N,)."""
    pred, target = (logits > 0).to(target.dtype).flatten(1), target.flatten(1)
    inter = (pred * target).sum(1)
    return inter / (pred.sum(1) + target.sum(1) - inter).clamp(min=1e-6)


def icl_loss(logits: torch.Tensor, target: torch.Tensor, instance_ids: torch.Tensor, image_index: torch.Tensor,
             eps: float = 1e-6) -> torch.Tensor:
    """Instance Contrastive Learning, Eq. (7) and (8), for all images of a batch at once.

    logits (N, H, W) masks, target (N, H, W) ground truth, instance_ids (N,) referred instance, image_index
    (N,). Only pairs of sentences of the same image count; each image contributes 1/b^2 sum_ij, and the
    images are averaged. O is clamped to [eps, 1 - eps] so both logs stay finite.
    """
    probs = logits.sigmoid().flatten(1)  # the sigmoid omitted in Eq. (7): (N, HW)
    squares = probs.pow(2).sum(1)  # (N,)
    # Eq. (7): O_ij = 2 sum_k S_i^k S_j^k / (sum_k (S_i^k)^2 + sum_k (S_j^k)^2)
    overlap = 2 * probs @ probs.t() / (squares[:, None] + squares[None, :] + eps)  # O: (N, N)
    overlap = overlap.clamp(eps, 1 - eps)
    same_instance = (instance_ids[:, None] == instance_ids[None, :]).to(overlap.dtype)  # Y: (N, N)
    w = mask_iou(logits.detach(), target)  # w_i: (N,), no gradient, so a wrong mask cannot mislead
    # Counted on the device (no torch.unique, whose output size the host must read): b of row i's image is
    # the number of sentences sharing its image, and the images number sum_i 1/b_i
    same_image = image_index[:, None] == image_index[None, :]  # only pairs within one image count: (N, N)
    b = same_image.sum(1).to(overlap.dtype)  # (N,)
    pair_weight = same_image / b.pow(2)[:, None]  # 1/b^2: (N, N)
    # Eq. (8): L_icl = 1/b^2 sum_ij -w_i (Y_ij log O_ij + (1 - Y_ij) log(1 - O_ij))
    bce = -(same_instance * overlap.log() + (1 - same_instance) * (1 - overlap).log())  # (N, N)
    return (w[:, None] * bce * pair_weight).sum() / (1 / b).sum().round()  # mean over the B images


def total_loss(outputs: Dict[str, torch.Tensor], masks: torch.Tensor, instance_ids: torch.Tensor,
               image_index: torch.Tensor, config: LossConfig = LossConfig(), image_share: float = 1.0,
               sentence_share: float = 1.0) -> Dict[str, torch.Tensor]:
    """Eq. (9) for a PromptRIS output dict and ground-truth masks (N, S, S) in the padded SAM frame (stage 1 may
    give them in the CLIP frame (N, Hc, Hc): only their area averages on the CLIP grid are used).

    Returns "clip_seg" (coarse mask vs the masks area-averaged onto the CLIP grid), "icl_clip", and with
    a "mask" output (stage 2) "sam_seg", "icl_sam"; the ICL terms only with config.icl; "loss" is the sum.

    Each term is a mean over this batch: the seg terms over its sentences, the ICL terms over its images (Eq. (8)).
    A micro-batch of a larger batch passes its share of that batch's images and sentences: each term is weighted by
    it, so the terms, and their gradients, summed over the micro-batches are the whole batch's.
    """
    with full_precision(masks.device):  # float32 also under autocast: O_ii must be exactly 1
        coarse = outputs["coarse"].float()
        coarse_target = F.interpolate(masks[:, None].float(), size=coarse.shape[-2:], mode="area")[:, 0]
        terms = {"clip_seg": seg_loss(coarse, coarse_target) * sentence_share}  # L_clip.seg
        if config.icl:
            terms["icl_clip"] = icl_loss(coarse, coarse_target, instance_ids, image_index) * image_share
        if "mask" in outputs:
            mask = outputs["mask"].float()
            terms["sam_seg"] = seg_loss(mask, masks.float()) * sentence_share  # L_sam.seg
            if config.icl:
                terms["icl_sam"] = icl_loss(mask, masks.float(), instance_ids, image_index) * image_share
    # Eq. (9): L = L_clip.seg + L_sam.seg + L_icl (L_icl on both the final and the coarse masks)
    terms["loss"] = sum(terms.values())
    return terms
