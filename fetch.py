"""Downloads: resumable transfers from mirrors, SHA-256 checks, safe unzipping, and the refer archives.

Machinery beside the method: load_weights.py fetches the official CLIP and SAM files with it
(`python load_weights.py download`), data.py's CLI the refer annotations and COCO train2014
(`python data.py download`), so that neither holds download code. One copy of the transfer code for
both: a transfer resumes after a dropped connection or a killed run, is checked against its SHA-256
where one is known (zip members against their CRC-32 and size while unpacking), and a file appears only
when complete. An archive is refused before anything is written when an entry leaves its own folder, or
its declared size exceeds what its kind holds or the disk has free. This file imports no method file;
the layout it unpacks into is coco.py's, the one data.load_refs reads.
"""
import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Sequence

from tqdm import tqdm

from coco import IMAGE_DIR_CANDIDATES, has_refs


# ---------------------------------------------------------------------------------------------
# 1. Resumable downloads from mirrors
# ---------------------------------------------------------------------------------------------


class DownloadError(OSError):
    """A file that could not be fetched (or failed its checksum); the message names the URL."""


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, path, sha256: str | None = None, retries: int = 5, timeout: float = 60) -> str:
    """Fetch `url` into `path`; returns the path. An existing `path` (with the right checksum) is kept.

    The bytes go to `path`.part first, so an interrupted transfer (a dropped connection, a killed
    process) continues where it stopped with an HTTP Range request, here (up to `retries` times in a
    row without progress) or on the next call; a server that ignores Range and answers 200 sends the
    whole file again, which then replaces the partial one. With `sha256`, a complete file whose hash
    differs is deleted and DownloadError says so. The finished file appears atomically (os.replace).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and (sha256 is None or sha256_of(path) == sha256):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part, stalled = path + ".part", 0
    while True:
        before = _size(part)
        if _fetch_part(url, part, timeout):
            break
        stalled = 0 if _size(part) > before else stalled + 1  # a slow but moving transfer goes on
        if stalled > retries:
            raise DownloadError(f"{url}: the transfer broke off {stalled} times in a row at byte {_size(part)}; "
                                "run the command again to resume")
    if sha256 is not None and (digest := sha256_of(part)) != sha256:
        os.remove(part)
        raise DownloadError(f"{url}: SHA-256 mismatch (got {digest}, expected {sha256}); "
                            f"deleted the download {part}")
    os.replace(part, path)
    return path


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _fetch_part(url: str, part: str, timeout: float) -> bool:
    """One request appending to `part`. True when the file is complete; False when the connection
    broke off (worth another try); DownloadError for an HTTP or network error."""
    start = _size(part)
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after byte `start`: complete, or a .part longer than the file
            if e.headers.get("Content-Range") == f"bytes */{start}":
                return True
            os.remove(part)
            return False
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from e
    with response:
        resumed = response.status == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
            raise DownloadError(f"{url}: asked for bytes {start}- and got {response.headers.get('Content-Range')}")
        if not resumed:
            start = 0  # 200: the server sent the whole file (Range ignored), so start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(part[:-len(".part")]), leave=False) as bar:
            try:
                while block := response.read(1 << 20):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException):
                pass  # a dropped connection: the bytes so far stay in `part`
    if total is None:
        return True  # no length announced: the end of the stream is the end of the file
    if received > total:
        raise DownloadError(f"{url}: received {received} bytes, more than the {total} announced")
    return received == total


def download_from_mirrors(urls, path, sha256: str | None = None, accept=None) -> str:
    """`download` from the first of `urls` that works; `accept(path)` may refuse a file (e.g. an HTML
    error page served with status 200), which is then deleted and the next mirror tried. DownloadError
    lists what went wrong with every mirror."""
    errors = []
    for url in urls:
        try:
            download(url, path, sha256)
        except DownloadError as e:
            errors.append(str(e))
            continue
        if accept is None or accept(path):
            return path
        os.remove(path)
        errors.append(f"{url}: not the expected kind of file (an error page?)")
    raise DownloadError("; ".join(errors))


# ---------------------------------------------------------------------------------------------
# 2. Unpacking a zip safely
# ---------------------------------------------------------------------------------------------


class DamagedArchiveError(ValueError):
    """A zip that cannot be read to the end (truncated, corrupt, CRC or size mismatch); names the file."""


# What zipfile raises on a damaged archive: a bad header or CRC-32, a corrupt deflate stream, data
# that ends early (a garbled compression method is refused before, see _READABLE)
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError)
_READABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}  # zipfile's methods


def safe_extract(zip_path: str, dest: str, folder: str | None = None, max_bytes: int | None = None,
                 marker: str | None = None) -> int:
    """Unpack a zip under `dest`; returns the number of files written.

    Every entry is checked before anything is written, and any of these refuses the whole archive:
    an entry that would land outside `dest` (absolute path, `..`) or, with `folder`, outside
    dest/`folder` (an archive writes only its own dataset's folder); declared sizes that add up to more
    than `max_bytes` or than the disk has free. Each file is written under a temporary name and renamed,
    so a file that is present is complete (a killed run leaves only `.part` files). `marker`: a file
    that exists from the first member written until the last one is, so that while it is there what
    lies under `dest` is known to be a partial unpacking. A damaged archive raises DamagedArchiveError.
    """
    root = os.path.realpath(dest)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            for m in members:
                if m.compress_type not in _READABLE:
                    raise zipfile.BadZipFile(f"'{m.filename}': unknown compression method {m.compress_type}")
                target = os.path.realpath(os.path.join(root, m.filename))
                if (os.path.isabs(m.filename) or ".." in m.filename.replace("\\", "/").split("/")
                        or os.path.commonpath((root, target)) != root):
                    raise ValueError(f"{zip_path}: entry '{m.filename}' would be written outside {dest}; "
                                     "refusing the archive, nothing was extracted")
                if folder is not None and not m.filename.startswith(f"{folder}/"):
                    raise ValueError(f"{zip_path}: entry '{m.filename}' lies outside {folder}/, the only folder "
                                     f"{os.path.basename(zip_path)} may write; refusing the archive, nothing "
                                     "was extracted")
            files = [m for m in members if not m.is_dir()]
            _check_room(zip_path, root, files, max_bytes)
            for i, m in enumerate(tqdm(files, desc=f"unpacking {os.path.basename(zip_path)}", unit="file",
                                       leave=False)):
                target = os.path.join(root, m.filename)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    # zipfile reads a member up to its declared size and no further, then checks its
                    # CRC-32 (BadZipFile): a member whose data inflates beyond its header stops there
                    with archive.open(m) as src, open(target + ".part", "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                        if dst.tell() != m.file_size:  # data that ends early passes the CRC of what is there
                            raise EOFError(f"'{m.filename}' holds {dst.tell()} bytes, its header says {m.file_size}")
                except BaseException:
                    os.remove(target + ".part")
                    raise
                if marker is not None and i == 0:  # from the first file that lands until the last one has
                    os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
                    open(marker, "w").close()
                os.replace(target + ".part", target)
            if marker is not None:
                with contextlib.suppress(FileNotFoundError):  # an archive without files wrote none
                    os.remove(marker)
    except _DAMAGE as e:
        raise _damaged(zip_path, e) from e
    return len(files)


def _damaged(zip_path: str, e: Exception) -> DamagedArchiveError:
    return DamagedArchiveError(f"{zip_path}: damaged, truncated or not a zip file ({type(e).__name__}: {e})")


def _check_room(zip_path: str, root: str, files: list, max_bytes: int | None) -> None:
    """ValueError unless the declared sizes fit under `max_bytes` and on the disk (files already unpacked
    there by an earlier run count as room: they are replaced)."""
    declared = sum(m.file_size for m in files)
    if max_bytes is not None and declared > max_bytes:
        raise ValueError(f"{zip_path}: its files declare {declared / 2**30:.1f} GiB, more than the "
                         f"{max_bytes / 2**30:.1f} GiB this archive can hold; refusing it (a damaged or "
                         "forged zip?), nothing was extracted")
    present = (os.path.join(root, m.filename) for m in files)
    needed = declared - sum(min(_size(p), m.file_size) for p, m in zip(present, files))
    existing = root
    while not os.path.isdir(existing):  # dest may not exist yet: the disk it will be on
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ValueError(f"{zip_path}: unpacking needs {_human(needed)} more, the disk of {root} has {_human(free)} "
                         "free; free space or choose another --data-root, nothing was extracted")


def _human(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# ---------------------------------------------------------------------------------------------
# 3. The refer annotations (and COCO train2014) in the refer layout
# ---------------------------------------------------------------------------------------------
# The zips of lichengunc/refer's README were served by UNC, down since 2022; web.archive.org kept
# copies (the snapshots users share in lichengunc/refer issues #14 and #26, CRIS.pytorch issue #10).
# No checksum is published for any of them: each member's CRC-32 is checked while it is unpacked.

_REFER_URL = "https://bvisionweb1.cs.unc.edu/licheng/referit/data/{}.zip"
_ARCHIVE_SNAPSHOTS = {"refcoco": "20220413011718", "refcoco+": "20220413011656", "refcocog": "20220413012904"}
REFER_MIRRORS = {name: (_REFER_URL.format(name), f"https://web.archive.org/web/{stamp}/{_REFER_URL.format(name)}")
                 for name, stamp in _ARCHIVE_SNAPSHOTS.items()}
COCO_TRAIN2014_URL = "http://images.cocodataset.org/zips/train2014.zip"  # cocodataset.org/#download
COCO_TRAIN2014_IMAGES = 82783
DOWNLOAD_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # a dataset is complete with it
# What each archive may unpack to, with room to spare: a refer zip holds tens of MB of annotations (a few
# hundred MB unpacked), train2014.zip 13 GB of JPEGs. A zip declaring more is damaged or forged.
MAX_UNPACKED_BYTES = {"refcoco": 2 << 30, "refcoco+": 2 << 30, "refcocog": 2 << 30, "train2014": 20 << 30}


def _unpacking_marker(data_root: str, name: str) -> str:
    """Present while NAME.zip is being unpacked (safe_extract's marker): a run killed then left it behind."""
    return os.path.join(data_root, "images" if name == "train2014" else "", f"{name}.unpacking")


def _complete(data_root: str, name: str) -> bool:
    """Not while an unpacking of it was cut short. Then, a dataset: its refs file and instances.json are
    there (each unpacked atomically). train2014: it was unpacked here (marker file), or an image folder of
    the layout already holds all of COCO train2014."""
    if os.path.exists(_unpacking_marker(data_root, name)):
        return False
    if name != "train2014":
        return (has_refs(data_root, name, DOWNLOAD_SPLIT_BY[name])
                and os.path.isfile(os.path.join(data_root, name, "instances.json")))
    if os.path.isfile(os.path.join(data_root, "images", "train2014.complete")):
        return True
    folders = [os.path.join(data_root, *parts) for parts in IMAGE_DIR_CANDIDATES]
    return any(os.path.isdir(f) and sum(e.name.startswith("COCO_train2014_") for e in os.scandir(f))
               >= COCO_TRAIN2014_IMAGES for f in folders)


def download_refer(data_root: str, datasets: Sequence[str] = tuple(REFER_MIRRORS), images: bool = False,
                   from_dir: str | None = None, mirrors: dict | None = None,
                   image_urls: Sequence[str] = (COCO_TRAIN2014_URL,)) -> None:
    """Fetch and unpack what is missing of DATA_ROOT/<dataset>/{refs(..).p, instances.json} and, with
    `images`, DATA_ROOT/images/train2014/; what is complete is skipped, so a rerun continues.

    from_dir: a folder of zips fetched by hand (refcoco.zip, ..., train2014.zip), used before any mirror.
    mirrors: {dataset: urls tried in order} (default REFER_MIRRORS). Downloaded zips (kept as
    DATA_ROOT/downloads/*.part while incomplete) are deleted once unpacked; zips of from_dir are kept.
    """
    mirrors = mirrors or REFER_MIRRORS
    jobs = [(name, mirrors[name], data_root) for name in datasets]
    if images:  # train2014.zip holds train2014/COCO_train2014_*.jpg
        jobs.append(("train2014", tuple(image_urls), os.path.join(data_root, "images")))
    for name, urls, parent in jobs:
        if _complete(data_root, name):
            print(f"{name}: complete, skipped")
            continue
        path = os.path.join(from_dir or "", f"{name}.zip")
        downloaded = not (from_dir and os.path.isfile(path))
        if downloaded:
            path = os.path.join(data_root, "downloads", f"{name}.zip")
            try:
                download_from_mirrors(urls, path, accept=zipfile.is_zipfile)
            except DownloadError as e:
                raise DownloadError(f"{name}.zip: no mirror worked ({e}). Fetch it by hand from one of these "
                                    f"addresses, put it in a folder DIR and run `python data.py download "
                                    f"--data-root {data_root} --from DIR`") from e
        try:
            try:
                with zipfile.ZipFile(path) as archive:  # the refer zips hold refcoco/..., COCO's train2014/...
                    inside = any(n.startswith(f"{name}/") for n in archive.namelist())
            except _DAMAGE as e:
                raise _damaged(path, e) from e
            # a zip with a NAME/ folder writes only there, not into a sibling dataset's folder
            n = safe_extract(path, parent if inside else os.path.join(parent, name), folder=name if inside else None,
                             max_bytes=MAX_UNPACKED_BYTES[name], marker=_unpacking_marker(data_root, name))
        except DamagedArchiveError as e:
            if downloaded:  # fetched again on the next run
                os.remove(path)
                raise DamagedArchiveError(f"{e}; deleted it, run the command again to download it anew") from e
            raise DamagedArchiveError(f"{e}; delete it (or fetch it again) and run the command again: without it "
                                      "in --from DIR the mirrors are tried") from e
        except ValueError:
            if downloaded:  # fetched again on the next run
                os.remove(path)
            raise
        if name == "train2014":
            with open(os.path.join(parent, "train2014.complete"), "w") as f:
                f.write(f"{n} files from {path}\n")
        elif not _complete(data_root, name):
            raise ValueError(f"{path}: unpacked {n} files, but refs({DOWNLOAD_SPLIT_BY[name]}).p or "
                             f"instances.json is still missing from {os.path.join(data_root, name)}")
        if downloaded:
            os.remove(path)
        print(f"{name}: unpacked {n} files from {path}")
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(data_root, "downloads"))  # only when empty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python data.py download`; a dataset name or a --from folder that is not there is a usage
    error (exit code 2) before anything is fetched."""
    parser.add_argument("--data-root", required=True, help="DATA_ROOT to fill")
    parser.add_argument("--datasets", default=",".join(REFER_MIRRORS), type=_dataset_names,
                        help=f"comma-separated, of {', '.join(REFER_MIRRORS)} (default: all)")
    parser.add_argument("--images", action="store_true", help="also COCO train2014 (13 GB, resumable)")
    parser.add_argument("--from", dest="from_dir", metavar="DIR", type=_folder, help="a folder of zips fetched by "
                        "hand (refcoco.zip, refcoco+.zip, refcocog.zip, train2014.zip), used before any mirror")


def _dataset_names(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in names if d not in REFER_MIRRORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {', '.join(REFER_MIRRORS)}")
    return names


def _folder(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: no such folder")
    return path
