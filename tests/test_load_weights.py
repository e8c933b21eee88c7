"""load_weights.py: SAM loading in both namings, clear errors for bad files, and the command line."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import load_weights
from load_weights import WeightsError, infer_sam_config, load_sam, main, read_safetensors, sam_naming
from oracles import build_hf_sam, build_official_sam, randomize_
from sam import SAM, SAMConfig


TINY = SAMConfig.tiny()


def save_state(state: dict, path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sam_state():
    """A random tiny SAM state dict in segment_anything naming."""
    torch.manual_seed(0)
    return randomize_(SAM(TINY), seed=0).state_dict()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return randomize_(build_hf_sam(TINY), seed=1)


@pytest.fixture
def sam_file(sam_state, tmp_path):
    return save_state(sam_state, tmp_path / "sam.safetensors")


@pytest.fixture(scope="module")
def clip_state():
    clip_vit = pytest.importorskip("clip_vit")
    torch.manual_seed(0)
    return clip_vit.CLIP(clip_vit.CLIPConfig.tiny()).state_dict()


# ---- SAM: namings and config inference ----

def test_load_sam_round_trips_segment_anything_naming(sam_state, sam_file):
    model = load_sam(sam_file, config=TINY)
    assert sam_naming(sam_state) == "segment_anything"
    for key, value in model.state_dict().items():
        assert torch.equal(value, sam_state[key]), key


def test_infer_sam_config_recovers_every_size_but_the_decoder_heads(sam_state):
    """The decoder's head count is not in any shape: inference assumes SAM's 8."""
    assert infer_sam_config(sam_state) == SAMConfig(**{**vars(TINY), "decoder_heads": 8})


@pytest.mark.parametrize("cfg", [SAMConfig(), SAMConfig.vit_l(), SAMConfig.vit_h()], ids=["vit_b", "vit_l", "vit_h"])
def test_infer_sam_config_recognises_vit_b_l_h(cfg):
    with torch.device("meta"):  # shapes only, no memory
        state = SAM(cfg).state_dict()
    assert infer_sam_config(state) == cfg


def test_hf_naming_maps_onto_every_parameter(hf_model, sam_state):
    state = load_weights.sam_state_from_hf(hf_model.state_dict())
    assert sam_naming(hf_model.state_dict()) == "hf"
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in sam_state.items()}


@pytest.mark.parametrize("keep", ["shared_image_embedding", "prompt_encoder.shared_embedding", "both"])
def test_hf_gaussian_matrix_loads_from_either_key_or_both(hf_model, tmp_path, keep):
    gaussian = hf_model.shared_image_embedding.positional_embedding
    state = dict(hf_model.state_dict())
    if keep != "both":
        other = ({"shared_image_embedding", "prompt_encoder.shared_embedding"} - {keep}).pop()
        del state[f"{other}.positional_embedding"]
    model = load_sam(save_state(state, tmp_path / "hf.safetensors"), config=TINY)
    assert torch.equal(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, gaussian)


def test_hf_gaussian_matrices_that_differ_are_an_error(hf_model, tmp_path):
    state = dict(hf_model.state_dict())
    state["prompt_encoder.shared_embedding.positional_embedding"] = torch.randn(2, TINY.prompt_dim // 2)
    path = save_state(state, tmp_path / "hf.safetensors")
    with pytest.raises(WeightsError, match="shared_image_embedding.positional_embedding and "
                                           "prompt_encoder.shared_embedding.positional_embedding differ"):
        load_sam(path, config=TINY)


def test_hf_file_reproduces_segment_anything_layernorm_eps_not_transformers(hf_model, tmp_path):
    """transformers' two-way blocks use LayerNorm eps 1e-6, segment_anything (the truth) 1e-5: an HF file
    loaded here matches segment_anything run on the same weights, and visibly not transformers, once
    activations are small enough for eps to matter."""
    hf_model = copy.deepcopy(hf_model)  # its weights are shrunk below; the module fixture stays as it was
    ours = load_sam(save_state(hf_model.state_dict(), tmp_path / "hf.safetensors"), config=TINY).eval()
    official = build_official_sam(TINY)
    official.load_state_dict(ours.state_dict())
    twoway = [m for m in ours.mask_decoder.transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
    hf_twoway = [m for m in hf_model.mask_decoder.transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
    official_twoway = [m for m in official.mask_decoder.transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert [m.eps for m in twoway] == [m.eps for m in official_twoway] == [1e-5] * (4 * TINY.decoder_depth + 1)
    assert [m.eps for m in hf_twoway] == [1e-6] * (4 * TINY.decoder_depth) + [1e-5]

    with torch.no_grad():  # shrink the decoder's inputs and projections so LayerNorm inputs have variance ~1e-5
        for model in (ours, official, hf_model):
            for name, p in model.mask_decoder.named_parameters():
                if "proj" in name or "lin" in name or "token" in name:
                    p.mul_(0.01)
        embedding = 0.01 * torch.randn(1, TINY.prompt_dim, TINY.grid, TINY.grid)
        pe = ours.prompt_encoder.get_dense_pe()
        sparse, dense = ours.prompt_encoder()
        args = dict(image_embeddings=embedding, image_pe=0.01 * pe, sparse_prompt_embeddings=0.01 * sparse,
                    dense_prompt_embeddings=0.01 * dense, multimask_output=True)
        masks, _ = ours.mask_decoder(**args)
        official_masks, _ = official.mask_decoder(**args)
        hf_masks, _ = hf_model.mask_decoder(embedding, 0.01 * pe, 0.01 * sparse[:, None], 0.01 * dense, True)
    scale = official_masks.abs().max()
    assert (masks - official_masks).abs().max() / scale < 1e-4
    assert (masks - hf_masks[:, 0]).abs().max() / scale > 1e-2


# ---- bad files: clear errors naming the file and the keys ----

def sam_loader(path):
    return load_sam(path, config=TINY)


def clip_loader(path):
    return load_weights.load_clip(path)


LOADERS = {"sam": (sam_loader, "sam_state", "image_encoder.blocks.0.attn.proj.bias",
                   "mask_decoder.iou_token.weight"),
           "clip": (clip_loader, "clip_state", "visual.transformer.resblocks.0.ln_1.bias", "visual.ln_post.bias")}


@pytest.fixture(params=list(LOADERS))
def loader(request):
    """(load function, a valid state dict, a key to corrupt, a key to drop) for load_sam and load_clip."""
    load, state_fixture, corrupt_key, drop_key = LOADERS[request.param]
    return load, request.getfixturevalue(state_fixture), corrupt_key, drop_key


def test_wrong_shape_is_named(loader, tmp_path):
    load, state, corrupt_key, _ = loader
    path = save_state({**state, corrupt_key: torch.zeros(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=f"{path}.*wrong shape.*{corrupt_key}: file \\(3,\\)"):
        load(path)


def test_missing_key_is_named(loader, tmp_path):
    load, state, _, drop_key = loader
    path = save_state({k: v for k, v in state.items() if k != drop_key}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=f"{path}.*missing \\(1\\): {drop_key}"):
        load(path)


def test_extra_key_is_named(loader, tmp_path):
    load, state, _, _ = loader
    path = save_state({**state, "surprise.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=f"{path}.*unexpected \\(1\\): surprise.weight"):
        load(path)


def test_non_safetensors_file_is_an_error(loader, tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("this is not a safetensors file")
    with pytest.raises(WeightsError, match=f"{path}: not a readable safetensors file"):
        loader[0](str(path))


def test_truncated_file_is_an_error(loader, tmp_path):
    path = save_state(loader[1], tmp_path / "whole.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"{cut}: not a readable safetensors file"):
        loader[0](str(cut))


def test_missing_path_is_a_file_not_found_error(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        loader[0](str(tmp_path / "nowhere.safetensors"))


def test_a_clip_file_is_not_a_sam_checkpoint(clip_state, tmp_path):
    path = save_state(clip_state, tmp_path / "clip.safetensors")
    with pytest.raises(WeightsError, match="not a SAM checkpoint"):
        load_sam(path)


# ---- command line ----

def test_convert_pth_round_trip_clones_shared_and_non_contiguous_tensors(sam_state, tmp_path):
    state = dict(sam_state)
    state["tied"] = state["mask_decoder.iou_token.weight"]  # shares storage: safetensors alone would refuse
    state["transposed"] = torch.randn(3, 4).t()  # not contiguous
    src, dst = tmp_path / "sam.pth", tmp_path / "sam.safetensors"
    torch.save(state, src)
    assert main(["convert", str(src), str(dst)]) == 0
    written = read_safetensors(dst)
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam.pth", "sam.safetensors"]  # no temporary left


def test_convert_unwraps_a_training_checkpoint(sam_state, tmp_path):
    src, dst = tmp_path / "ckpt.pth", tmp_path / "out.safetensors"
    torch.save({"model": sam_state}, src)
    assert main(["convert", str(src), str(dst)]) == 0
    assert load_sam(dst, config=TINY) is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_convert_torchscript_round_trip(tmp_path):
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)))
    src, dst = tmp_path / "model.pt", tmp_path / "model.safetensors"
    module.save(str(src))
    assert main(["convert", str(src), str(dst)]) == 0
    written = read_safetensors(dst)
    assert written.keys() == module.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in module.state_dict().items())


def test_convert_of_a_bad_file_reports_it_and_writes_nothing(tmp_path, capsys):
    src, dst = tmp_path / "junk.pth", tmp_path / "out.safetensors"
    src.write_bytes(b"\x00not a checkpoint")
    assert main(["convert", str(src), str(dst)]) == 1
    assert f"{src}: not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]


def test_inspect_names_model_naming_and_size(sam_file, hf_model, tmp_path, capsys):
    assert main(["inspect", sam_file]) == 0
    out = capsys.readouterr().out
    assert "SAM" in out and "segment_anything naming" in out and "encoder_width=64" in out
    hf_file = save_state(hf_model.state_dict(), tmp_path / "hf.safetensors")
    assert main(["inspect", hf_file]) == 0
    assert "hf naming" in capsys.readouterr().out


def test_inspect_names_vit_b_and_clip(clip_state, tmp_path, capsys):
    with torch.device("meta"):
        shapes = SAM(SAMConfig()).state_dict()
    vit_b = save_state({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()},
                       tmp_path / "vit_b.safetensors")
    assert main(["inspect", vit_b]) == 0
    assert "SAM ViT-B, segment_anything naming" in capsys.readouterr().out
    clip_file = save_state(clip_state, tmp_path / "clip.safetensors")
    assert main(["inspect", clip_file]) == 0
    assert "CLIP" in capsys.readouterr().out


def test_inspect_of_a_missing_file_reports_it(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere.safetensors")]) == 1
    assert "nowhere.safetensors: no such weights file" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_an_integer_or_bool_tensor_for_a_float_parameter_is_named(loader, tmp_path, dtype):
    load, state, corrupt_key, _ = loader
    bad = torch.ones_like(state[corrupt_key], dtype=dtype)
    path = save_state({**state, corrupt_key: bad}, tmp_path / "q.safetensors")
    with pytest.raises(WeightsError, match=f"{path}.*not floating point \\(1\\): {corrupt_key}: file {dtype}"):
        load(path)
