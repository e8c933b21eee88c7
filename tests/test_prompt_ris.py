"""Prompt-RIS model and losses (prompt_ris.py) and its keyed draws (keyed_random.py): shapes, gradients, ablation
switches and equations."""
import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import keyed_random
from clip_vit import CLIPConfig
from helpers import pin_point_prompt
from prompt_ris import (CMP_MODES, PROMPT_TYPES, CrossModalPrompting, LossConfig, PromptGenerator, PromptRIS, PromptRISConfig,
                        dice_coefficient, icl_loss, prepare_text, seg_loss, straight_through_gumbel, total_loss)
from sam import SAM, SAMConfig

SOT, EOT = 49406, 49407


def make_tokens(lengths, context=77, seed=0):
    """(N, context) ids: SOT, `length` random word ids, EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context, dtype=torch.long)
    for n, length in enumerate(lengths):
        tokens[n, 0] = SOT
        tokens[n, 1:1 + length] = torch.randint(1, 1000, (length,), generator=g)
        tokens[n, 1 + length] = EOT
    return tokens


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PromptRIS(dataclasses.replace(PromptRISConfig.tiny(), **overrides))


def tiny_batch(seed=0):
    """Two images, five sentences (three of image 0, two of image 1)."""
    g = torch.Generator().manual_seed(seed)
    return dict(clip_images=torch.randn(2, 3, 224, 224, generator=g),
                sam_images=torch.randn(2, 3, 256, 256, generator=g),
                tokens=make_tokens([3, 7, 2, 5, 4], seed=seed),
                image_index=torch.tensor([0, 0, 0, 1, 1]),
                instance_ids=torch.tensor([10, 10, 11, 20, 21]),
                masks=(torch.rand(5, 256, 256, generator=g) > 0.7).float())


def model_inputs(batch):
    return {k: batch[k] for k in ("clip_images", "tokens", "image_index", "sam_images")}


# ---- shapes ----


def test_paper_config_output_shapes():
    """The paper's sizes end to end, SAM's 1024 px image encoder included, in training (forward and backward)
    and at inference: CLIP 480 (30 x 30 grid), n = 16, 2 images with 3 sentences, CLIP and SAM frozen (§4.2).
    On the meta device, which computes shapes only (a real forward takes ~15 s on 2 CPU cores); prepared, as
    data.collate's batches are, since a meta tensor has no values to check. Values: at the tiny size."""
    with torch.device("meta"):
        model = PromptRIS(PromptRISConfig.paper())
        model.freeze_backbones(clip=True, sam=True)
        assert model.point_pe_table.shape == (256 * 256, 256)
        tokens = make_tokens([14, 9, 20])[:, :20].to("meta")  # cut to the longest, as collate does
        inputs = dict(clip_images=torch.randn(2, 3, 480, 480), tokens=tokens, image_index=torch.tensor([0, 1, 1]),
                      sam_images=torch.randn(2, 3, 1024, 1024), prepared=True)
        for training in (True, False):
            out = model.train(training)(**inputs)
            assert out["coarse"].shape == (3, 30, 30) and out["mask"].shape == (3, 1024, 1024)
            assert out["point"].shape == (3,) and out["point"].dtype == torch.long
            if training:
                out["mask"].sum().backward()  # the coarse decoder's share through Eq. (3)'s point
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.shape == p.shape for p in trained)


def test_tiny_config_output_shapes_in_train_and_eval_mode():
    model, batch = tiny_model(), tiny_batch()
    for mode in (True, False):
        out = model.train(mode)(**model_inputs(batch))
        assert set(out) == {"coarse", "mask", "point"}
        assert out["coarse"].shape == (5, 14, 14)
        assert out["mask"].shape == (5, 256, 256)
        assert out["point"].shape == (5,) and int(out["point"].max()) < 64 * 64


def test_use_sam_false_returns_only_the_coarse_mask():
    model, batch = tiny_model(), tiny_batch()
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "sam_images"}
    assert set(model(**inputs, use_sam=False)) == {"coarse"}
    assert set(tiny_model(use_sam=False)(**inputs)) == {"coarse"}


