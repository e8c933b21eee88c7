"""Downloads without the internet: a loopback HTTP server (127.0.0.1, started here) serves generated files.

fetch.download resumes a broken transfer with a Range request, checks SHA-256, falls through dead
mirrors; fetch.download_refer unpacks the refer zips into the layout load_refs reads, refuses zips that
would write outside DATA_ROOT, and skips what is complete.
"""
import hashlib
import io
import os
import re
import socket
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import data
import fetch
import load_weights
import synth
from clip_vit import CLIP, CLIPConfig
from fetch import DownloadError, download, download_from_mirrors


class _Handler(BaseHTTPRequestHandler):
    """GET with Range support (one 'bytes=N-' range), driven by the LoopbackServer that owns it."""

    def do_GET(self):
        owner = self.server.owner
        owner.requests.append((self.path, self.headers.get("Range")))
        body = owner.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and self.path not in owner.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = owner.cut_once.pop(self.path, None)  # send only `cut` bytes, then close (HTTP/1.0)
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])

    def log_message(self, *args):
        pass


class LoopbackServer:
    def __init__(self):
        self.files, self.cut_once, self.ignore_range, self.requests = {}, {}, set(), []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection these tests open goes to 127.0.0.1, whatever the code under test asks for."""
    connect = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return connect(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", guarded)


@pytest.fixture
def server():
    s = LoopbackServer()
    yield s
    s.close()


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def zip_bytes(entries: dict) -> bytes:
    """A zip of {arcname: bytes}; arcnames are stored exactly as given (also '../x' and '/x')."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(zipfile.ZipInfo(name), content)
    return buffer.getvalue()


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---- fetch.download ----


def test_a_transfer_cut_mid_file_resumes_with_a_range_request(server, tmp_path):
    body = payload(300_000)
    server.files["/w.bin"] = body
    server.cut_once["/w.bin"] = 100_000
    path = download(server.url("/w.bin"), tmp_path / "w.bin", sha256=hashlib.sha256(body).hexdigest())
    assert open(path, "rb").read() == body
    assert server.requests == [("/w.bin", None), ("/w.bin", "bytes=100000-")]
    assert files_under(tmp_path) == ["w.bin"]  # no .part left


