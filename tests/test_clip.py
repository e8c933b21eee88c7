"""CLIP ViT-B/16: parity with Hugging Face transformers (ViT-B/16's widths from an OpenAI-naming file; both
namings, at 224 and 480, on ViT-B/16's 12-block layout at a narrow width), plus the per-layer API, the positional-embedding
resize cache and the prompt-aware text mask."""
import dataclasses
import importlib.util
import os

import pytest
import torch
from safetensors.torch import save_file

import clip_vit
from clip_vit import CLIP, CLIPConfig, ResidualAttentionBlock, Tokenizer, text_attention_mask
from load_weights import WeightsError, clip_naming, infer_clip_config, load_clip


SENTENCES = ["the man in a red shirt on the left", "zebra second from right",
             "a small brown dog lying next to the white couch, facing the camera", "cat"]


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def features(output):
    """transformers returns either a tensor or an output object from get_*_features, by version."""
    return output if torch.is_tensor(output) else output.pooler_output


def openai_state_from_hf(hf: dict) -> dict:
    """Test-side map to OpenAI's key names, written from the layout of OpenAI's clip/model.py state
    dict (not from load_weights.py), plus the scalars OpenAI's TorchScript file carries."""
    state = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t(),
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t(),
        "logit_scale": hf["logit_scale"],
        "input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408),
    }
    for hf_tower, tower in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(sum(k.startswith(f"{hf_tower}.encoder.layers.") and k.endswith(".layer_norm1.weight") for k in hf)):
            h, o = f"{hf_tower}.encoder.layers.{i}.", f"{tower}.resblocks.{i}."
            for kind in ("weight", "bias"):
                state[o + f"attn.in_proj_{kind}"] = torch.cat([hf[h + f"self_attn.{c}_proj.{kind}"] for c in "qkv"])
                state[o + f"attn.out_proj.{kind}"] = hf[h + f"self_attn.out_proj.{kind}"]
                state[o + f"ln_1.{kind}"] = hf[h + f"layer_norm1.{kind}"]
                state[o + f"ln_2.{kind}"] = hf[h + f"layer_norm2.{kind}"]
                state[o + f"mlp.c_fc.{kind}"] = hf[h + f"mlp.fc1.{kind}"]
                state[o + f"mlp.c_proj.{kind}"] = hf[h + f"mlp.fc2.{kind}"]
    return state


def vit_b16_config(vision_width: int, text_width: int, layers: int = 12):
    """transformers' CLIPConfig of ViT-B/16's layout (16 px patches, a 224 input, 77 tokens, OpenAI's vocabulary)
    at the given widths (heads of 64 channels, as load_clip infers) and blocks per tower."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=layers,
                         num_attention_heads=text_width // 64, max_position_embeddings=77, vocab_size=49408,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=layers,
                           num_attention_heads=vision_width // 64, image_size=224, patch_size=16,
                           hidden_act="quick_gelu"),
        projection_dim=512)


def hf_clip(tmp_path_factory, name: str, config, namings=("hf", "openai")):
    """A random transformers CLIPModel of `config` and the given namings of it on disk."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorm / bias init is 1 and 0: perturb so that a swapped tensor shows
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        for tower in (hf.vision_model, hf.text_model):  # init std 0.02: too small for its resize to show
            tower.embeddings.position_embedding.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp(name)
    hf_state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for tower, length in (("text_model", 77), ("vision_model", 197)):  # buffers older versions saved
        hf_state[f"{tower}.embeddings.position_ids"] = torch.arange(length)[None]
    if "hf" in namings:
        save_file(hf_state, folder / "hf.safetensors")
    if "openai" in namings:
        save_file({k: v.contiguous() for k, v in openai_state_from_hf(hf_state).items()}, folder / "openai.safetensors")
    return hf, folder


@pytest.fixture(scope="module")
def full_width(tmp_path_factory):
    """ViT-B/16's widths (768 and 512 channels, 12 and 8 heads, MLPs of 3072 and 2048) with 2 blocks per tower:
    every tensor shape of ViT-B/16; its 12-block depth runs in `narrow`."""
    return hf_clip(tmp_path_factory, "clip", vit_b16_config(768, 512, layers=2), namings=("openai",))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """ViT-B/16's layout at width 128 in both towers: the name maps and the position grid's resize depend on
    the layout and the grid only, never on a width."""
    return hf_clip(tmp_path_factory, "narrow_clip", vit_b16_config(128, 128))


@pytest.fixture(scope="module")
def inputs():
    """Two images at 224, one at 480 (the paper's CLIP input: 30x30 patches) and the sentences tokenized
    with OpenAI's vocabulary (shipped with open_clip) when it is installed, else with the byte fallback."""
    torch.manual_seed(1)
    spec = importlib.util.find_spec("open_clip")
    vocab = spec and os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    tokens = Tokenizer(vocab if vocab and os.path.isfile(vocab) else None)(SENTENCES)
    return torch.randn(2, 3, 224, 224), torch.randn(1, 3, 480, 480), tokens


