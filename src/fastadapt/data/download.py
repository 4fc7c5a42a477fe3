"""Downloads that verify checksums, write atomically and extract safely."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ..progress import progress_bar

from ..errors import DataError


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, path: str | os.PathLike, md5: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` to ``path`` unless a file with the right checksum is already there.

    The bytes go to a temporary file beside ``path`` and are renamed into place only after the
    checksum matched, so a partial or corrupt download never takes the final name.
    """
    path = Path(path)
    if path.is_file() and (md5 is None or file_digest(path) == md5):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with progress_bar(enabled=progress, total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                        for block in iter(lambda: resp.read(1 << 20), b""):
                            out.write(block)
                            bar.update(len(block))
            except (OSError, ValueError) as exc:
                raise DataError(f"could not download {url} ({exc}); fetch it by hand into {path.parent}") from exc
        if md5 is not None:
            got = file_digest(tmp)
            if got != md5:
                raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is "
                                "corrupt or the file changed upstream, so it was discarded")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def safe_extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extract ``archive`` into ``target``, refusing members that would land outside it.

    Extraction goes to a temporary folder first and is moved into place member folder by
    member folder, so an interrupted extraction leaves no half-filled dataset behind.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive} is not a valid zip archive ({exc}); delete it and download again") from exc
    with zf, tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        tmp_path = Path(tmp).resolve()
        for member in zf.infolist():
            dest = (tmp_path / member.filename).resolve()
            if not dest.is_relative_to(tmp_path) or member.filename.startswith(("/", "\\")):
                raise DataError(f"{archive} holds an unsafe path '{member.filename}'; refusing to extract it")
            if member.external_attr >> 16 & 0o170000 == 0o120000:
                raise DataError(f"{archive} holds a symbolic link '{member.filename}'; refusing to extract it")
        try:
            zf.extractall(tmp_path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{archive} is corrupt ({exc}); delete it and download again") from exc
        for top in tmp_path.iterdir():
            final = target / top.name
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(top, final)