def test_bad_inputs_raise_clear_errors():
    model, batch = tiny_model(), tiny_batch()
    inputs = model_inputs(batch)
    with pytest.raises(ValueError, match="image_index"):
        model(**{**inputs, "image_index": torch.tensor([0, 0, 0, 1, 2])})
    with pytest.raises(ValueError, match="sam_embeddings"):
        model(**{**inputs, "sam_images": None})
    with pytest.raises(ValueError, match="prompts"):
        model(**inputs, prompts=("box",))
    with pytest.raises(ValueError, match=r"^tokens must be \(N, L\) token ids, got shape \(77,\)"):
        prepare_text(batch["tokens"][0])


# ---- configuration ----


@pytest.mark.parametrize("config", [PromptRISConfig.paper(), PromptRISConfig.tiny()])
def test_config_round_trips_through_json(config):
    assert PromptRISConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="cmp"):
        PromptRISConfig(cmp="both_ways")
    with pytest.raises(ValueError, match="prompts"):
        PromptRISConfig(prompts=("mask", "box"))
    with pytest.raises(ValueError, match="unknown keys.*'n_prompt'"):
        PromptRISConfig.from_dict({**PromptRISConfig.tiny().to_dict(), "n_prompt": 3})
    with pytest.raises(ValueError, match="PromptRISConfig.sam: unknown keys"):
        PromptRISConfig.from_dict({"sam": {"depth": 3}})


def test_cross_modal_prompting_needs_equal_depths():
    with pytest.raises(ValueError, match="equal depths"):
        CrossModalPrompting(dataclasses.replace(CLIPConfig.tiny(), text_layers=3), 4, "both")


# ---- §3.2 Cross-Modal Prompting ----


def test_cmp_modes_remove_modules():
    """Table 4: each ablation builds only the prompt generators it uses."""
    built = {mode: (tiny_model(cmp=mode).cmp.v2l is not None, tiny_model(cmp=mode).cmp.l2v is not None)
             for mode in ("both", "v2l", "l2v", "none")}
    assert built == {"both": (True, True), "v2l": (True, False), "l2v": (False, True), "none": (False, False)}
    assert sum(p.numel() for p in tiny_model(cmp="none").cmp.parameters()) == 0


def test_cmp_none_features_equal_plain_clip():
    """With no prompts, the layer-by-layer encoding is CLIP's own encode_image / encode_text (77 tokens)."""
    model = tiny_model(cmp="none").eval()
    images, tokens = torch.randn(3, 3, 224, 224), make_tokens([2, 9, 4])
    cut, valid, eot = prepare_text(tokens)
    with torch.no_grad():
        x_v, x_t = model.cmp(model.clip, images, torch.arange(3), cut, valid)
        image = model.clip.visual.ln_post(x_v[:, 0]) @ model.clip.visual.proj
        text = model.clip.ln_final(x_t[torch.arange(3), eot]) @ model.clip.text_projection
        torch.testing.assert_close(image, model.clip.encode_image(images))
        torch.testing.assert_close(text, model.clip.encode_text(tokens))


def test_cutting_tokens_after_the_longest_sentence_is_exact():
    """Causal mask + padding masks: features of real tokens do not depend on the padding length."""
    model = tiny_model(cmp="both").eval()
    images, tokens = torch.randn(3, 3, 224, 224), make_tokens([2, 9, 4])
    cut, valid, eot = prepare_text(tokens)
    assert cut.shape == (3, 16)  # the longest sentence ends at 11, rounded up to a multiple of 8
    with torch.no_grad():
        v_cut, t_cut = model.cmp(model.clip, images, torch.arange(3), cut, valid)
        v_full, t_full = model.cmp(model.clip, images, torch.arange(3), tokens, torch.arange(77) <= eot[:, None])
    torch.testing.assert_close(v_cut, v_full)
    torch.testing.assert_close(t_cut[valid], t_full[:, :16][valid])


def test_cmp_prompts_change_clip_features():
    """Both directions act: V2L changes the text features, L2V the image features."""
    batch = tiny_batch()
    cut, valid, _ = prepare_text(batch["tokens"][:2])
    images, image_index = batch["clip_images"][:1], torch.zeros(2, dtype=torch.long)  # one image, 2 sentences
    baseline = tiny_model(cmp="none")
    with torch.no_grad():
        base_v, base_t = baseline.cmp(baseline.clip, images, image_index, cut, valid)
        for mode, text_changes, image_changes in (("v2l", True, False), ("l2v", False, True), ("both", True, True)):
            model = tiny_model(cmp=mode)  # same seed: same CLIP weights as the baseline
            assert torch.equal(model.clip.visual.proj, baseline.clip.visual.proj)
            v, t = model.cmp(model.clip, images, image_index, cut, valid)
            assert (not torch.allclose(t, base_t)) == text_changes, mode
            assert (not torch.allclose(v, base_v)) == image_changes, mode


