"""The paper's equations and the README's claims, one test each: break the line a claim describes and its
test goes red. Where a formula is claimed the test compares with a value computed by hand on a toy input;
where behaviour is claimed it counts or compares what the model actually receives and does.

Claims about train.py and eval.py runs live beside their other tests (test_train.py, test_eval.py); the
README's "Tests" section lists where each claim is guarded.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prompt_ris
from helpers import pin_point_prompt
from oracles import build_official_sam
from prompt_ris import (CoarseMaskDecoder, PromptRISConfig, dice_coefficient, icl_loss, prepare_text,
                        seg_loss, straight_through_gumbel, total_loss)
from test_prompt_ris import make_tokens, model_inputs, tiny_batch, tiny_model

BIG = 30.0  # a logit whose sigmoid is 1 (or 0) in float32: a binary mask


def binary_logits(*rows):
    """Masks of 0/1 pixels -> logits whose sigmoid is that mask: (N, 1, W)."""
    return BIG * (2 * torch.tensor(rows, dtype=torch.float32)[:, None] - 1)


# ---- Eq. (1), (2): the tiny cross-modal decoder and the coarse mask ----


class PassThrough(nn.Module):
    """Stands in for one of Eq. (1)'s cross-attention layers: returns its queries unchanged."""

    def forward(self, x, context, context_mask=None):
        return x


def test_eq2_coarse_logits_are_the_eos_inner_product_scaled_by_one_over_sqrt_d_plus_a_bias():
    """S'_C = F'_IC . t_g / sqrt(D) + b, t_g read at the [EOS] position. With Eq. (1)'s layers passed through,
    F' = LayerNorm(F); the toy rows below have mean 0 and variance 1, so LayerNorm keeps them."""
    decoder = CoarseMaskDecoder(dim=4, heads=2)
    assert decoder.bias.numel() == 1 and decoder.bias.requires_grad  # one learnable bias
    decoder.image_from_text, decoder.text_from_image = PassThrough(), PassThrough()
    with torch.no_grad():
        decoder.bias.fill_(0.25)
    f_ic = torch.tensor([[[1.0, -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1]]])  # (1, N_C = 3, D = 4)
    f_t = torch.tensor([[[3.0, 0, 0, 0], [1, -1, 1, -1], [0, 5, 5, 0]]])  # [EOS] at position 1
    valid, eot = torch.tensor([[True, True, False]]), torch.tensor([1])
    logits = decoder(f_ic, f_t, valid, eot)
    ln = 1 / (1 + 1e-5)  # LayerNorm's eps: x / sqrt(var + eps) twice in the product
    expected = torch.tensor([[4 * ln / 2 + 0.25, -4 * ln / 2 + 0.25, 0 + 0.25]])  # dot / sqrt(4) + bias
    torch.testing.assert_close(logits, expected)


class Constant(nn.Module):
    """Stands in for an attention or an MLP: adds nothing of its input, returns `value`."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, *args, **kwargs):
        self.args = (x, *args)
        return torch.full_like(x, self.value)


def test_eq1_cross_attention_layers_are_pre_norm_residuals():
    """Each layer of Eq. (1) is x + CrossAttn(LN(x), LN(context)), then + MLP(LN(.)): with the attention
    returning 1 and the MLP 2, the output is x + 3."""
    layer = CoarseMaskDecoder(dim=4, heads=2).image_from_text
    layer.attn, layer.mlp = Constant(1.0), Constant(2.0)
    x = torch.randn(1, 3, 4)
    torch.testing.assert_close(layer(x, torch.randn(1, 2, 4)), x + 3)


def test_eq1_both_decoder_directions_read_the_unupdated_inputs_and_mask_padded_text():
    """F'_IC = CrossAttn(F_IC, F_T) with padded text keys masked; F'_T = CrossAttn(F_T, F_IC), not of F'_IC."""
    decoder = CoarseMaskDecoder(dim=8, heads=2)
    seen = {}
    for name in ("image_from_text", "text_from_image"):
        getattr(decoder, name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, args))
    f_ic, f_t = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    decoder(f_ic, f_t, valid, torch.tensor([1, 2]))
    queries, context, mask = seen["image_from_text"]
    assert queries is f_ic and context is f_t and torch.equal(mask, valid)
    queries, context = seen["text_from_image"][:2]
    assert queries is f_t and context is f_ic


