"""load_weights.read_torchscript: OpenAI's TorchScript CLIP archive read without running any of its code.

torch.jit.load is the oracle here (what the archive means); load_weights itself never calls it.
"""
import dataclasses
import pickle
import re
import zipfile
from typing import Dict, List, Tuple

import pytest
import torch

from clip_vit import CLIP, CLIPConfig
from load_weights import WeightsError, main, read_original, read_safetensors, read_torchscript

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

TINY = dataclasses.replace(CLIPConfig.tiny(), image_size=32, context_length=8, vocab_size=100)


class OpenAILayout(CLIP):
    """OpenAI's ViT-B-16.pt at a tiny size: a traced CLIP, in float16, whose state dict also holds the
    sizes as int64 buffers (`input_resolution`, `context_length`, `vocab_size`)."""

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.register_buffer("input_resolution", torch.tensor(config.image_size))
        self.register_buffer("context_length", torch.tensor(config.context_length))
        self.register_buffer("vocab_size", torch.tensor(config.vocab_size))


class Inner(torch.nn.Module):
    """What a scripted module stores beside its weights: tensors that are not state, non-persistent
    buffers, a missing bias, typed containers, numbers."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4, bias=False)
        self.register_buffer("running", torch.arange(4.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.plain = torch.zeros(3)  # a tensor attribute, neither parameter nor buffer: not in the state dict
        self.count: int = 7
        self.table: Dict[str, torch.Tensor] = {"a": torch.ones(1)}
        self.sizes: List[int] = [1, 2]

    def forward(self, x):
        return self.lin(x) + self.running + self.plain.sum() + self.scratch.sum() + self.table["a"] + self.count


class Scripted(torch.nn.Module):
    """Tied weights, a view into another buffer's storage, a transposed (non-contiguous) parameter."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        self.seq[2].weight = self.seq[0].weight
        base = torch.randn(6, 4)
        self.register_buffer("base", base)
        self.register_buffer("window", base[2:5].t())
        self.transposed = torch.nn.Parameter(torch.randn(4, 4).t())

    def forward(self, x):
        return self.seq(self.inner(x)) @ self.transposed + self.window.sum() + self.base.sum()


class Restoring(torch.nn.Module):
    """A module whose TorchScript __setstate__ (in the archive's code/) runs when torch.jit.load reads it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print("archive code ran")
        self.weight = state[0] + 41
        self.training = state[1]


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    torch.manual_seed(0)
    pixels, tokens = torch.randn(1, 3, TINY.image_size, TINY.image_size), torch.randint(0, 100, (1, 8))
    traced = torch.jit.trace(OpenAILayout(TINY).eval(), (pixels, tokens), check_trace=False).half()
    path = tmp_path_factory.mktemp("openai") / "ViT-B-16.pt"
    traced.save(str(path))
    return path


@pytest.fixture(scope="module")
def scripted_archive(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scripted") / "scripted.pt"
    torch.jit.script(Scripted()).save(str(path))
    return path


@pytest.fixture(scope="module")
def linear_archive(tmp_path_factory):
    """One Linear(3, 5): data.pkl holds its weight's size (5, 3) once, and data/0 its 15 floats."""
    path = tmp_path_factory.mktemp("linear") / "linear.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 5))).save(str(path))
    return path


def oracle(path) -> dict:
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def rewrite(src, dst, records: dict):
    """A copy of the zip `src` with some records replaced (name -> bytes) or dropped (name -> None)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for name in old.namelist():
            data = records[name] if name in records else old.read(name)
            if data is not None:
                new.writestr(name, data)
    return dst


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten().view(torch.uint8)


# ---- the same tensors as torch.jit.load ----

@pytest.mark.parametrize("archive", ["openai_archive", "scripted_archive"])
def test_reads_the_state_dict_torch_jit_load_gives(archive, request):
    path = request.getfixturevalue(archive)
    expected, state = oracle(path), read_torchscript(path)
    assert list(state) == list(expected)  # same names, same order
    for key, value in expected.items():
        got = state[key]
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == \
               (value.dtype, value.shape, value.stride(), value.storage_offset()), key
        assert torch.equal(bits(got), bits(value)), key


def test_the_openai_layout_is_half_precision_with_its_size_buffers(openai_archive):
    state = read_torchscript(openai_archive)
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert {k: int(state[k]) for k in ("input_resolution", "context_length", "vocab_size")} == \
           {"input_resolution": 32, "context_length": 8, "vocab_size": 100}


def test_convert_writes_the_archives_tensors_without_torch_jit_load(openai_archive, tmp_path, monkeypatch):
    expected = oracle(openai_archive)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    dst = tmp_path / "ViT-B-16.safetensors"
    assert main(["convert", str(openai_archive), str(dst)]) == 0
    written = read_safetensors(dst)
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == v.dtype and torch.equal(written[k], v) for k, v in expected.items())


# ---- nothing from the archive runs ----

def test_code_of_a_setstate_is_not_run(tmp_path, capfd):
    path = tmp_path / "restoring.pt"
    torch.jit.script(torch.nn.Sequential(Restoring())).save(str(path))
    assert torch.equal(oracle(path)["0.weight"], torch.full((2,), 42.0))  # torch.jit.load runs it ...
    assert "archive code ran" in capfd.readouterr().out
    message = (f"{path}: class '__torch__.test_torchscript.Restoring' restores its attributes with its own "
               "__setstate__ code, which is not run (not plain weights)")
    with pytest.raises(WeightsError, match=f"^{re.escape(message)}$"):
        read_original(path)  # ... read_original does not
    assert "archive code ran" not in capfd.readouterr().out


def call_pickle(module: str, name: str, argument: str) -> bytes:
    """A pickle that calls module.name(argument) when loaded (GLOBAL, TUPLE1, REDUCE)."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(argument, protocol=2)[2:-1]
            + b"\x85R.")


@pytest.mark.parametrize("module, name, command", [
    ("os", "system", "touch {marker}"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
])
def test_a_call_in_data_pkl_is_refused_and_not_run(linear_archive, tmp_path, capsys, module, name, command):
    marker = tmp_path / "ran"
    payload = call_pickle(module, name, command.format(marker=str(marker)))
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    src = rewrite(linear_archive, tmp_path / "crafted.pt", {"linear/data.pkl": payload})
    assert main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 1
    assert capsys.readouterr().err == (f"error: {src}: refuses to load global '{module}.{name}' "
                                       "(not plain weights)\n")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# ---- damaged archives: one clear error ----

@pytest.mark.parametrize("damage, message", [
    ("missing", "no storage record 'linear/data/0'"),
    ("short", "storage record 'linear/data/0' holds 8 bytes, not 15 x torch.float32 (60 bytes)"),
    ("past the end", "a tensor of size (6, 3), stride (3, 1) at offset 0 reaches past its storage of 15 elements"),
])
def test_a_damaged_storage_is_named(linear_archive, tmp_path, damage, message):
    with zipfile.ZipFile(linear_archive) as archive:
        data_pkl = archive.read("linear/data.pkl")
    size = b"(K\x05K\x03t"  # MARK, 5, 3, TUPLE: the weight's size
    assert data_pkl.count(size) == 1
    records = {"missing": {"linear/data/0": None},
               "short": {"linear/data/0": bytes(8)},
               "past the end": {"linear/data.pkl": data_pkl.replace(size, b"(K\x06K\x03t")}}[damage]
    path = rewrite(linear_archive, tmp_path / "damaged.pt", records)
    with pytest.raises(WeightsError, match=f"^{re.escape(f'{path}: {message}')}$"):
        read_original(path)