def test_full_width_openai_file_matches_transformers(full_width, inputs):
    """ViT-B/16's widths from a file in OpenAI's naming (as the official weights come): images at 224 and the text."""
    hf, folder = full_width
    pixels, _, tokens = inputs
    model = load_clip(folder / "openai.safetensors")
    with torch.no_grad():
        assert relative_error(model.encode_image(pixels), features(hf.get_image_features(pixel_values=pixels))) < 1e-4
        assert relative_error(model.encode_text(tokens), features(hf.get_text_features(input_ids=tokens))) < 1e-4


@pytest.mark.parametrize("naming", ["openai", "hf"])
def test_either_naming_matches_transformers_at_224_and_480_with_the_logit_scale(narrow, inputs, naming):
    """The narrow ViT-B/16 from either naming: images at 224 and at 480 (the paper's input, the 14 x 14
    position grid resized to 30 x 30), the text, and CLIPModel's logits (the logit scale)."""
    hf, folder = narrow
    pixels, large, tokens = inputs
    model = load_clip(folder / f"{naming}.safetensors")
    with torch.no_grad():
        assert relative_error(model.encode_image(pixels), features(hf.get_image_features(pixel_values=pixels))) < 1e-4
        assert relative_error(model.encode_text(tokens), features(hf.get_text_features(input_ids=tokens))) < 1e-4
        logits = hf(input_ids=tokens, pixel_values=pixels).logits_per_image
        assert relative_error(model(pixels, tokens)[0], logits) < 1e-4
        at_480 = hf.get_image_features(pixel_values=large, interpolate_pos_encoding=True)
        assert relative_error(model.encode_image(large), features(at_480)) < 1e-4


