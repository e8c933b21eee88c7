"""CLIP ViT-B/16 (Radford et al., 2021): image and text transformers plus the BPE tokenizer.

Prompt-RIS (§3.1) encodes the image with CLIP's vision transformer at 480x480 (a 30x30 patch grid) and
the sentence with CLIP's text transformer; Cross-Modal Prompting (§3.2) inserts prompt tokens between
layers. So besides `encode_image` / `encode_text` (same meaning as OpenAI's), the layers are exposed:

    x = clip.visual.embed(pixels)                        # (B, 1+N, 768)
    for block in clip.visual.transformer.resblocks:
        x = block(x)                                     # prompt tokens may be concatenated in between
    t = clip.embed_text(tokens)                          # (B, L, 512)
    mask = text_attention_mask(n_prefix + L, ...)        # see text_attention_mask
    for block in clip.transformer.resblocks:
        t = block(t, mask)

Parameter names are OpenAI's (`visual.transformer.resblocks.0.attn.in_proj_weight`, ...), so OpenAI's
state dict loads with a plain strict `load_state_dict`; the Hugging Face naming is converted in
load_weights.py.
"""
import gzip
import html
import html.entities
import json
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    image_size: int = 224  # size the positional embedding was trained at (grid 14)
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """Same architecture with small numbers, for CPU tests and the demo."""
        return cls(embed_dim=64, vision_width=64, vision_layers=2, vision_heads=2,
                   text_width=64, text_layers=2, text_heads=2)


# ---- transformer blocks (shared by both towers) ----


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the OpenAI checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        # (B, L, 3D) -> (3, B, heads, L, d)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, D); attn_mask: bool (True = may attend) or additive float, broadcastable to
        (B, heads, L, L). Returns (B, L, D)."""
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def cut_tokens(tokens: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Token ids (N, L) -> (N, L') cut after the longest sentence's EOT, L' rounded up to a multiple of
    `multiple` (at most L). Exact: the causal mask keeps every real token blind to later positions.

    Reads the longest length on the host, so call it on the CPU batch (data.collate), not inside a step.
    Rounding up keeps the number of distinct lengths, and so of torch.compile's graphs, small.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id in CLIP's vocabulary
    return tokens[:, :min(-(-length // multiple) * multiple, tokens.shape[1])]


def text_attention_mask(length: int, n_prefix: int = 0, device=None) -> torch.Tensor:
    """Boolean mask (n_prefix + length, n_prefix + length) for the text tower, True = may attend.

    The `length` text tokens are causal among themselves (as in CLIP) and all see the `n_prefix`
    prompt tokens prepended in front (§3.2, Eq. 5: [T_V2L; F_T]); the prompt tokens see each other only,
    so the text never leaks into them. n_prefix = 0 gives CLIP's plain causal mask.
    """
    total = n_prefix + length
    rows = torch.arange(total, device=device)[:, None]
    cols = torch.arange(total, device=device)[None, :]
    return (cols < n_prefix) | (cols <= rows)


# ---- vision tower ----


def resize_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a (1 + g*g, D) positional embedding to (1 + gh*gw, D); the CLS position is untouched.

    Bicubic with align_corners=False and no antialias, which is what Hugging Face's
    `interpolate_pos_encoding` does (and DINO, whose code it adapts). open_clip's `resize_pos_embed`
    passes antialias=True, which for upsampling switches PyTorch to the PIL-style cubic kernel
    (a = -0.5 instead of -0.75), a slightly smoother result. Prompt-RIS fine-tunes at 480, so either
    is a sensible start; we follow HF so it can serve as a parity oracle.
    """
    cls_pos, grid_pos = pos[:1], pos[1:]
    g = math.isqrt(grid_pos.shape[0])
    if g * g != grid_pos.shape[0]:
        raise ValueError(f"positional embedding has {grid_pos.shape[0]} grid positions, not a square")
    grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (g*g, D) -> (1, D, g, g)
    # bicubic is not implemented for half precision on every device: interpolate in float32
    grid_pos = F.interpolate(grid_pos.float(), size=grid, mode="bicubic", align_corners=False, antialias=False)
    grid_pos = grid_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # (gh*gw, D)
    return torch.cat([cls_pos, grid_pos], dim=0)


class VisionTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        width, p = config.vision_width, config.patch_size
        if config.image_size % p:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {p}")
        self.patch_size = p
        self.native_grid = (config.image_size // p, config.image_size // p)
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.native_grid[0] ** 2, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))
        self._pos_cache = {}  # grid -> resized positional embedding, used while frozen

    def grid(self, pixels: torch.Tensor) -> Tuple[int, int]:
        """(H / patch, W / patch) for pixels (B, 3, H, W)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Positional embedding (1 + gh*gw, width) for a patch grid."""
        pos = self.positional_embedding
        if pos.requires_grad:  # trainable: resize inside the graph so gradients reach the 14x14 table
            self._pos_cache.clear()  # the weights are about to change, also when training at the native grid
            return pos if grid == self.native_grid else resize_pos_embed(pos, grid)
        if grid == self.native_grid:
            return pos
        if grid not in self._pos_cache:  # frozen: one resize per resolution, not one per forward
            with torch.no_grad():
                self._pos_cache[grid] = resize_pos_embed(pos, grid)
        return self._pos_cache[grid]

    def _load_from_state_dict(self, *args, **kwargs):
        self._pos_cache.clear()  # the cache was computed from the old weights
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()  # .to(device / dtype) would leave the cache behind
        return super()._apply(fn, *args, **kwargs)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> tokens (B, 1 + N, width): patches, CLS first, + pos-emb, ln_pre."""
        grid = self.grid(pixels)
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (B, width, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid).to(x.dtype)  # (B, 1 + N, width)
        return self.ln_pre(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W), CLIP-normalized -> image embedding (B, embed_dim) from the CLS token."""
        x = self.transformer(self.embed(pixels))  # (B, 1 + N, width)
        return self.ln_post(x[:, 0]) @ self.proj


# ---- CLIP ----


class CLIP(nn.Module):
    def __init__(self, config: Optional[CLIPConfig] = None):
        super().__init__()
        config = config or CLIPConfig()
        self.config = config
        self.visual = VisionTransformer(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads)
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text_weights()

    def _init_text_weights(self):
        """OpenAI's initialization of the text tower (only matters when training from scratch)."""
        width, layers = self.config.text_width, self.config.text_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L <= context_length) -> (B, L, text_width): token + positional embedding."""
        if tokens.dim() != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(f"expected tokens of shape (B, L <= {self.config.context_length}), "
                             f"got {tuple(tokens.shape)}")
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L <= 77) -> text embedding (B, embed_dim), read at the EOT token.

        EOT has the largest id in the vocabulary, so argmax finds it (as in OpenAI's CLIP).
        """
        x = self.embed_text(tokens)  # (B, L, width)
        x = self.transformer(x, text_attention_mask(tokens.shape[1], device=tokens.device))
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, width)
        return eot @ self.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized pixels (B, 3, H, W), H and W multiples of the patch -> (B, embed_dim)."""
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: logits_per_image (B_img, B_txt) and logits_per_text (its transpose)."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image @ text.t()
        return logits_per_image, logits_per_image.t()


# ---- tokenizer: text cleaning (ftfy's default fixes, stdlib only) ----

# Unicode White_Space, which is what `regex`'s \s matches in OpenAI's patterns. Python's own \s also
# matches U+001C..U+001F, but those are removed by the control-character fix before any \s is used.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")  # ʼ ‘ ’ ‚ ‛
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")  # “ ” „ ‟
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _named_entities() -> dict:
    """'&name;' -> text for HTML5 entities written with their semicolon, plus ALL-CAPS spellings of the
    lower-case names that are not entities in their own right ('&EACUTE;' -> 'É'), as ftfy decodes."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


def _c1_as_windows_1252() -> dict:
    """C1 controls U+0080..U+009F read as the Windows-1252 characters for those bytes (what browsers do);
    the five bytes Windows-1252 leaves undefined stay as they are."""
    table = {}
    for b in range(0x80, 0xA0):
        try:
            table[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return table


_NAMED_ENTITIES = _named_entities()
_C1_CONTROLS = _c1_as_windows_1252()
# Latin ligatures and legacy digraphs split into letters (ĳ, ǆ, ﬁ, ...); ftfy keeps the long s of ﬅ.
_LIGATURES = {cp: unicodedata.normalize("NFKC", chr(cp))
              for cp in (0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07))}
_LIGATURES[0xFB05] = "\u017ft"
# fullwidth ASCII -> ASCII, halfwidth katakana/hangul -> normal width, ideographic space -> space
_WIDTHS = {0x3000: " ", **{cp: unicodedata.normalize("NFKC", chr(cp)) for cp in range(0xFF01, 0xFFF0)
                           if unicodedata.normalize("NFKC", chr(cp)) != chr(cp)}}
# ASCII controls except \t \n \f \r, deprecated format controls, BOM, interlinear annotation, U+FFFC
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                           0xFEFF, *range(0xFFF9, 0xFFFD)])