# ---- §3.1 text prompts ----


def test_text_prompt_blocks_are_pre_norm_residuals_with_sams_positional_encoding_on_the_keys():
    """x + SelfAttn(LN(x)) (padding masked), + CrossAttn(LN(x), F_IS + PE, F_IS), + MLP(LN(.)): with the three
    sub-layers returning 1, 2 and 4 the output is x + 7; the cross-attention's keys carry SAM's dense PE."""
    block = tiny_model().text_prompter.blocks[0]
    block.self_attn, block.cross_attn, block.mlp = Constant(1.0), Constant(2.0), Constant(4.0)
    x, valid = torch.randn(2, 3, 32), torch.tensor([[True, True, False], [True, True, True]])
    image, pe = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    torch.testing.assert_close(block(x, valid, image, pe, torch.tensor([0, 0])), x + 7)
    assert torch.equal(block.self_attn.args[3], valid)
    _, keys, values = block.cross_attn.args
    assert torch.equal(keys, image + pe) and torch.equal(values, image)


# ---- Eq. (3): the point prompt ----


def test_eq3_gumbel_max_picks_each_cell_with_its_softmax_probability():
    """argmax(S + g), g ~ Gumbel(0, 1), is a sample of softmax(S): the noise has the right law (any tau)."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, -1)
    picks = straight_through_gumbel(logits, tau=0.5, keys=torch.arange(len(logits))).argmax(1)
    frequencies = torch.bincount(picks, minlength=3) / len(picks)
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)  # 4 standard deviations


def test_eq3_point_is_sampled_in_training_and_the_argmax_at_inference():
    """Training samples M with Gumbel noise; inference takes the argmax. S_C: 0 everywhere, 1 at cell 5."""
    model = tiny_model()
    coarse_up = torch.zeros(500, 1, 64, 64)
    coarse_up[:, 0, 0, 5] = 1.0
    _, point = model.eval().point_prompt(coarse_up)
    assert point.eq(5).all()
    _, point = model.train().point_prompt(coarse_up, keys=torch.arange(500))  # forward() draws keys in training
    assert point.eq(5).float().mean() < 0.05 and len(point.unique()) > 400  # e / (e + 4095): cell 5 rarely


def test_eq3_straight_through_gradient_uses_the_configured_temperature():
    """Backward through e_p = M E is that of softmax(S_C / tau) E with the config's tau (here 0.5)."""
    tau = 0.5
    model = tiny_model(gumbel_tau=tau).eval()
    coarse_up = torch.randn(2, 1, 64, 64).requires_grad_(True)
    v = torch.randn(model.point_pe_table.shape[1])
    e_p, _ = model.point_prompt(coarse_up)
    (e_p[:, 0] @ v).sum().backward()
    p, g = torch.softmax(coarse_up.detach().flatten(1) / tau, dim=1), model.point_pe_table @ v  # (N, K), (K,)
    expected = p * (g - (p * g).sum(1, keepdim=True)) / tau  # softmax Jacobian^T g
    torch.testing.assert_close(coarse_up.grad.flatten(1), expected)


# ---- Eq. (4): SAM decoding of the Prompt-RIS prompts ----


def decoder_calls(model):
    """Every call of model's SAM mask decoder as (args, kwargs)."""
    calls = []
    model.sam.mask_decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                                     with_kwargs=True)
    return calls


@pytest.fixture
def decoded():
    """A tiny model in eval mode on two images and five sentences, with what its SAM decoder received and
    segment_anything's SAM holding the same weights."""
    model, batch = tiny_model().eval(), tiny_batch()
    pin_point_prompt(model)  # the official decoding below must not hinge on a near-tie of the argmax
    calls = decoder_calls(model)
    with torch.no_grad():
        sam_embeddings = model.encode_sam_image(batch["sam_images"])
        out = model(batch["clip_images"], batch["tokens"], batch["image_index"], sam_embeddings=sam_embeddings)
    official = build_official_sam(model.config.sam)
    official.load_state_dict(model.sam.state_dict())
    (args, kwargs), = calls
    return model, batch, sam_embeddings, out, official, args, kwargs