def test_prompt_generator_gradcheck():
    """CrossAttn(T, F) of Eq. (5)/(6) in float64, with padded keys masked, w.r.t. features and queries."""
    torch.manual_seed(0)
    gen = PromptGenerator(n=3, width=8, out_width=6, heads=2).double()
    features = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    queries = gen.queries.detach().clone().requires_grad_(True)
    key_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    run = lambda f, q: torch.func.functional_call(gen, {"queries": q}, (f, key_mask))
    assert gradcheck(run, (features, queries))


def test_prompt_generator_ignores_masked_keys():
    torch.manual_seed(0)
    gen = PromptGenerator(n=3, width=8, out_width=6, heads=2)
    features = torch.randn(1, 5, 8)
    key_mask = torch.tensor([[True, True, True, False, False]])
    changed = features.clone()
    changed[:, 3:] = 100.0
    torch.testing.assert_close(gen(features, key_mask), gen(changed, key_mask))


# ---- §3.1 point prompt (Eq. 3) ----


def distinct_logits(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """(rows, k) logits whose values are 0.1 apart: no argmax below hinges on a float tie."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(k, generator=g) for _ in range(rows)]).float() / 10


def test_gumbel_forward_is_exact_one_hot():
    torch.manual_seed(0)
    logits = distinct_logits(6, 50)
    m = straight_through_gumbel(logits, tau=0.7, keys=torch.arange(6))
    assert torch.equal(m, F.one_hot(m.argmax(1), 50).float())
    m = straight_through_gumbel(logits)  # inference: argmax, no noise
    assert torch.equal(m, F.one_hot(logits.argmax(1), 50).float())


def test_keyed_gumbel_noise_depends_on_the_key_only():
    """A sentence's noise is a function of its key: the same in any batch, at any position."""
    torch.manual_seed(0)
    logits = torch.zeros(3, 1000)  # flat logits: the choice is the noise's argmax
    keys = torch.tensor([7, 8, 9])
    chosen = straight_through_gumbel(logits, keys=keys).argmax(1)
    alone = straight_through_gumbel(logits[:1], keys=keys[2:]).argmax(1)
    assert alone.item() == chosen[2].item() and len(set(chosen.tolist())) == 3


def test_keyed_uniforms_are_never_0_or_1_so_gumbel_noise_stays_finite():
    extremes = keyed_random.unit_interval(torch.tensor([0, -1, 2**62, -2**63]))  # all-zero and all-one bits
    assert (extremes > 0).all() and (extremes < 1).all()
    noise = -(-extremes.log()).log()
    assert noise.isfinite().all()


def test_keyed_uniform_is_uniform_and_keyed():
    u = keyed_random.keyed_uniform(torch.arange(200), 500, stream=1)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    pairs = keyed_random.keyed_uniform(torch.arange(20000), 2, stream=1)  # neighbouring draws and keys independent
    assert abs(torch.corrcoef(pairs.T)[0, 1]) < 0.03
    assert abs(torch.corrcoef(torch.stack([pairs[:-1, 0], pairs[1:, 0]]))[0, 1]) < 0.03
    assert torch.equal(keyed_random.keyed_uniform(torch.arange(3, 5), 500, stream=1), u[3:5])
    assert not torch.equal(keyed_random.keyed_uniform(torch.arange(200), 500, stream=2), u)


def test_gumbel_choice_frequencies_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, -1)
    chosen = straight_through_gumbel(logits, keys=torch.arange(20000)).argmax(1)
    torch.testing.assert_close(torch.bincount(chosen, minlength=3) / 20000., torch.softmax(logits[0], 0),
                               atol=0.015, rtol=0)


def test_gumbel_defaults_no_noise_without_keys_and_temperature_one():
    """straight_through_gumbel(logits, keys=...): noise (equal logits give many different cells); without
    keys none (inference); tau = 1 (the backward is the Jacobian of softmax(logits))."""
    assert len(straight_through_gumbel(torch.zeros(200, 50), keys=torch.arange(200)).argmax(1).unique()) > 30
    assert straight_through_gumbel(torch.zeros(200, 50)).argmax(1).eq(0).all()
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 7, dtype=torch.float64)
    (straight_through_gumbel(logits) * v).sum().backward()
    p = torch.softmax(logits.detach(), dim=1)
    torch.testing.assert_close(logits.grad, p * (v - (p * v).sum(1, keepdim=True)))


