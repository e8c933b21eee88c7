"""Every cache derived from weights follows what it derives from: after `.to(dtype)`, `.to(device)` (the meta
device: the one other device every machine has), `load_state_dict` and a training step, a cache gives what a
fresh computation from the new weights gives.

- CLIP's resized positional embedding per patch grid (clip_vit.py:VisionTransformer.pos_embed, `_pos_cache`),
  kept while CLIP is frozen;
- SAM's Fourier-feature tables: the dense PE of the image-embedding grid and Prompt-RIS's point table E of
  Eq. (3) (sam.py:PositionEmbeddingRandom.cache_grid, PromptRIS.point_pe_table), buffers derived from SAM's
  Gaussian matrix;
- the SAM feature cache on disk (sam_cache.py, --cache-sam): a folder per key sam_weights_hash, which must change
  with SAM's image-encoder weights and the autocast dtype, and which only a frozen SAM gets.

Not derived from weights, so nothing to follow: the tokenizer's BPE cache (a pure function of the pre-token
and the vocabulary fixed at construction) and the compiled pre-tokenizer pattern (a constant).
"""
from types import SimpleNamespace

import pytest
import torch

import clip_vit
import sam_cache
from clip_vit import CLIP, CLIPConfig
from prompt_ris import PromptRIS, PromptRISConfig

GRID = (30, 30)  # 480 px: not CLIP's native 14 x 14 grid, so its positional embedding is resized


# ---- CLIP: the resized positional embedding ----


def frozen_clip(seed=0):
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.tiny()).eval().requires_grad_(False)


def fresh_resize(clip):
    return clip_vit.resize_pos_embed(clip.visual.positional_embedding.detach(), GRID)


def test_clip_pos_cache_follows_to_dtype():
    clip = frozen_clip()
    clip.visual.pos_embed(GRID)  # cached in float32
    clip.double()
    got = clip.visual.pos_embed(GRID)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, fresh_resize(clip), rtol=0, atol=0)


def test_clip_pos_cache_follows_to_device():
    clip = frozen_clip()
    clip.visual.pos_embed(GRID)  # cached on the CPU
    clip.to("meta")
    assert clip.visual.pos_embed(GRID).device.type == "meta"


def test_clip_pos_cache_follows_load_state_dict():
    clip, other = frozen_clip(seed=0), frozen_clip(seed=1)
    clip.visual.pos_embed(GRID)  # cached from seed 0's weights
    clip.load_state_dict(other.state_dict())
    torch.testing.assert_close(clip.visual.pos_embed(GRID), other.visual.pos_embed(GRID), rtol=0, atol=0)


@pytest.mark.parametrize("train_size", [480, 224], ids=["resized grid", "native grid"])
def test_clip_pos_cache_follows_a_training_step(train_size):
    """Frozen, resized and cached; then trained for a step at `train_size` (224: CLIP's native grid, where no
    resize happens), frozen again: the resize of the trained table, not the cached one."""
    clip = frozen_clip()
    stale = clip.visual.pos_embed(GRID).clone()
    clip.requires_grad_(True)
    optimizer = torch.optim.SGD(clip.parameters(), lr=1.0)
    clip.encode_image(torch.randn(2, 3, train_size, train_size)).sum().backward()
    optimizer.step()
    clip.requires_grad_(False)
    got = clip.visual.pos_embed(GRID)
    assert not torch.equal(got, stale)
    torch.testing.assert_close(got, fresh_resize(clip), rtol=0, atol=0)


# ---- SAM: the dense PE and the point table E ----


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return PromptRIS(PromptRISConfig.tiny())


def pe_tables(model):
    """(point table E, dense PE) as the model serves them, and as a fresh computation from its Gaussian matrix."""
    pe = model.sam.prompt_encoder
    served = (model.point_pe_table, pe.get_dense_pe())
    fresh = (pe.pe_layer.grid_table(pe.mask_input_size),
             pe.pe_layer.grid_table(pe.image_embedding_size).t().reshape(1, -1, *pe.image_embedding_size))
    return served, fresh