@pytest.mark.parametrize("server_ignores_range", [False, True])
def test_a_part_file_from_an_earlier_run_is_continued_or_replaced(server, tmp_path, server_ignores_range):
    """A .part file asks for the rest (Range); a server that ignores Range sends the whole file, which then
    replaces the part (here not even the right bytes)."""
    body = payload(50_000, seed=1)
    server.files["/w.bin"] = body
    if server_ignores_range:
        server.ignore_range.add("/w.bin")
    (tmp_path / "w.bin.part").write_bytes(b"x" * 20_000 if server_ignores_range else body[:20_000])
    download(server.url("/w.bin"), tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == body
    assert server.requests == [("/w.bin", "bytes=20000-")]


def test_a_complete_part_file_answered_416_is_accepted(server, tmp_path):
    body = payload(10_000, seed=3)
    server.files["/w.bin"] = body
    (tmp_path / "w.bin.part").write_bytes(body)
    download(server.url("/w.bin"), tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == body and not (tmp_path / "w.bin.part").exists()


def test_a_wrong_checksum_leaves_no_file(server, tmp_path):
    server.files["/w.bin"] = payload(10_000)
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*deleted"):
        download(server.url("/w.bin"), tmp_path / "w.bin", sha256="0" * 64)
    assert files_under(tmp_path) == []


def test_a_404_mirror_falls_through_to_the_next(server, tmp_path):
    server.files["/good/w.bin"] = body = payload(5_000)
    path = download_from_mirrors([server.url("/gone/w.bin"), server.url("/good/w.bin")], tmp_path / "w.bin")
    assert open(path, "rb").read() == body
    assert [p for p, _ in server.requests] == ["/gone/w.bin", "/good/w.bin"]


def test_every_mirror_failing_names_each_url(server, tmp_path):
    server.files["/page.html"] = b"<html>not here</html>"  # served with 200, refused by `accept`
    with pytest.raises(DownloadError) as error:
        download_from_mirrors([server.url("/gone.zip"), server.url("/page.html")], tmp_path / "x.zip",
                              accept=zipfile.is_zipfile)
    assert "/gone.zip: HTTP 404" in str(error.value) and "/page.html: not the expected kind" in str(error.value)
    assert files_under(tmp_path) == []


# ---- python load_weights.py download ----


def test_download_clip_converts_and_prints_the_safetensors_path_last(server, tmp_path, capsys):
    torch.manual_seed(0)
    state = CLIP(CLIPConfig.tiny()).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    server.files["/x.pt"] = buffer.getvalue()
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    out = tmp_path / "weights"
    assert load_weights.main(["download", "clip", "--out", str(out), "--url", server.url("/x.pt"),
                              "--sha256", sha]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == str(out / "x.safetensors")
    written = load_weights.read_safetensors(last)
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())


def test_download_of_the_wrong_kind_of_checkpoint_is_an_error(server, tmp_path, capsys):
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    server.files["/x.pth"] = buffer.getvalue()
    assert load_weights.main(["download", "sam", "--out", str(tmp_path), "--url", server.url("/x.pth")]) == 1
    assert "not a SAM checkpoint" in capsys.readouterr().err
    assert files_under(tmp_path) == ["x.pth"]  # the download stays, no .safetensors


def test_download_vocab_with_a_wrong_checksum_exits_non_zero_and_keeps_nothing(server, tmp_path, capsys):
    server.files["/bpe.txt.gz"] = payload(1_000)
    code = load_weights.main(["download", "vocab", "--out", str(tmp_path), "--url", server.url("/bpe.txt.gz"),
                              "--sha256", "ab" * 32])
    assert code == 1 and "SHA-256 mismatch" in capsys.readouterr().err
    assert files_under(tmp_path) == []


def test_offline_the_error_names_the_url_and_the_manual_steps(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sam_vit_b_01ec64.pth"
    assert load_weights.main(["download", "sam", "--out", str(tmp_path), "--url", url]) == 1
    err = capsys.readouterr().err
    assert url in err and "By hand" in err and f"-o {tmp_path / 'sam_vit_b_01ec64.pth'} {url}" in err
    assert "Traceback" not in err


def test_a_malformed_sha256_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_weights.main(["download", "clip", "--sha256", "12345"])
    assert exit_info.value.code == 2 and "--sha256" in capsys.readouterr().err


def test_official_defaults_carry_their_checksums():
    mirrors, sha256, _ = load_weights.OFFICIAL_FILES["clip"]
    assert all(url.split("/")[-2] == sha256 and url.endswith("/ViT-B-16.pt") for url in mirrors)  # OpenAI's scheme
    assert load_weights.OFFICIAL_FILES["sam"][1] is None  # segment-anything documents no checksum
    for name, urls in fetch.REFER_MIRRORS.items():  # the original address first, then its archived copy
        assert urls[0].endswith(f"/{name}.zip") and urls[1] == f"{urls[1].split('/https://')[0]}/{urls[0]}"


# ---- fetch.download_refer ----


@pytest.fixture(scope="module")
def refer_zips(tmp_path_factory):
    """refcoco.zip (a tiny synth dataset renamed refcoco, in the refer zip layout) and train2014.zip."""
    root = str(tmp_path_factory.mktemp("synth"))
    synth.make_synth(root, seed=0, n_train=2, n_val=1, n_testA=1, n_testB=1)
    refcoco = {f"refcoco/{name}": open(os.path.join(root, "synth", name), "rb").read()
               for name in ("refs(unc).p", "instances.json")}
    images = os.path.join(root, "images", "train2014")
    train2014 = {f"train2014/{name}": open(os.path.join(images, name), "rb").read() for name in os.listdir(images)}
    return {"refcoco.zip": zip_bytes(refcoco), "train2014.zip": zip_bytes(train2014)}


def test_a_refer_zip_from_the_second_mirror_lands_in_the_layout(server, refer_zips, tmp_path, capsys):
    server.files["/archive/refcoco.zip"] = refer_zips["refcoco.zip"]
    mirrors = {"refcoco": (server.url("/unc/refcoco.zip"), server.url("/archive/refcoco.zip"))}
    root = str(tmp_path / "refer")
    fetch.download_refer(root, ["refcoco"], mirrors=mirrors)
    refs = data.load_refs(root, "refcoco", "unc")
    assert data.split_stats(refs).keys() == {"train", "val", "testA", "testB"}
    assert files_under(root) == ["refcoco/instances.json", "refcoco/refs(unc).p"]  # the downloaded zip is gone
    fetch.download_refer(root, ["refcoco"], mirrors=mirrors)  # complete: skipped, nothing fetched
    assert len(server.requests) == 2 and "refcoco: complete, skipped" in capsys.readouterr().out


def test_cli_takes_hand_fetched_zips_with_images_and_ends_with_the_stats(refer_zips, tmp_path, capsys):
    hand = tmp_path / "hand"
    hand.mkdir()
    for name, content in refer_zips.items():
        (hand / name).write_bytes(content)
    root = tmp_path / "refer"
    assert data.main(["download", "--data-root", str(root), "--datasets", "refcoco", "--images",
                      "--from", str(hand)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("refcoco (unc): "))
    assert [line.split(":")[0].strip() for line in lines[header + 1:]] == ["train", "val", "testA", "testB"]
    refs = data.load_refs(str(root), "refcoco", "unc")
    assert all(os.path.isfile(image["path"]) for image in refs.images.values())
    assert sorted(os.listdir(hand)) == ["refcoco.zip", "train2014.zip"]  # the user's zips are kept
    data.main(["download", "--data-root", str(root), "--datasets", "refcoco", "--images"])  # no --from, no server
    assert "train2014: complete, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("evil", ["../evil.txt", "refcoco/../../evil.txt", "ABSOLUTE"])
def test_a_zip_entry_outside_the_data_root_refuses_the_whole_zip(tmp_path, evil):
    hand, root, absolute = tmp_path / "hand", tmp_path / "root" / "refer", tmp_path / "elsewhere" / "evil.txt"
    evil = str(absolute) if evil == "ABSOLUTE" else evil
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(zip_bytes({"refcoco/instances.json": b"{}", evil: b"gotcha"}))
    with pytest.raises(ValueError, match=f"entry '{re.escape(evil)}' would be written outside"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "root") == [] and not absolute.exists()


def test_unknown_dataset_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["download", "--data-root", str(tmp_path), "--datasets", "refcoco,refclef"])
    assert exit_info.value.code == 2 and "refclef" in capsys.readouterr().err


def test_a_zip_writing_into_another_datasets_folder_is_refused(tmp_path):
    """refcoco.zip may write refcoco/ only: an entry for refcoco+/ would replace that dataset's files."""
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(zip_bytes({"refcoco/instances.json": b"{}",
                                                  "refcoco+/instances.json": b"overwritten"}))
    with pytest.raises(ValueError, match=r"refcoco.zip: entry 'refcoco\+/instances.json' lies outside refcoco/"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "refer") == []


def declare_size(archive: bytes, size: int) -> bytes:
    """The zip with its (single) member's uncompressed size rewritten to `size` in both headers."""
    local, central = archive.index(b"PK\x03\x04"), archive.index(b"PK\x01\x02")
    packed = size.to_bytes(4, "little")
    archive = archive[:local + 22] + packed + archive[local + 26:]
    return archive[:central + 24] + packed + archive[central + 28:]


def test_a_zip_declaring_more_than_its_kind_can_hold_is_refused_before_unpacking(tmp_path):
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(declare_size(zip_bytes({"refcoco/instances.json": b"{}" * 50}), 3 << 30))
    with pytest.raises(ValueError, match=r"refcoco.zip: its files declare 3.0 GiB, more than the 2.0 GiB"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "refer") == []


def test_a_zip_bomb_that_lies_in_its_header_writes_no_more_than_it_declares(tmp_path):
    """A member declaring 100 bytes whose data inflates to 20 MB: unpacking stops at the declared size
    (zipfile reads no further) and the mismatch is refused as damage, nothing left behind."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("refcoco/instances.json", b"\0" * (20 << 20))
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(declare_size(buffer.getvalue(), 100))
    with pytest.raises(ValueError, match=r"refcoco.zip: damaged, truncated or not a zip file"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "refer") == []


def test_a_member_shorter_than_its_header_says_is_damage_not_a_complete_file(tmp_path):
    """Stored data that ends early passes the CRC-32 of what is there: its size is checked too."""
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(declare_size(zip_bytes({"refcoco/instances.json": b"{}" * 50}), 200))
    with pytest.raises(ValueError, match=r"damaged.*'refcoco/instances.json' holds 100 bytes, its header says 200"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "refer") == []


def test_a_zip_larger_than_the_free_disk_space_is_refused_before_unpacking(refer_zips, tmp_path, monkeypatch):
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(refer_zips["refcoco.zip"])
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(ValueError, match=r"refcoco.zip: unpacking needs .* more, the disk .* has 1000 bytes free"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert files_under(tmp_path / "refer") == []


def test_an_interrupted_unpacking_is_unpacked_again_not_reported_complete(refer_zips, tmp_path, monkeypatch, capsys):
    """refcocog.zip killed after refs(umd).p and instances.json, before refs(google).p: the next run unpacks it
    again, instead of finding refs(umd).p and instances.json and calling refcocog complete."""
    with zipfile.ZipFile(io.BytesIO(refer_zips["refcoco.zip"])) as z:
        refs, instances = z.read("refcoco/refs(unc).p"), z.read("refcoco/instances.json")
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcocog.zip").write_bytes(zip_bytes({"refcocog/refs(umd).p": refs, "refcocog/instances.json": instances,
                                                   "refcocog/refs(google).p": refs}))
    copy, calls = fetch.shutil.copyfileobj, []

    def killed_at_the_third_member(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return copy(*args)
    monkeypatch.setattr(fetch.shutil, "copyfileobj", killed_at_the_third_member)
    with pytest.raises(KeyboardInterrupt):
        fetch.download_refer(str(root), ["refcocog"], from_dir=str(hand))
    monkeypatch.setattr(fetch.shutil, "copyfileobj", copy)
    fetch.download_refer(str(root), ["refcocog"], from_dir=str(hand))
    assert "refcocog: unpacked 3 files" in capsys.readouterr().out
    assert files_under(root) == ["refcocog/instances.json", "refcocog/refs(google).p", "refcocog/refs(umd).p"]


def test_a_truncated_hand_fetched_zip_is_one_line_that_says_to_delete_it(refer_zips, tmp_path):
    hand, root = tmp_path / "hand", tmp_path / "refer"
    hand.mkdir()
    (hand / "refcoco.zip").write_bytes(refer_zips["refcoco.zip"][:-100])
    with pytest.raises(ValueError, match=r"refcoco.zip: damaged, truncated or not a zip file \(.*\); delete it"):
        fetch.download_refer(str(root), ["refcoco"], from_dir=str(hand))
    assert (hand / "refcoco.zip").exists()  # the user's file: they decide


def corrupt(archive: bytes) -> bytes:
    """The first member's deflate stream starts with a reserved block type: zlib refuses it."""
    name_length, extra_length = (int.from_bytes(archive[i:i + 2], "little") for i in (26, 28))
    start = 30 + name_length + extra_length
    return archive[:start] + b"\xff" + archive[start + 1:]


def test_a_corrupt_downloaded_zip_is_deleted_and_the_message_says_to_run_again(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("refcoco/instances.json", b"{}" * 1000)
    server.files["/refcoco.zip"] = corrupt(buffer.getvalue())
    root = tmp_path / "refer"
    with pytest.raises(ValueError, match=r"refcoco.zip: damaged, truncated or not a zip file \(.*\); deleted it, "
                                         "run the command again to download it anew"):
        fetch.download_refer(str(root), ["refcoco"], mirrors={"refcoco": (server.url("/refcoco.zip"),)})
    assert files_under(root) == []


def test_a_zip_with_a_garbled_compression_method_is_damage_named_before_unpacking(tmp_path):
    path, dest = tmp_path / "refcoco.zip", tmp_path / "refer"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("refcoco/instances.json", "{}")
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
        at = raw.index(signature) + offset
        raw[at:at + 2] = (77).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(fetch.DamagedArchiveError, match=r"refcoco\.zip: damaged, .*unknown compression method 77"):
        fetch.safe_extract(str(path), str(dest), folder="refcoco")
    assert not dest.exists() or not any(dest.rglob("*.json"))