def test_gumbel_backward_is_softmax_jacobian():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    v, tau = torch.randn(3, 7, dtype=torch.float64), 0.5
    (straight_through_gumbel(logits, tau) * v).sum().backward()
    p = torch.softmax(logits.detach() / tau, dim=1)
    jacobian = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / tau  # d softmax(x / tau) / dx
    torch.testing.assert_close(logits.grad, (jacobian.transpose(1, 2) @ v[:, :, None])[:, :, 0])


def test_point_table_equals_sam_prompt_encoder():
    """E (+ the foreground label embedding) equals SAM's encoding of a point at each cell centre, both
    ours and segment_anything's."""
    from oracles import build_official_sam

    model = tiny_model()
    pe = model.sam.prompt_encoder
    (H4, W4), S = pe.mask_input_size, model.config.sam.image_size
    index = torch.tensor([0, 5, 3 * W4 + 7, H4 * W4 - 1])
    r, c = index // W4, index % W4
    coords = torch.stack([(c + 0.5) * S / W4 - 0.5, (r + 0.5) * S / H4 - 0.5], dim=-1)[None]  # (1, 4, 2) (x, y)
    labels = torch.ones(1, 4)
    table = model.point_pe_table[index] + pe.point_embeddings[1].weight
    official = build_official_sam(model.config.sam)
    official.load_state_dict(model.sam.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(table, pe.embed_points(coords, labels, pad=False)[0])
        torch.testing.assert_close(table, official.prompt_encoder._embed_points(coords, labels, pad=False)[0])


def test_point_prompt_selects_the_table_row_of_the_argmax_at_inference():
    model = tiny_model().eval()
    coarse_up = distinct_logits(3, 64 * 64).view(3, 1, 64, 64)
    e_p, point = model.point_prompt(coarse_up)
    assert torch.equal(point, coarse_up.flatten(1).argmax(1))
    expected = model.point_pe_table[point] + model.sam.prompt_encoder.point_embeddings[1].weight
    torch.testing.assert_close(e_p[:, 0], expected)


@pytest.mark.parametrize("through", ["model", "model.sam", "model.sam.prompt_encoder"])
def test_point_table_and_dense_pe_follow_sams_weights_however_they_are_loaded(through):
    source, target = tiny_model(seed=0), tiny_model(seed=1)
    assert not torch.allclose(source.point_pe_table, target.point_pe_table)
    assert not any("grid_table" in k for k in source.state_dict())  # derived, never saved
    module = {"model": lambda m: m, "model.sam": lambda m: m.sam,
              "model.sam.prompt_encoder": lambda m: m.sam.prompt_encoder}[through]
    module(target).load_state_dict(module(source).state_dict())
    torch.testing.assert_close(target.point_pe_table, source.point_pe_table, rtol=0, atol=0)
    pe = target.sam.prompt_encoder
    fresh = pe.pe_layer.grid_table(pe.mask_input_size)  # computed now from the loaded Gaussian matrix
    torch.testing.assert_close(target.point_pe_table, fresh, rtol=0, atol=0)
    torch.testing.assert_close(pe.get_dense_pe(), source.sam.prompt_encoder.get_dense_pe(), rtol=0, atol=0)


# ---- §3.1 prompts for SAM and SAM decoding (Eq. 4) ----


def random_prompt_inputs(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_valid = torch.arange(6) <= torch.tensor([5, 2, 3, 4])[:, None]
    return dict(coarse=torch.randn(n, 14, 14, generator=g), f_t=torch.randn(n, 6, 64, generator=g),
                text_valid=text_valid, image=torch.randn(2, 32, 16, 16, generator=g),
                image_index=torch.tensor([0, 0, 1, 1])[:n])


@pytest.mark.parametrize("subset", [s for k in range(4) for s in itertools.combinations(PROMPT_TYPES, k)])
def test_prompt_subsets_switch_sam_prompts(subset):
    """Table 5: a switched-off point / text prompt is masked out of the sparse tokens, a switched-off mask
    prompt is replaced by SAM's no-mask embedding."""
    model = tiny_model().eval()
    inputs = random_prompt_inputs(model)
    keep = model.prompt_keep(4, subset, "cpu")
    with torch.no_grad():
        sparse, sparse_mask, dense, _ = model.sam_prompts(**inputs, keep=keep)
        _, _, mask_dense, _ = model.sam_prompts(**inputs, keep=torch.ones(4, 3, dtype=torch.bool))
    assert sparse.shape == (4, 8, 32)  # [P_point; not-a-point; 6 text tokens]
    assert torch.equal(sparse_mask[:, :2], torch.full((4, 2), "point" in subset))  # the padding goes with the point
    assert torch.equal(sparse_mask[:, 2:], inputs["text_valid"] & ("text" in subset))
    no_mask = model.sam.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand_as(dense)
    assert torch.equal(dense, mask_dense if "mask" in subset else no_mask)


def test_point_prompt_is_followed_by_sams_not_a_point_token():
    """As segment_anything pads points given without a box: the token after P_point is exactly
    not_a_point_embed, and it is the padding of SAM's own prompt encoder for the same point."""
    model = tiny_model().eval()
    inputs = random_prompt_inputs(model)
    pe = model.sam.prompt_encoder
    with torch.no_grad():
        sparse, _, _, point = model.sam_prompts(**inputs, keep=torch.ones(4, 3, dtype=torch.bool))
        grid_h, grid_w = pe.mask_input_size
        frame = model.config.sam.image_size
        r, c = point // grid_w, point % grid_w  # the chosen cell's centre, in input-frame pixels (minus 0.5)
        coords = torch.stack([(c + 0.5) * frame / grid_w - 0.5, (r + 0.5) * frame / grid_h - 0.5], dim=-1)[:, None]
        official, _ = pe(points=(coords, torch.ones(4, 1)))  # (N, 1 + pad, C)
    assert torch.equal(sparse[:, 1], pe.not_a_point_embed.weight.expand(4, -1))
    torch.testing.assert_close(sparse[:, :2], official, rtol=1e-5, atol=1e-5)


def test_prompt_subsets_change_the_final_mask():
    model, batch = tiny_model().eval(), tiny_batch()
    with torch.no_grad():
        masks = {s: model(**model_inputs(batch), prompts=s)["mask"] for s in [(), ("mask",), ("text",), PROMPT_TYPES]}
    for a, b in itertools.combinations(masks.values(), 2):
        assert not torch.allclose(a, b)


def test_prompt_dropout_keeps_at_least_one_enabled_prompt():
    model = tiny_model(prompt_dropout=0.5).train()
    keys = torch.arange(4000)
    keep = model.prompt_keep(4000, PROMPT_TYPES, "cpu", keys)
    assert keep.any(1).all()
    # each prompt survives with prob 1 - p, and a row that lost all three (prob p^3) gets one back
    assert abs(keep.float().mean() - (0.5 + 0.5 ** 3 / 3)) < 0.02
    revived = keep[keep.sum(1) == 1].float().mean(0)  # rows with one prompt left: each type equally often
    assert (abs(revived - 1 / 3) < 0.05).all(), revived
    keep = model.prompt_keep(4000, ("mask", "text"), "cpu", keys)
    assert keep.any(1).all() and not keep[:, 1].any()
    for subset in (("mask", "text"), ("mask", "point"), ("text",), ()):  # Table 5 rows trained with a subset
        keep = model.prompt_keep(4000, subset, "cpu", keys)
        enabled = torch.tensor([t in subset for t in PROMPT_TYPES])
        assert keep.shape == (4000, 3) and not (keep & ~enabled).any(), subset  # only enabled types
        assert bool(keep.any(1).all()) == bool(subset), subset  # one at least, whenever one is enabled
        assert keep[:, enabled].all() or len(subset) != 1  # a single type always comes back
    assert model.prompt_keep(5, PROMPT_TYPES, "cpu").all()  # no keys (inference): no dropout


def test_training_draws_noise_and_dropout_and_inference_none(monkeypatch):
    """Training draws per-sentence keys (given or fresh) for Gumbel noise and dropout; eval draws nothing."""
    model, batch = tiny_model(prompt_dropout=0.5), tiny_batch()
    seen = []
    real_keep = model.prompt_keep
    monkeypatch.setattr(model, "prompt_keep", lambda *a: seen.append(a[3]) or real_keep(*a))
    with torch.no_grad():
        argmax = model.eval()(**model_inputs(batch))["point"]
        given = torch.arange(len(batch["tokens"])) * 3
        a = model.train()(**model_inputs(batch), sample_keys=given)
        b = model(**model_inputs(batch), sample_keys=given)
        torch.manual_seed(0)
        model(**model_inputs(batch))
        other = model(**model_inputs(batch), sample_keys=given + 1)
    assert seen[0] is None and seen[1] is given and seen[3] is not None and seen[3].shape == given.shape
    torch.testing.assert_close(a["mask"], b["mask"])  # the same keys: the same draws
    assert torch.equal(a["point"], b["point"])
    # Eq. (3)'s Gumbel noise, drawn from the keys: the point leaves the argmax (a random model's S_C is nearly
    # flat, so the noise decides) and other keys pick other cells
    assert not torch.equal(a["point"], argmax) and not torch.equal(a["point"], other["point"])


def test_masked_sparse_tokens_equal_removed_tokens():
    """sam.py's sparse_prompt_mask: decoding with masked tokens equals decoding without them (also all masked)."""
    torch.manual_seed(0)
    sam = SAM(SAMConfig.tiny()).eval()
    image, dense, sparse = torch.randn(3, 32, 16, 16), torch.randn(3, 32, 16, 16), torch.randn(3, 5, 32)
    mask = torch.tensor([[True, True, False, False, False], [False, True, True, False, True], [False] * 5])
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        masked, iou = sam.mask_decoder(image, pe, sparse, dense, False, sparse_prompt_mask=mask)
        for n in range(3):
            removed, iou_n = sam.mask_decoder(image[n:n + 1], pe, sparse[n:n + 1, mask[n]], dense[n:n + 1], False)
            torch.testing.assert_close(masked[n:n + 1], removed, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[n:n + 1], iou_n, atol=1e-5, rtol=1e-5)


def test_image_level_sam_embeddings_equal_per_sentence_embeddings():
    """The SAM encoder runs once per image; repeating each image per sentence gives the same output."""
    model, batch = tiny_model().eval(), tiny_batch()
    pin_point_prompt(model)  # the two runs round differently: the point must not hinge on a near-tie
    index = batch["image_index"]
    with torch.no_grad():
        shared = model(batch["clip_images"], batch["tokens"], index, sam_images=batch["sam_images"])
        repeated = model(batch["clip_images"][index], batch["tokens"], torch.arange(5),
                         sam_embeddings=model.encode_sam_image(batch["sam_images"][index]))
    for key in ("coarse", "mask", "point"):
        torch.testing.assert_close(shared[key], repeated[key], atol=1e-5, rtol=1e-5)


# ---- what trains ----


def test_backbones_are_frozen_and_stay_in_eval_mode():
    model, batch = tiny_model(), tiny_batch()
    model.train()
    assert not model.clip.training and not model.sam.training and model.decoder.training
    assert not any(p.requires_grad for p in [*model.clip.parameters(), *model.sam.parameters()])
    assert not model.encode_sam_image(batch["sam_images"]).requires_grad  # no graph through frozen SAM
    added = sum(p.numel() for m in (model.cmp, model.decoder, model.text_prompter) for p in m.parameters())
    assert model.count_parameters() == added == sum(p.numel() for p in model.trainable_parameters())
    model.freeze_backbones(sam=False)
    assert model.train().sam.training and model.encode_sam_image(batch["sam_images"]).requires_grad
    assert model.count_parameters() == added + sum(p.numel() for p in model.sam.parameters())


def test_loss_reaches_every_trainable_parameter_and_no_frozen_one():
    model, batch = tiny_model(prompt_dropout=0.0).train(), tiny_batch()
    out = model(**model_inputs(batch))
    total_loss(out, batch["masks"], batch["instance_ids"], batch["image_index"])["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gradient_reaches_sam_label_embedding_when_sam_trains():
    model, batch = tiny_model(prompt_dropout=0.0), tiny_batch()
    model.freeze_backbones(sam=False)
    model.train()(**model_inputs(batch))["mask"].sum().backward()
    assert model.sam.prompt_encoder.point_embeddings[1].weight.grad.abs().sum() > 0


# ---- §3.3 losses (Eq. 7-9) ----


def test_dice_of_identical_masks_is_one():
    torch.manual_seed(0)
    soft = torch.rand(3, 8, 8)
    torch.testing.assert_close(dice_coefficient(soft, soft), torch.ones(3))
    torch.testing.assert_close(dice_coefficient(torch.zeros(1, 4), torch.zeros(1, 4)), torch.ones(1))


def test_dice_loss_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(3, 5, 5) > 0.5).double()
    assert gradcheck(lambda x: 1 - dice_coefficient(x.sigmoid(), target), (logits,))
    assert gradcheck(lambda x: seg_loss(x, target), (logits,))


def test_icl_loss_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 6, dtype=torch.float64)
    logits = (logits.sign() * (logits.abs() + 0.2)).requires_grad_(True)  # away from the IoU threshold
    target = (torch.rand(5, 6, 6) > 0.5).double()
    ids, index = torch.tensor([1, 1, 2, 3, 3]), torch.tensor([0, 0, 0, 1, 1])
    assert gradcheck(lambda x: icl_loss(x, target, ids, index), (logits,))


def two_regions():
    a, b = torch.zeros(8, 8), torch.zeros(8, 8)
    a[:, :4], b[:, 4:] = 1, 1
    return a, b


def test_icl_lower_when_same_instance_masks_agree_and_other_instances_are_disjoint():
    a, b = two_regions()
    ids, index = torch.tensor([1, 1, 2, 2]), torch.zeros(4, dtype=torch.long)
    target = torch.stack([a, a, b, b])
    logit = lambda m: 8 * (2 * m - 1)
    good = icl_loss(logit(target), target, ids, index)
    overlapping = torch.stack([a, a, b, torch.ones(8, 8)])  # sentence 4 also covers instance 1
    disagreeing = torch.stack([a, a * (torch.arange(8) < 6)[:, None], b, b])  # sentence 2 misses a part
    assert good < 0.01
    assert icl_loss(logit(overlapping), target, ids, index) > good + 0.1
    assert icl_loss(logit(disagreeing), target, ids, index) > good + 0.01


def test_icl_averages_images_and_ignores_pairs_across_images():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5, 5), (torch.rand(6, 5, 5) > 0.5).float()
    ids, index = torch.tensor([1, 2, 2, 3, 4, 4]), torch.tensor([0, 0, 0, 1, 1, 1])
    per_image = [icl_loss(logits[s], target[s], ids[s], index[s] * 0) for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(icl_loss(logits, target, ids, index), sum(per_image) / 2)


def test_total_loss_terms_per_stage_and_icl_switch():
    model, batch = tiny_model(), tiny_batch()
    with torch.no_grad():
        stage2 = model(**model_inputs(batch))
    stage1 = {"coarse": stage2["coarse"]}
    args = (batch["masks"], batch["instance_ids"], batch["image_index"])
    assert set(total_loss(stage1, *args)) == {"clip_seg", "icl_clip", "loss"}
    assert set(total_loss(stage1, *args, LossConfig(icl=False))) == {"clip_seg", "loss"}
    terms = total_loss(stage2, *args)
    assert set(terms) == {"clip_seg", "icl_clip", "sam_seg", "icl_sam", "loss"}
    torch.testing.assert_close(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
    assert all(torch.isfinite(v) for v in terms.values())


def test_losses_are_float32_under_bf16_autocast():
    """ICL's O_ii is exactly 1 only in float32: total_loss is immune to the caller's autocast."""
    torch.manual_seed(0)
    logits, target = torch.randn(4, 32, 32) * 4, (torch.rand(4, 32, 32) > 0.5).float()
    outputs = {"coarse": logits[:, :8, :8], "mask": logits}
    ids, index = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0, 1])
    plain = total_loss(outputs, target, ids, index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = total_loss(outputs, target, ids, index)
    assert all(cast[k].dtype == torch.float32 and torch.equal(cast[k], plain[k]) for k in plain)


@pytest.mark.parametrize("mode", CMP_MODES)
def test_shared_images_give_the_same_features_as_one_copy_per_sentence(mode):
    """Whether CLIP's vision tower runs per image ("v2l", "none") or per sentence, features are the same."""
    model, batch = tiny_model(cmp=mode).eval(), tiny_batch()
    cut, valid, _ = prepare_text(batch["tokens"])
    index = batch["image_index"]
    with torch.no_grad():
        shared = model.cmp(model.clip, batch["clip_images"], index, cut, valid)
        copied = model.cmp(model.clip, batch["clip_images"][index], torch.arange(len(index)), cut, valid)
    for a, b in zip(shared, copied):
        torch.testing.assert_close(a, b)