@pytest.mark.parametrize("assign", [False, True])
def test_sam_pe_tables_follow_load_state_dict(assign):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    model.load_state_dict(other.state_dict(), assign=assign)
    (table, dense), (fresh_table, fresh_dense) = pe_tables(model)
    torch.testing.assert_close(table, other.point_pe_table, rtol=0, atol=0)
    torch.testing.assert_close(table, fresh_table, rtol=0, atol=0)
    torch.testing.assert_close(dense, fresh_dense, rtol=0, atol=0)


def test_sam_pe_tables_follow_to_dtype_and_device():
    model = tiny_model().double()
    (table, dense), (fresh_table, fresh_dense) = pe_tables(model)  # fresh: computed in float32, as always
    torch.testing.assert_close(table, fresh_table.double(), rtol=0, atol=0)
    torch.testing.assert_close(dense, fresh_dense.double(), rtol=0, atol=0)
    model.to("meta")
    (table, dense), _ = pe_tables(model)
    assert table.device.type == dense.device.type == "meta"


def test_sam_pe_tables_follow_a_training_step():
    """SAM's Gaussian matrix is a buffer, not a parameter: training the whole model (towers too) leaves it, and
    the tables, as they were; they still equal a fresh computation."""
    model = tiny_model()
    model.freeze_backbones(clip=False, sam=False)
    before = model.point_pe_table.clone()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    out = model(torch.randn(1, 3, 224, 224), torch.randint(1, 100, (2, 6)), torch.tensor([0, 0]),
                sam_images=torch.randn(1, 3, model.config.sam.image_size, model.config.sam.image_size))
    (out["mask"].sum() + out["coarse"].sum()).backward()
    optimizer.step()
    (table, dense), (fresh_table, fresh_dense) = pe_tables(model)
    torch.testing.assert_close(table, before, rtol=0, atol=0)
    torch.testing.assert_close(table, fresh_table, rtol=0, atol=0)
    torch.testing.assert_close(dense, fresh_dense, rtol=0, atol=0)


# ---- the SAM feature cache on disk: its key ----


def test_sam_cache_key_follows_the_image_encoder_weights_through_load_state_dict():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    key = sam_cache.sam_weights_hash(model, None)
    model.sam.load_state_dict(other.sam.state_dict())
    assert sam_cache.sam_weights_hash(model, None) == sam_cache.sam_weights_hash(other, None) != key


def test_sam_cache_key_follows_a_training_step_of_the_image_encoder():
    model = tiny_model()
    key = sam_cache.sam_weights_hash(model, None)
    model.freeze_backbones(sam=False)
    optimizer = torch.optim.SGD(model.sam.image_encoder.parameters(), lr=1e-3)
    model.encode_sam_image(torch.randn(1, 3, model.config.sam.image_size, model.config.sam.image_size)).sum().backward()
    optimizer.step()
    assert sam_cache.sam_weights_hash(model, None) != key


def test_sam_cache_key_ignores_weights_outside_the_image_encoder():
    """F_IS depends on the image encoder only: training Prompt-RIS's own modules keeps the cached embeddings."""
    model = tiny_model()
    key = sam_cache.sam_weights_hash(model, None)
    with torch.no_grad():
        model.decoder.apply(lambda m: [p.add_(1) for p in m.parameters(recurse=False)])
        model.sam.mask_decoder.apply(lambda m: [p.add_(1) for p in m.parameters(recurse=False)])
    assert sam_cache.sam_weights_hash(model, None) == key


def test_sam_cache_key_follows_the_autocast_dtype():
    model = tiny_model()
    keys = {sam_cache.sam_weights_hash(model, dtype) for dtype in (None, torch.bfloat16, torch.float16)}
    assert len(keys) == 3


def test_only_a_frozen_sam_gets_a_feature_cache(tmp_path):
    tc = SimpleNamespace(cache_sam=str(tmp_path), data_root="")
    assert sam_cache.sam_cache_dir(tc, tiny_model(), True, None, 1, print) is None  # SAM trains: no cache
    assert sam_cache.sam_cache_dir(tc, tiny_model(), False, None, 1, print) is not None