def test_eq4_final_mask_is_the_official_sam_decoding_of_the_prompts_upsampled_4x(decoded):
    """S = Up4(D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS)), single-mask output; a masked token is
    absent (segment_anything is given only the real ones)."""
    model, batch, sam_embeddings, out, official, (image, pe, sparse, dense), kwargs = decoded
    assert kwargs["multimask_output"] is False
    assert torch.equal(image, sam_embeddings[batch["image_index"]])  # F_IS of each sentence's image
    real = kwargs["sparse_prompt_mask"]
    for n in range(len(image)):
        with torch.no_grad():
            low_res, _ = official.mask_decoder(image[n:n + 1], pe, sparse[n:n + 1, real[n]], dense[n:n + 1], False)
        expected = F.interpolate(low_res, scale_factor=4, mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(out["mask"][n], expected, atol=1e-4, rtol=1e-4)


def test_sam_prompts_are_the_official_embeddings_of_the_coarse_mask_the_point_and_the_text(decoded):
    """P_mask = SAM's mask embedding of S_C (S'_C upsampled bilinearly to 4h x 4w), P_point = SAM's embedding
    of a foreground point at the chosen cell's centre, then P_text: real text tokens only."""
    model, batch, _, out, official, (_, _, sparse, dense), kwargs = decoded
    pe, S = official.prompt_encoder, model.config.sam.image_size
    (H4, W4) = pe.mask_input_size
    coarse_up = F.interpolate(out["coarse"][:, None], size=(H4, W4), mode="bilinear", align_corners=False)
    r, c = out["point"] // W4, out["point"] % W4
    coords = torch.stack([(c + 0.5) * S / W4 - 0.5, (r + 0.5) * S / H4 - 0.5], dim=-1)[:, None]  # (N, 1, 2)
    with torch.no_grad():
        _, p_mask = pe(points=None, boxes=None, masks=coarse_up)
        p_point = pe._embed_points(coords, torch.ones(len(coords), 1), pad=True)  # + SAM's "not a point" token
    torch.testing.assert_close(dense, p_mask)
    assert (dense[0] - dense[3]).abs().max() > 1e-3  # it carries the mask: sentences of two images differ
    torch.testing.assert_close(sparse[:, :2], p_point)
    _, text_valid, _ = prepare_text(batch["tokens"])
    assert torch.equal(kwargs["sparse_prompt_mask"], torch.cat([torch.ones(5, 2, dtype=torch.bool), text_valid], 1))


# ---- Eq. (5), (6): Cross-Modal Prompting ----


def record_cmp(model):
    """Inputs and outputs of every prompt generator and CLIP block during one forward."""
    seen = {"v2l": [], "l2v": [], "vision": [], "text": []}

    def keep(kind):
        return lambda module, args, out: seen[kind].append((args, out))

    for i in range(model.config.clip.vision_layers):
        model.cmp.v2l[i].register_forward_hook(keep("v2l"))
        model.cmp.l2v[i].register_forward_hook(keep("l2v"))
        model.clip.visual.transformer.resblocks[i].register_forward_hook(keep("vision"))
        model.clip.transformer.resblocks[i].register_forward_hook(keep("text"))
    return seen


def cmp_run(model):
    batch = tiny_batch()
    tokens, valid, _ = prepare_text(batch["tokens"])
    seen = record_cmp(model)
    with torch.no_grad():
        model.cmp(model.clip, batch["clip_images"], batch["image_index"], tokens, valid)
    return seen, batch, tokens, valid


def test_eq5_v2l_prompts_read_the_patch_tokens_and_enter_only_the_next_text_layer():
    """T_V2L^i = CrossAttn(T_V^i, F_IC^i) over the patch tokens (no CLS, no L2V prompts);
    [_; F_T^{i+1}] = E_T^{i+1}([T_V2L^i; F_T^i]): prepended at every layer, dropped after it."""
    model = tiny_model().eval()
    n = model.config.n_prompts
    seen, batch, tokens, _ = cmp_run(model)
    text_in = model.clip.embed_text(tokens)  # F_T^0
    for i, ((v2l_in, v2l_out), (vision_in, _), (text_args, text_out)) in enumerate(
            zip(seen["v2l"], seen["vision"], seen["text"])):
        assert torch.equal(v2l_in[0], vision_in[0][:, n + 1:]), i  # F_IC^i: past the L2V prompts and CLS
        assert torch.equal(text_args[0][:, :n], v2l_out), i  # T_V2L^i enters text layer i
        torch.testing.assert_close(text_args[0][:, n:], text_in)  # F_T^i without last layer's prompts
        text_in = text_out[:, n:]


def test_eq6_l2v_prompts_read_the_real_text_tokens_and_enter_only_the_next_vision_layer():
    """T_L2V^i = CrossAttn(T_L^i, F_T^i) over the text tokens up to [EOS] (padding masked);
    [_; c^{i+1}; F_IC^{i+1}] = E_I^{i+1}([T_L2V^i; c^i; F_IC^i]): prepended at every layer, dropped after it."""
    model = tiny_model().eval()
    n = model.config.n_prompts
    seen, batch, _, valid = cmp_run(model)
    vision_in = model.clip.visual.embed(batch["clip_images"])[batch["image_index"]]  # [c^0; F_IC^0] per sentence
    for i, ((l2v_in, l2v_out), (vision_args, vision_out), (text_args, _)) in enumerate(
            zip(seen["l2v"], seen["vision"], seen["text"])):
        assert torch.equal(l2v_in[0], text_args[0][:, n:]) and torch.equal(l2v_in[1], valid), i  # F_T^i, real keys
        assert torch.equal(vision_args[0][:, :n], l2v_out), i  # T_L2V^i enters vision layer i
        torch.testing.assert_close(vision_args[0][:, n:], vision_in)  # [c^i; F_IC^i] without last layer's prompts
        vision_in = vision_out[:, n:]


# ---- Eq. (7), (8): Instance Contrastive Learning ----


def test_icl_loss_equals_eq7_and_eq8_computed_by_hand_on_two_images():
    """Two images, two sentences each, 4-pixel masks (sigmoid of the logits) with known IoUs.

    Image 0, instances 1 and 2 (Y = 0): S_1 = [1, 1, 0, 0] (IoU 1 with [1, 1, 0, 0]), S_2 = [.75, .75, .75, 0]
    (thresholded [1, 1, 1, 0], IoU 2/3 with [0, 1, 1, 0]); O_12 = 2 (.75 + .75) / (2 + 3 * .75^2) (squared
    V-Net denominator, Eq. 7), pair loss -log(1 - O_12).
    Image 1, one instance (Y = 1): S_3 = [1, 1, 1, 0] (IoU 1), S_4 = [0, 1, 1, 1] (IoU 2/4 with [1, 1, 1, 0]);
    O_34 = 2 * 2 / (3 + 3), pair loss -log(O_34).
    Eq. (8): each image 1/b^2 sum_ij w_i * pair loss (diagonal pairs: O_ii = 1 - eps, ~1e-6), images averaged.
    """
    third = math.log(3)  # sigmoid(log 3) = 3/4
    logits = torch.stack([binary_logits([1, 1, 0, 0])[0], torch.tensor([[third, third, third, -BIG]]),
                          binary_logits([1, 1, 1, 0])[0], binary_logits([0, 1, 1, 1])[0]])  # (4, 1, 4)
    target = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])[:, None]
    ids, image_index = torch.tensor([1, 2, 3, 3]), torch.tensor([0, 0, 1, 1])
    o_12, o_34 = 2 * 1.5 / (2 + 3 * 0.75 ** 2), 2 * 2 / (3 + 3)
    image_0 = (1 + 2 / 3) * -math.log(1 - o_12) / 2 ** 2  # w_1 = 1 and w_2 = 2/3, both orders of the pair
    image_1 = (1 + 2 / 4) * -math.log(o_34) / 2 ** 2
    expected = (image_0 + image_1) / 2
    assert icl_loss(logits, target, ids, image_index).item() == pytest.approx(expected, abs=1e-5)


