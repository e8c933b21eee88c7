"""sam.py against the official implementations: segment_anything's modeling code and transformers' SamModel.

Parity with segment_anything runs ViT-B's widths (768 channels, 12 heads, MLPs of 3072, its neck, prompt
encoder and decoder) with 3 encoder blocks, 2 windowed and 1 global, on a 256 x 256 input, once per encoder
(module-scoped fixture): the code path is that of 1024 (windows padded, here from 16 to 28, decomposed
relative positions over the whole grid in the global block), at a sixteenth of the tokens; the shapes of
a 1024 file are tested in test_load_weights. Parity with transformers runs a narrow ViT-B: ViT-B's layout
(12 blocks, global attention in 2, 5, 8, 11, padded 14 x 14 windows, the same decoder) at width 32; the
Hugging Face name map depends on the layout only, never on a width. Everything else uses the tiny config. "Relative error" is
max |ours - reference| / max |reference|.
"""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from load_weights import load_sam
from oracles import build_hf_sam, build_official_sam, randomize_, resize_longest_side_class, \
    segment_anything_modeling
from sam import SAM, Attention, SAMConfig, resize_longest_side_shape, window_partition, window_unpartition


TOL = 1e-4


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def save_state(state: dict, path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return str(path)


def prompts(cfg: SAMConfig, batch: int, seed: int = 1):
    """Points (with every label kind), boxes and mask logits in the model's input frame."""
    gen = torch.Generator().manual_seed(seed)
    S, g = cfg.image_size, cfg.grid
    coords = torch.rand(batch, 3, 2, generator=gen) * S
    labels = torch.tensor([[1, 0, -1]]).repeat(batch, 1)
    corners = torch.rand(batch, 2, 2, generator=gen) * S
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    masks = torch.randn(batch, 1, 4 * g, 4 * g, generator=gen)
    return coords, labels, boxes, masks


# ---- ViT-B against segment_anything ----

@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """Random official SAM of ViT-B's widths (3 encoder blocks) at 256 px, ours loaded from its safetensors
    export (global_attn_indexes inferred from the shapes), both encoders run once."""
    cfg = SAMConfig(image_size=256, encoder_depth=3, global_attn_indexes=(2,))
    torch.manual_seed(0)
    official = randomize_(build_official_sam(cfg), seed=0)
    path = save_state(official.state_dict(), tmp_path_factory.mktemp("vit_b") / "sam_vit_b.safetensors")
    ours = load_sam(path).eval()
    image = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        our_embedding, official_embedding = ours.image_encoder(image), official.image_encoder(image)
    return SimpleNamespace(cfg=cfg, official=official, ours=ours, official_embedding=official_embedding,
                           our_embedding=our_embedding)


def test_vit_b_image_embeddings_match_segment_anything(vit_b):
    assert vit_b.our_embedding.shape == (1, 256, 16, 16)
    assert rel_err(vit_b.our_embedding, vit_b.official_embedding) <= TOL


def test_vit_b_dense_pe_matches_segment_anything(vit_b):
    ours, official = vit_b.ours.prompt_encoder.get_dense_pe(), vit_b.official.prompt_encoder.get_dense_pe()
    assert ours.shape == (1, 256, 16, 16)
    assert rel_err(ours, official) <= TOL


@pytest.mark.parametrize("kinds", ["points", "boxes", "masks", "points+boxes+masks"])
def test_vit_b_prompt_embeddings_match_segment_anything(vit_b, kinds):
    coords, labels, boxes, masks = prompts(vit_b.cfg, batch=2)
    given = dict(points=(coords, labels) if "points" in kinds else None, boxes=boxes if "boxes" in kinds else None,
                 masks=masks if "masks" in kinds else None)
    with torch.no_grad():
        sparse, dense = vit_b.ours.prompt_encoder(**given)
        official_sparse, official_dense = vit_b.official.prompt_encoder(**given)
    assert sparse.shape == official_sparse.shape and dense.shape == official_dense.shape == (2, 256, 16, 16)
    if sparse.shape[1]:
        assert rel_err(sparse, official_sparse) <= TOL
    assert rel_err(dense, official_dense) <= TOL


@pytest.mark.parametrize("multimask", [False, True])
def test_vit_b_mask_decoder_matches_segment_anything(vit_b, multimask):
    coords, labels, boxes, masks = prompts(vit_b.cfg, batch=2)
    official = vit_b.official
    with torch.no_grad():
        sparse, dense = official.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
        inputs = dict(image_embeddings=vit_b.official_embedding, image_pe=official.prompt_encoder.get_dense_pe(),
                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
        masks_ours, iou_ours = vit_b.ours.mask_decoder(**inputs)
        masks_official, iou_official = official.mask_decoder(**inputs)
    assert masks_ours.shape == (2, 3 if multimask else 1, 64, 64) and iou_ours.shape == masks_ours.shape[:2]
    assert rel_err(masks_ours, masks_official) <= TOL
    assert rel_err(iou_ours, iou_official) <= TOL


# ---- narrow ViT-B against transformers' SamModel (Hugging Face naming) ----

NARROW_VIT_B = SAMConfig(image_size=256, encoder_width=32, encoder_heads=2, prompt_dim=32,
                         decoder_mlp_dim=64, iou_head_hidden_dim=32)  # 8 decoder heads, as load_sam infers
HF_GAUSSIAN_KEYS = {"shared_image_embedding": ["prompt_encoder.shared_embedding.positional_embedding"],
                    "prompt_encoder.shared_embedding": ["shared_image_embedding.positional_embedding"],
                    "both": []}


@pytest.fixture(scope="module")
def hf_narrow_vit_b(tmp_path_factory):
    """Random transformers narrow-ViT-B SamModel exported three ways (Gaussian under either key or both);
    the HF encoder and ours (from the file with both keys) run once."""
    cfg = NARROW_VIT_B
    torch.manual_seed(0)
    hf = randomize_(build_hf_sam(cfg), seed=3)
    folder = tmp_path_factory.mktemp("hf_narrow_vit_b")
    files = {}
    for variant, dropped in HF_GAUSSIAN_KEYS.items():
        state = {k: v for k, v in hf.state_dict().items() if k not in dropped}
        files[variant] = save_state(state, folder / f"{variant}.safetensors")
    ours = load_sam(files["both"]).eval()
    image = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf_embedding = hf.vision_encoder(image).last_hidden_state
        our_embedding = ours.image_encoder(image)
    return SimpleNamespace(cfg=cfg, hf=hf, ours=ours, files=files, hf_embedding=hf_embedding,
                           our_embedding=our_embedding)


def test_hf_narrow_vit_b_image_embeddings_match_transformers(hf_narrow_vit_b):
    assert rel_err(hf_narrow_vit_b.our_embedding, hf_narrow_vit_b.hf_embedding) <= TOL


@pytest.mark.parametrize("variant", list(HF_GAUSSIAN_KEYS))
def test_hf_narrow_vit_b_prompts_and_dense_pe_match_transformers_for_each_gaussian_key(hf_narrow_vit_b, variant):
    ours = hf_narrow_vit_b.ours if variant == "both" else load_sam(hf_narrow_vit_b.files[variant]).eval()
    hf = hf_narrow_vit_b.hf
    coords, labels, boxes, masks = prompts(hf_narrow_vit_b.cfg, batch=2)
    with torch.no_grad():
        assert rel_err(ours.prompt_encoder.get_dense_pe(), hf.get_image_wide_positional_embeddings()) <= TOL
        sparse, dense = ours.prompt_encoder(points=(coords, labels), masks=masks)
        hf_sparse, hf_dense = hf.prompt_encoder(input_points=coords[:, None], input_labels=labels[:, None],
                                                input_boxes=None, input_masks=masks)
        assert rel_err(sparse, hf_sparse[:, 0]) <= TOL and rel_err(dense, hf_dense) <= TOL
        box_sparse, _ = ours.prompt_encoder(boxes=boxes)
        hf_box_sparse, _ = hf.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes[:, None],
                                             input_masks=None)
        assert rel_err(box_sparse, hf_box_sparse[:, 0]) <= TOL


@pytest.mark.parametrize("multimask", [False, True])
def test_hf_narrow_vit_b_mask_decoder_matches_transformers(hf_narrow_vit_b, multimask):
    """Equal once transformers' two-way LayerNorms get segment_anything's eps 1e-5 (theirs is 1e-6, which
    at width 32 moves the IoU by up to 3e-4; test_load_weights shows we follow the original)."""
    hf, ours = hf_narrow_vit_b.hf, hf_narrow_vit_b.ours
    hf_decoder = copy.deepcopy(hf.mask_decoder)  # the module fixture stays as it is
    for module in hf_decoder.transformer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    coords, labels, _, masks = prompts(hf_narrow_vit_b.cfg, batch=1)
    with torch.no_grad():
        sparse, dense = hf.prompt_encoder(input_points=coords[:, None], input_labels=labels[:, None],
                                          input_boxes=None, input_masks=masks)
        pe = hf.get_image_wide_positional_embeddings()
        hf_masks, hf_iou = hf_decoder(hf_narrow_vit_b.hf_embedding, pe, sparse, dense, multimask)
        our_masks, our_iou = ours.mask_decoder(image_embeddings=hf_narrow_vit_b.hf_embedding, image_pe=pe,
                                               sparse_prompt_embeddings=sparse[:, 0], dense_prompt_embeddings=dense,
                                               multimask_output=multimask)
    assert rel_err(our_masks, hf_masks[:, 0]) <= TOL and rel_err(our_iou, hf_iou[:, 0]) <= TOL


# ---- tiny config ----

@pytest.fixture(scope="module")
def tiny():
    """A random official tiny SAM and ours with the same state dict."""
    cfg = SAMConfig.tiny()
    official = randomize_(build_official_sam(cfg), seed=5)
    ours = SAM(cfg).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return SimpleNamespace(cfg=cfg, official=official, ours=ours)


def test_tiny_shapes(tiny):
    ours, cfg = tiny.ours, tiny.cfg
    coords, labels, boxes, masks = prompts(cfg, batch=3)
    embedding = ours.image_encoder(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert embedding.shape == (2, cfg.prompt_dim, cfg.grid, cfg.grid)
    sparse, dense = ours.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
    assert sparse.shape == (3, 3 + 2, cfg.prompt_dim) and dense.shape == (3, cfg.prompt_dim, cfg.grid, cfg.grid)
    assert ours.prompt_encoder(points=(coords, labels))[0].shape == (3, 3 + 1, cfg.prompt_dim)  # + padding point
    sparse_none, dense_none = ours.prompt_encoder()
    assert sparse_none.shape == (1, 0, cfg.prompt_dim) and dense_none.shape == (1, cfg.prompt_dim, cfg.grid, cfg.grid)
    for multimask, k in ((False, 1), (True, cfg.num_multimask_outputs)):
        out, iou = ours.mask_decoder(image_embeddings=embedding[:1], image_pe=ours.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask)
        assert out.shape == (3, k, 4 * cfg.grid, 4 * cfg.grid) and iou.shape == (3, k)


def test_prompt_encoder_exposes_what_prompt_ris_needs(tiny):
    pe = tiny.ours.prompt_encoder
    assert pe.image_embedding_size == (tiny.cfg.grid, tiny.cfg.grid)
    assert pe.input_image_size == (tiny.cfg.image_size, tiny.cfg.image_size)
    assert len(pe.point_embeddings) == 4 and pe.not_a_point_embed.weight.shape == (1, tiny.cfg.prompt_dim)
    assert pe.no_mask_embed.weight.shape == (1, tiny.cfg.prompt_dim)
    assert pe.mask_downscaling(torch.zeros(1, 1, 4 * tiny.cfg.grid, 4 * tiny.cfg.grid)).shape[1:] == \
        (tiny.cfg.prompt_dim, tiny.cfg.grid, tiny.cfg.grid)


def test_pe_layer_encodes_coordinates_of_any_leading_shape_like_official(tiny):
    """Prompt-RIS encodes every position of the 4h x 4w mask grid at once (Eq. 3)."""
    side = 4 * tiny.cfg.grid
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).float() * tiny.cfg.image_size / side  # (side, side, 2) pixel (x, y)
    size = tiny.ours.prompt_encoder.input_image_size
    ours = tiny.ours.prompt_encoder.pe_layer.forward_with_coords(grid, size)
    official = tiny.official.prompt_encoder.pe_layer.forward_with_coords(grid.view(1, -1, 2), size)
    assert ours.shape == (side, side, tiny.cfg.prompt_dim)
    torch.testing.assert_close(ours.view(1, -1, tiny.cfg.prompt_dim), official)  # other shapes may round otherwise


def test_mask_embedding_depends_on_the_mask(tiny):
    """P_mask of Prompt-RIS is SAM's mask embedding of the coarse mask: different masks, different embeddings
    (a LayerNorm over one channel would make it a constant)."""
    masks = torch.randn(2, 1, 4 * tiny.cfg.grid, 4 * tiny.cfg.grid)
    with torch.no_grad():
        dense = tiny.ours.prompt_encoder.mask_downscaling(masks)
    assert (dense[0] - dense[1]).abs().max() > 0.1


def test_points_labelled_minus_one_embed_as_not_a_point(tiny):
    pe = tiny.ours.prompt_encoder
    coords, labels, _, _ = prompts(tiny.cfg, batch=2)
    sparse = pe.embed_points(coords, labels, pad=True)
    assert torch.equal(sparse[:, 2], pe.not_a_point_embed.weight.expand(2, -1))  # label -1
    assert torch.equal(sparse[:, 3], pe.not_a_point_embed.weight.expand(2, -1))  # padding point


@pytest.mark.parametrize("size", [4, 8])  # window-sized and global-sized grids
def test_sdpa_attention_equals_official_handwritten_attention(size):
    torch.manual_seed(6)
    official = segment_anything_modeling().image_encoder.Attention(64, num_heads=4, use_rel_pos=True,
                                                                   input_size=(size, size))
    randomize_(official, seed=6)
    ours = Attention(64, heads=4, size=size)
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(3, size, size, 64)
    with torch.no_grad():
        assert rel_err(ours(x), official(x)) <= 1e-5


def test_window_partition_pads_and_unpartition_restores():
    x = torch.randn(2, 9, 11, 5)
    windows, padded = window_partition(x, 4)
    official_windows, official_padded = segment_anything_modeling().image_encoder.window_partition(x, 4)
    assert padded == official_padded == (12, 12) and torch.equal(windows, official_windows)
    assert torch.equal(window_unpartition(windows, 4, padded, (9, 11)), x)


def test_tiny_with_padded_windows_matches_official():
    """Grid 16 with window 5 pads to 20: padded tokens are visible zeros in both implementations."""
    cfg = SAMConfig.tiny()
    cfg.window_size = 5
    official = randomize_(build_official_sam(cfg), seed=7)
    ours = SAM(cfg).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert rel_err(ours.image_encoder(x), official.image_encoder(x)) <= TOL


def decode(model, embeddings, sparse, dense):
    return model.mask_decoder(image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)


def test_mask_decoder_broadcasts_one_image_embedding_over_prompt_sets(tiny):
    """Batch-1 image embedding: the same result as the official decoder's repeat_interleave."""
    coords, labels, boxes, masks = prompts(tiny.cfg, batch=3)
    embedding = torch.randn(1, tiny.cfg.prompt_dim, tiny.cfg.grid, tiny.cfg.grid)
    with torch.no_grad():
        sparse, dense = tiny.ours.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
        ours = decode(tiny.ours, embedding, sparse, dense)
        official = decode(tiny.official, embedding, sparse, dense)
        expanded = decode(tiny.ours, embedding.expand(3, -1, -1, -1), sparse, dense)
    for a, b, c in zip(ours, official, expanded):
        assert rel_err(a, b) <= TOL and rel_err(a, c) <= 1e-6


def test_mask_decoder_takes_one_image_embedding_per_prompt_set(tiny):
    """Batch-B image embeddings (an extension: the official decoder would repeat_interleave them B times)
    give, row by row, what decoding each image alone gives."""
    coords, labels, _, masks = prompts(tiny.cfg, batch=3)
    embeddings = torch.randn(3, tiny.cfg.prompt_dim, tiny.cfg.grid, tiny.cfg.grid)
    with torch.no_grad():
        sparse, dense = tiny.ours.prompt_encoder(points=(coords, labels), masks=masks)
        together = decode(tiny.ours, embeddings, sparse, dense)
        for i in range(3):
            alone = decode(tiny.official, embeddings[i:i + 1], sparse[i:i + 1], dense[i:i + 1])
            assert rel_err(together[0][i:i + 1], alone[0]) <= TOL and rel_err(together[1][i:i + 1], alone[1]) <= TOL


def test_mask_decoder_rejects_an_image_batch_that_is_neither_one_nor_the_prompt_batch(tiny):
    coords, labels, _, _ = prompts(tiny.cfg, batch=3)
    sparse, dense = tiny.ours.prompt_encoder(points=(coords, labels))
    with pytest.raises(ValueError, match="image_embeddings batch 2"):
        decode(tiny.ours, torch.randn(2, tiny.cfg.prompt_dim, tiny.cfg.grid, tiny.cfg.grid), sparse, dense)


def test_gradients_reach_every_parameter_and_the_point_coordinates(tiny):
    """No forward is wrapped in torch.no_grad: fine-tuning through the public API works."""
    model = SAM(tiny.cfg)
    coords, labels, boxes, masks = prompts(tiny.cfg, batch=2)
    coords.requires_grad_(True)
    embedding = model.image_encoder(torch.randn(1, 3, tiny.cfg.image_size, tiny.cfg.image_size))
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
    out, iou = decode(model, embedding, sparse, dense)
    _, dense_no_mask = model.prompt_encoder(points=(coords, labels))
    (out.square().mean() + iou.sum() + dense_no_mask.sum()).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert coords.grad is not None and coords.grad.abs().sum() > 0


# ---- pre- and post-processing ----

def test_resize_longest_side_shape_matches_official_rounding():
    official = resize_longest_side_class().get_preprocess_shape
    for h, w in [(480, 640), (640, 480), (333, 500), (1, 1000), (1024, 1024), (427, 640), (2000, 3), (511, 1023)]:
        for target in (1024, 256, 480):
            assert resize_longest_side_shape(h, w, target) == official(h, w, target)


def test_preprocess_matches_official_resize_normalize_and_pad(tiny):
    """Official: ResizeLongestSide.apply_image (PIL bilinear) then Sam.preprocess (normalize, pad).
    An image already at the target size goes through ours unchanged by resizing, so it must match exactly;
    resizing inside ours (torch bilinear, antialiased) gives the same shape and nearly the same pixels."""
    S = tiny.cfg.image_size
    image = np.random.default_rng(8).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    resized = resize_longest_side_class()(S).apply_image(image)  # (192, 256, 3)
    resized_t = torch.from_numpy(resized).permute(2, 0, 1).float()
    official = tiny.official.preprocess(resized_t)
    assert torch.allclose(tiny.ours.preprocess(resized_t), official, atol=1e-6)
    assert torch.allclose(tiny.ours.preprocess(resized_t[None])[0], official, atol=1e-6)
    ours = tiny.ours.preprocess(torch.from_numpy(image).permute(2, 0, 1).float())
    h, w = resize_longest_side_shape(150, 200, S)
    assert ours.shape == (3, S, S) and (ours[:, h:] == 0).all() and (ours[:, :, w:] == 0).all()
    assert (ours[:, :h, :w] - official[:, :h, :w]).abs().mean() < 0.05  # < 3 grey levels on average


def test_postprocess_masks_matches_official(tiny):
    low_res = torch.randn(2, 3, 4 * tiny.cfg.grid, 4 * tiny.cfg.grid)
    for input_size, original_size in (((192, 256), (150, 200)), ((256, 100), (512, 200))):
        ours = tiny.ours.postprocess_masks(low_res, input_size, original_size)
        official = tiny.official.postprocess_masks(low_res, input_size, original_size)
        assert ours.shape == (2, 3, *original_size) and torch.equal(ours, official)