def _decode_entity(match) -> str:
    entity = match.group()
    if entity in _NAMED_ENTITIES:
        return _NAMED_ENTITIES[entity]
    if entity.startswith("&#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded  # a reference that did not consume its ';' is kept
    return entity


def _fix_segment_once(text: str, unescape: bool) -> str:
    """One pass of ftfy's default fixes, in ftfy's order (mojibake repair left out)."""
    if unescape:
        text = _ENTITY.sub(_decode_entity, text)
    text = text.translate(_C1_CONTROLS).translate(_LIGATURES).translate(_WIDTHS)
    text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
    for line_break in ("\r\n", "\r", "\u2028", "\u2029", "\x85"):
        text = text.replace(line_break, "\n")
    text = _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16", "surrogatepass").decode("utf-16"), text)
    text = _SURROGATE.sub("\ufffd", text)
    text = _ANSI_ESCAPE.sub("", text).translate(_CONTROLS)
    return unicodedata.normalize("NFC", text)


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text)` with ftfy's default settings, reimplemented with the standard library.

    Like ftfy, the text is fixed one line at a time, each line repeatedly until it stops changing:
    HTML entities (strict form, '&amp;' but not '&amp') are decoded unless a '<' has been seen, since
    then the text may be HTML; C1 controls become Windows-1252 characters; Latin ligatures are split;
    fullwidth forms become ASCII; curly quotes become straight; line breaks become '\\n'; surrogates are
    paired or replaced; terminal escapes and stray control characters are removed; NFC normalization.
    Not reimplemented: ftfy's mojibake repair ('sÃ³' -> 'só'), which guesses at double-decoded UTF-8
    with statistics over byte patterns; such text is tokenized as it stands.
    """
    segments = [line + "\n" for line in text.split("\n")]
    segments[-1] = segments[-1][:-1]
    unescape, out = True, []
    for segment in segments:
        unescape = unescape and "<" not in segment
        fixed = _fix_segment_once(segment, unescape)
        while fixed != segment:
            segment, fixed = fixed, _fix_segment_once(fixed, unescape)
        out.append(fixed)
    return "".join(out)


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy.fix_text, html.unescape twice, whitespace runs -> one space, strip,
    lower case."""
    text = html.unescape(html.unescape(fix_text(text)))
    return re.sub(f"[{_WHITESPACE}]+", " ", text).strip().lower()


# ---- tokenizer: byte-level BPE ----

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict:
    """Byte -> printable character, the table OpenAI's (and GPT-2's) BPE works on.

    The 188 printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) map to
    chr(256 + k) in byte order, so no token contains whitespace. The dict order (printable bytes first)
    is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in table)})
    return table


def _category_class(major: str) -> str:
    r"""Body of a `re` character class matching Unicode general category `major`* ('L' or 'N'),
    i.e. `regex`'s \p{L} / \p{N}, which stdlib `re` lacks. Built from `unicodedata`, so code points
    assigned after Python's Unicode version (14.0 for Python 3.11) are not covered."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp))[0] == major
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


@lru_cache(maxsize=None)
def _pretokenizer() -> "re.Pattern":
    r"""OpenAI's pattern with `regex` classes spelled for `re`: special tokens, English contractions,
    runs of letters (\p{L}+), single numeric characters (\p{N}), runs of anything else but whitespace.

    The obvious stdlib spelling of \p{L}, [^\W\d_], would also match letter-like numbers such as '²',
    '½' or 'Ⅻ' (category N, but alphanumeric for Python), so both classes are built from the categories
    (scanning all code points takes ~0.1 s, once per process). OpenAI compiles the whole pattern with
    IGNORECASE; on lower-cased text that only matters for the contractions ("'ſ" counts as "'s"), so the
    flag is scoped to them. One quirk is kept: U+0345 (combining ypogegrammeni) case-folds to a letter,
    so under `regex`'s IGNORECASE neither the letter class nor the negated class matches it, and OpenAI's
    tokenizer drops it; it is excluded from the last class here to drop it too.
    """
    letters, numbers = _category_class("L"), _category_class("N")
    specials = "|".join(re.escape(t) for t in (SOT, EOT))
    return re.compile(rf"(?i:{specials}|'s|'t|'re|'ve|'m|'ll|'d)|[{letters}]+|[{numbers}]"
                      rf"|[^{_WHITESPACE}{letters}{numbers}\u0345]+")


def _read_openai_vocab(path: str) -> Tuple[dict, list]:
    """bpe_simple_vocab_16e6.txt.gz: a header line, then one merge 'a b' per line. The vocabulary is
    the 256 byte characters, the same with '</w>', one token per merge (CLIP uses the first 48894), and
    the two special tokens: 49408 ids."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1: 49152 - 256 - 2 + 1]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable gzip BPE merges file ({e})") from e
    merges = [_parse_merge(line, path, i + 2) for i, line in enumerate(lines)]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


def _read_hf_vocab(vocab_json: str, merges_txt: str) -> Tuple[dict, list]:
    """Hugging Face's spelling of the same BPE: vocab.json (token -> id) and merges.txt ('#version'
    header, then one merge per line)."""
    for path in (vocab_json, merges_txt):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file (Hugging Face needs vocab.json and merges.txt)")
    try:
        with open(vocab_json, encoding="utf-8") as f:
            encoder = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep to read
        raise ValueError(f"{vocab_json}: not a JSON vocabulary ({type(e).__name__}: {e})") from e
    with open(merges_txt, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = [_parse_merge(line, merges_txt, i + 1) for i, line in enumerate(lines) if i >= start and line.strip()]
    missing = [t for t in [SOT, EOT, *("".join(m) for m in merges)] if t not in encoder]
    if missing:
        raise ValueError(f"{vocab_json}: {len(missing)} tokens of {merges_txt} missing, e.g. {missing[:5]}")
    return encoder, merges


def _parse_merge(line: str, path: str, line_number: int) -> Tuple[str, str]:
    pair = tuple(line.split())
    if len(pair) != 2:
        raise ValueError(f"{path}:{line_number}: expected a merge 'a b', got {line!r}")
    return pair


def _byte_vocab() -> dict:
    """The vocabulary OpenAI's file gives with zero merges: bytes (0..255), bytes + '</w>' (256..511),
    with the special tokens kept at their usual ids so the model's 49408-row embedding fits."""
    byte_chars = list(bytes_to_unicode().values())
    encoder = {token: i for i, token in enumerate(byte_chars + [c + "</w>" for c in byte_chars])}
    encoder.update({SOT: 49406, EOT: 49407})
    return encoder


def _read_vocab(path: str) -> Tuple[dict, list]:
    """Dispatch on what `path` is: OpenAI's gz file, HF's vocab.json / merges.txt, or a folder of either."""
    if os.path.isdir(path):
        gz = os.path.join(path, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(gz):
            return _read_openai_vocab(gz)
        return _read_hf_vocab(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer vocabulary")
    folder, name = os.path.split(path)
    if name.endswith(".json"):
        return _read_hf_vocab(path, os.path.join(folder, "merges.txt"))
    if name.endswith(".txt"):
        return _read_hf_vocab(os.path.join(folder, "vocab.json"), path)
    return _read_openai_vocab(path)


class Tokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer, stdlib only (no ftfy, no regex): same ids as
    `clip.tokenize(texts, truncate=True)`.

    vocab_path: OpenAI's `bpe_simple_vocab_16e6.txt.gz`; or Hugging Face's `vocab.json` or `merges.txt`
    (the other file beside it); or a directory holding either. None -> byte-level fallback: no merges,
    every word becomes its UTF-8 bytes with '</w>' on the last one (ids 0..511, exactly what OpenAI's
    vocabulary gives with zero merges) and SOT/EOT stay 49406/49407. That keeps the CPU demo running
    offline with no vocabulary file; its ids are not the pretrained CLIP's, so use it only with models
    trained from scratch.
    """

    def __init__(self, vocab_path: Optional[str] = None):
        if vocab_path is None:
            self.encoder, merges = _byte_vocab(), []
        else:
            self.encoder, merges = _read_vocab(os.fspath(vocab_path))
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.pattern = _pretokenizer()
        self.cache = {}  # pre-token -> BPE tokens; referring expressions reuse a small vocabulary

    def bpe(self, token: str) -> List[str]:
        """Merge a pre-token's characters (the last marked '</w>') by repeatedly joining the adjacent
        pair with the lowest merge rank, every occurrence left to right, until no pair is a merge."""
        if token not in self.cache:
            word = list(token[:-1]) + [token[-1] + "</w>"]
            while len(word) > 1:
                best = min(zip(word, word[1:]), key=lambda pair: self.bpe_ranks.get(pair, math.inf))
                if best not in self.bpe_ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self.cache[token] = word
        return self.cache[token]

    def encode(self, text: str) -> List[int]:
        """Token ids of one text, without SOT/EOT."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            if piece in (SOT, EOT):  # written out literally, as in OpenAI's tokenizer
                ids.append(self.encoder[piece])
                continue
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chars))
        return ids

    def __call__(self, texts: Union[str, List[str]], context_length: int = 77) -> torch.Tensor:
        """texts -> LongTensor (N, context_length): SOT, ids, EOT, zero padding. Longer texts are cut
        so that EOT is still the last token (OpenAI's truncate=True)."""
        if context_length < 2:
            raise ValueError(f"context_length must hold SOT and EOT, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)[: context_length - 2], self.eot_token_id]
            result[i, : len(ids)] = torch.tensor(ids)
        return result