def test_both_namings_infer_vit_b16_config():
    """From the tensor shapes of ViT-B/16 itself, in either naming (built on the meta device: shapes, no values)."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf_state = transformers.CLIPModel(vit_b16_config(768, 512)).state_dict()
    for naming, state in (("hf", hf_state), ("openai", openai_state_from_hf(hf_state))):
        assert clip_naming(state) == naming
        assert infer_clip_config(state) == CLIPConfig()


# ---- tiny config: shapes, per-layer API, masks, cache ----


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return CLIP(CLIPConfig.tiny()).eval()


def test_shapes_square_and_non_square(tiny):
    pixels = torch.randn(2, 3, 480, 320)
    assert tiny.visual.grid(pixels) == (30, 20)
    assert tiny.visual.embed(pixels).shape == (2, 1 + 30 * 20, 64)
    assert tiny.encode_image(pixels).shape == (2, 64)
    assert tiny.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, 64)
    assert tiny.encode_text(Tokenizer()(["a", "b"])).shape == (2, 64)


def test_image_size_not_multiple_of_patch_is_rejected(tiny):
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny.encode_image(torch.randn(1, 3, 230, 224))


def test_encode_text_accepts_shorter_token_sequences(tiny):
    tokens = Tokenizer()(["red car", "the tall man"])  # (2, 77), EOT well before position 30
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(tokens[:, :30]), tiny.encode_text(tokens))


def test_per_layer_api_equals_encode_image_and_encode_text(tiny):
    pixels, tokens = torch.randn(2, 3, 480, 480), Tokenizer()(SENTENCES[:2])[:, :40]
    with torch.no_grad():
        x = tiny.visual.embed(pixels)
        for block in tiny.visual.transformer.resblocks:
            x = block(x)
        torch.testing.assert_close(tiny.visual.ln_post(x[:, 0]) @ tiny.visual.proj, tiny.encode_image(pixels))
        t = tiny.embed_text(tokens)
        mask = text_attention_mask(tokens.shape[1])
        for block in tiny.transformer.resblocks:
            t = block(t, mask)
        t = tiny.ln_final(t)[torch.arange(2), tokens.argmax(-1)] @ tiny.text_projection
        torch.testing.assert_close(t, tiny.encode_text(tokens))


def test_plain_text_mask_is_clips_causal_mask():
    torch.manual_seed(0)
    block, x = ResidualAttentionBlock(32, 2), torch.randn(2, 9, 32)
    additive = torch.full((9, 9), float("-inf")).triu(1)  # OpenAI's build_attention_mask
    torch.testing.assert_close(block(x, text_attention_mask(9)), block(x, additive))


def test_text_mask_with_prefix_matches_attention_over_visible_tokens_only():
    """Text token i sees all prompts and text tokens <= i; prompts see prompts only. In one block a
    token's output depends only on itself and what it attends to, so each row equals an unmasked run
    over exactly its visible tokens."""
    torch.manual_seed(0)
    n_prefix, length = 3, 5
    block = ResidualAttentionBlock(32, 2)
    prompts, text = torch.randn(1, n_prefix, 32), torch.randn(1, length, 32)
    with torch.no_grad():
        out = block(torch.cat([prompts, text], 1), text_attention_mask(length, n_prefix))
        torch.testing.assert_close(out[:, :n_prefix], block(prompts))
        for i in range(length):
            visible = torch.cat([prompts, text[:, : i + 1]], 1)
            torch.testing.assert_close(out[:, n_prefix + i], block(visible)[:, -1])


def test_frozen_positional_embedding_is_resized_once_per_grid(tiny, monkeypatch):
    calls = []
    resize = clip_vit.resize_pos_embed
    monkeypatch.setattr(clip_vit, "resize_pos_embed", lambda pos, grid: calls.append(grid) or resize(pos, grid))
    tiny.requires_grad_(False)
    first = tiny.visual.pos_embed((30, 30))
    assert tiny.visual.pos_embed((30, 30)) is first and calls == [(30, 30)]
    tiny.visual.pos_embed((20, 30))
    assert calls == [(30, 30), (20, 30)]
    assert tiny.visual.pos_embed((14, 14)) is tiny.visual.positional_embedding  # native grid: no resize


def test_loading_weights_drops_the_resize_cache(tiny):
    tiny.requires_grad_(False)
    stale = tiny.visual.pos_embed((30, 30))
    state = {k: v + 1 if k == "visual.positional_embedding" else v for k, v in tiny.state_dict().items()}
    tiny.load_state_dict(state)
    fresh = tiny.visual.pos_embed((30, 30))
    torch.testing.assert_close(fresh, stale + 1)  # bicubic weights sum to 1, so a shift carries over


def test_trainable_positional_embedding_gets_gradients_at_480(tiny):
    tiny.encode_image(torch.randn(1, 3, 480, 480)).sum().backward()
    grad = tiny.visual.positional_embedding.grad
    assert grad is not None and grad[1:].abs().sum() > 0 and not tiny.visual._pos_cache


def test_freezing_after_training_uses_the_trained_weights(tiny):
    pos = tiny.visual.positional_embedding
    pos.requires_grad_(False)
    tiny.visual.pos_embed((30, 30))  # cached from the initial weights
    pos.requires_grad_(True)
    tiny.encode_image(torch.randn(1, 3, 480, 480)).sum().backward()
    torch.optim.SGD([pos], lr=1.0).step()
    pos.requires_grad_(False)
    torch.testing.assert_close(tiny.visual.pos_embed((30, 30)), clip_vit.resize_pos_embed(pos, (30, 30)))


def test_resize_keeps_cls_and_is_bicubic_without_antialias():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 8)
    resized = clip_vit.resize_pos_embed(pos, (30, 20))
    assert resized.shape == (1 + 30 * 20, 8) and torch.equal(resized[0], pos[0])
    grid = pos[1:].T.reshape(1, 8, 14, 14)  # hand-written reference: channels-first grid
    reference = torch.nn.functional.interpolate(grid, size=(30, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[1:], reference.reshape(8, 600).T)


def test_moving_to_another_dtype_rebuilds_the_cache(tiny):
    tiny.requires_grad_(False)
    tiny.visual.pos_embed((30, 30))
    tiny.double()
    assert tiny.visual.embed(torch.randn(1, 3, 480, 480, dtype=torch.float64)).dtype == torch.float64


# ---- loading errors ----


def test_load_clip_names_missing_and_unexpected_keys(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if k != "ln_final.bias"}
    state["visual.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*missing \(1\): ln_final\.bias.*unexpected \(1\): visual\.extra"):
        load_clip(tmp_path / "bad.safetensors")


def test_load_clip_reports_incomplete_hf_qkv(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1),
        projection_dim=32)
    state = {k: v.contiguous() for k, v in transformers.CLIPModel(config).state_dict().items()
             if k != "text_model.encoder.layers.0.self_attn.v_proj.weight"}
    save_file(state, tmp_path / "hf.safetensors")
    with pytest.raises(WeightsError, match=r"missing \(1\): transformer\.resblocks\.0\.attn\.in_proj_weight.*"
                                           r"unexpected \(2\): text_model\.encoder\.layers\.0\.self_attn\.k_proj"):
        load_clip(tmp_path / "hf.safetensors")


def test_half_precision_file_loads_into_float32_model(tmp_path):
    # heads are not in the tensor shapes: load_clip assumes OpenAI's width // 64 (1 head at width 64)
    config = dataclasses.replace(CLIPConfig.tiny(), vision_heads=1, text_heads=1)
    original = CLIP(config)
    save_file({k: v.half().contiguous() for k, v in original.state_dict().items()}, tmp_path / "fp16.safetensors")
    model = load_clip(tmp_path / "fp16.safetensors")
    assert model.config == config and model.visual.proj.dtype == torch.float32
    torch.testing.assert_close(model.visual.proj, original.visual.proj.half().float())


def test_load_clip_rejects_a_file_that_is_not_clip(tmp_path):
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "sam.safetensors")
    with pytest.raises(WeightsError, match="not a CLIP checkpoint"):
        load_clip(tmp_path / "sam.safetensors")