def test_icl_weights_threshold_the_mask_strictly_above_logit_zero_like_the_metrics():
    """w_i counts a pixel when its logit is > 0, as eval.py's masks do. Sentence 1: logits [0, .5, 30, 30]
    (thresholded [0, 1, 1, 1], IoU 1 with [0, 1, 1, 1]); sentence 2, another instance: [1, 1, 0, 0], IoU 1.
    O_12 = 2 (.5 + s) / (.25 + s^2 + 2 + 2), s = sigmoid(.5); L = (w_1 + w_2) (-log(1 - O_12)) / 2^2."""
    logits = torch.stack([torch.tensor([[0.0, 0.5, BIG, BIG]]), binary_logits([1, 1, 0, 0])[0]])
    target = torch.tensor([[[0.0, 1, 1, 1]], [[1.0, 1, 0, 0]]])
    s = 1 / (1 + math.exp(-0.5))
    o_12 = 2 * (0.5 + s) / (0.25 + s ** 2 + 2 + 2)
    expected = (1 + 1) * -math.log(1 - o_12) / 2 ** 2
    loss = icl_loss(logits, target, torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_icl_is_finite_for_disjoint_masks_of_one_instance():
    """O_12 = 0 for two exactly disjoint masks; Y_12 = 1 would take log 0: O is clamped at eps, so the pair
    costs w_1 (-log eps) / 2^2 (sentence 2 has IoU 0 with the instance, w_2 = 0)."""
    logits = 200 * (2 * torch.tensor([[[1.0, 1, 0, 0]], [[0.0, 0, 1, 1]]]) - 1)  # probabilities exactly 0 and 1
    target = torch.tensor([[[1.0, 1, 0, 0]], [[1.0, 1, 0, 0]]])
    loss = icl_loss(logits, target, torch.tensor([5, 5]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(-math.log(1e-6) / 4, abs=1e-5)


# ---- §3.3 segmentation losses and Eq. (9) ----


def test_dice_is_the_vnet_squared_form_with_smoothing_one():
    """(2 sum ab + 1) / (sum a^2 + sum b^2 + 1): a = [1, .5, 0, 0], b = [1, 1, 0, 0] -> 4 / 4.25."""
    a, b = torch.tensor([[1.0, 0.5, 0, 0]]), torch.tensor([[1.0, 1, 0, 0]])
    torch.testing.assert_close(dice_coefficient(a, b), torch.tensor([4 / 4.25]))


def test_seg_loss_is_bce_plus_one_minus_dice_averaged_over_sentences():
    """Logits 0 (probability 1/2) against targets [1, 0] and [0, 0]: BCE log 2 per pixel; Dice (2 * .5 + 1) /
    (.5 + 1 + 1) = .8 and (0 + 1) / (.5 + 0 + 1) = 2/3."""
    loss = seg_loss(torch.zeros(2, 1, 2), torch.tensor([[[1.0, 0]], [[0.0, 0]]]))
    assert loss.item() == pytest.approx(math.log(2) + ((1 - 0.8) + (1 - 2 / 3)) / 2, abs=1e-6)


def test_total_loss_is_eq9_clip_seg_plus_sam_seg_plus_icl_on_both_masks():
    """L = L_clip.seg + L_sam.seg + L_icl, L_icl on the coarse and the final mask; the coarse target is the
    mask averaged over each CLIP cell (here 2 x 2 pixels of a 4 x 4 mask)."""
    masks = (torch.rand(4, 4, 4) > 0.5).float()
    outputs = {"coarse": torch.randn(4, 2, 2), "mask": torch.randn(4, 4, 4)}
    ids, index = torch.tensor([1, 2, 3, 3]), torch.tensor([0, 0, 1, 1])
    coarse_target = masks.view(4, 2, 2, 2, 2).mean(dim=(2, 4))  # (N, cell row, pixel, cell column, pixel)
    expected = {"clip_seg": seg_loss(outputs["coarse"], coarse_target),
                "icl_clip": icl_loss(outputs["coarse"], coarse_target, ids, index),
                "sam_seg": seg_loss(outputs["mask"], masks), "icl_sam": icl_loss(outputs["mask"], masks, ids, index)}
    terms = total_loss(outputs, masks, ids, index)
    assert terms.keys() == {*expected, "loss"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)
    torch.testing.assert_close(terms["loss"], sum(expected.values()))


# ---- README "Design decisions": padding is exact ----


def test_a_sentence_gives_the_same_outputs_alone_and_beside_a_longer_one():
    """Padding is exact: a short sentence next to a long one is padded; its coarse mask, point and final mask
    are those it gets alone (padding masked in CMP, Eq. (1), the text prompter and SAM's sparse_prompt_mask)."""
    model, batch = tiny_model().eval(), tiny_batch()
    pin_point_prompt(model)  # the two runs round differently: the point must not hinge on a near-tie
    short, long = make_tokens([2]), make_tokens([20], seed=1)
    images = dict(clip_images=batch["clip_images"][:1], sam_embeddings=model.encode_sam_image(batch["sam_images"][:1]))
    with torch.no_grad():
        alone = model(tokens=short, image_index=torch.zeros(1, dtype=torch.long), **images)
        beside = model(tokens=torch.cat([short, long]), image_index=torch.zeros(2, dtype=torch.long), **images)
    assert torch.equal(alone["point"], beside["point"][:1])
    torch.testing.assert_close(beside["coarse"][:1], alone["coarse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beside["mask"][:1], alone["mask"], atol=1e-4, rtol=1e-4)


# ---- README "Running for days" / "Design decisions": what runs how often ----


def test_sam_image_encoder_runs_once_per_image_not_per_sentence():
    """F_IS is computed for the B images, not the N sentences, in training and at inference."""
    model, batch = tiny_model(), tiny_batch()
    model.freeze_backbones(sam=False)  # also when SAM trains: the graph runs through the B images
    encoded = []
    model.sam.image_encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    for mode in (True, False):
        model.train(mode)(**model_inputs(batch))
    assert encoded == [2, 2]  # 2 images, 5 sentences


def test_without_l2v_the_vision_tower_runs_once_per_image():
    """Image tokens depend on the sentence only through L2V prompts: in the "v2l" and "none" ablations
    (Table 4) every CLIP vision block sees the 2 images, with L2V the 5 sentences."""
    for mode, rows in (("v2l", 2), ("none", 2), ("both", 5)):
        model = tiny_model(cmp=mode).eval()
        seen = []
        for block in model.clip.visual.transformer.resblocks:
            block.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        with torch.no_grad():
            model(**model_inputs(tiny_batch()), use_sam=False)
        assert seen == [rows] * model.config.clip.vision_layers, mode


def test_grad_checkpoint_recomputes_every_clip_block_and_changes_no_gradient(monkeypatch):
    """README "Running for days", --grad-checkpoint: every CLIP block (vision and text) runs under activation
    checkpointing, only with the flag and only with gradients on, and the gradients stay the same."""
    calls, real = [], prompt_ris.checkpoint
    monkeypatch.setattr(prompt_ris, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    batch, grads = tiny_batch(), []
    for recompute in (False, True):
        model = tiny_model().eval()
        pin_point_prompt(model)
        model.cmp.grad_checkpoint = recompute
        out = model(**model_inputs(batch))
        total_loss(out, batch["masks"], batch["instance_ids"], batch["image_index"])["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == 4 * recompute, recompute  # tiny CLIP: 2 vision + 2 text blocks
        with torch.no_grad():
            model(**model_inputs(batch))
        assert len(calls) == 4 * recompute  # no recomputation without a backward pass
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ---- README "Design decisions": values the paper does not give ----


def test_unspecified_values_have_the_documented_defaults():
    """Prompt dropout 0.2 per prompt type, Gumbel temperature 1, 8 heads in the tiny decoder of Eq. (1); the
    paper's n = 16 prompts, CLIP at 480 and the two text-prompt blocks."""
    config = PromptRISConfig()
    assert (config.prompt_dropout, config.gumbel_tau, config.decoder_heads) == (0.2, 1.0, 8)
    assert (config.n_prompts, config.clip_image_size, config.text_prompt_layers) == (16, 480, 2)
    assert config == PromptRISConfig.paper()
    model = tiny_model(decoder_heads=4)
    assert model.decoder.image_from_text.attn.heads == model.decoder.text_from_image.attn.heads == 4
