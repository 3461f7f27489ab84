"""Turn an upload into the two adapter files, in memory, without trusting archive metadata.

Accepted: the two files themselves, or one `.tar.gz` / `.tgz` / `.zip` holding them at its top level
or inside a single folder. Members are read one at a time with size caps; nothing is extracted to
disk, so absolute paths and `..` cannot escape, but they are refused anyway as signs of a hostile
archive. Links, devices and pickles are refused; other extra files (README.md ...) are ignored.
"""

from __future__ import annotations

import io
import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Mapping

from adapters_store.errors import AdapterError
from adapters_store.loader import CONFIG_NAME, KNOWN_FILES, WEIGHTS_NAME, WEIGHTS_NAMES
from adapters_store.safetensors_check import refuse_pickles

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
WANTED = KNOWN_FILES


def _complete(found: dict[str, bytes]) -> bool:
    return CONFIG_NAME in found and any(w in found for w in WEIGHTS_NAMES)


def extract_upload(
    files: Mapping[str, bytes],
    *,
    max_members: int = 64,
    max_member_bytes: int = 2 << 30,
    max_total_bytes: int = 4 << 30,
) -> dict[str, bytes]:
    """Return `{adapter_config.json: ..., adapter_model.safetensors: ...}` from uploaded files.

    `files` maps each uploaded file name to its bytes. Raises AdapterError (413 for size caps).
    """
    names = [posixpath.basename(n.replace("\\", "/")) for n in files]
    refuse_pickles(names)
    by_base = dict(zip(names, files.values(), strict=True))
    if _complete(by_base):
        return {w: by_base[w] for w in WANTED if w in by_base}
    archives = [n for n in files if n.lower().endswith(ARCHIVE_SUFFIXES)]
    if len(archives) != 1 or len(files) != 1:
        raise AdapterError(
            f"upload has files {sorted(files)}; send {CONFIG_NAME} and {WEIGHTS_NAME}, or one "
            f"{'/'.join(ARCHIVE_SUFFIXES)} archive holding them",
            field="files",
        )
    name = archives[0]
    data = files[name]
    members = _zip_members(data) if name.lower().endswith(".zip") else _tar_members(data)
    found: dict[str, bytes] = {}
    count = total = 0
    for path, size, read in members:
        count += 1
        if count > max_members:
            raise AdapterError(f"archive has more than {max_members} members", field="files", status=413)
        _check_path(path)
        refuse_pickles([path])
        if size > max_member_bytes:
            raise AdapterError(
                f"archive member {path!r} is {size} bytes, over the limit of {max_member_bytes}",
                field="files", status=413,
            )
        total += size
        if total > max_total_bytes:
            raise AdapterError(
                f"archive holds more than {max_total_bytes} bytes", field="files", status=413
            )
        if posixpath.basename(path) in WANTED:
            if path in found:
                raise AdapterError(f"archive holds {path!r} twice", field="files")
            content = read()
            if len(content) != size:  # the header lied about the size
                raise AdapterError(f"archive member {path!r} is corrupt", field="files")
            found[path] = content
    return _pick(found)


def _check_path(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":") or ".." in parts:
        raise AdapterError(
            f"archive member {path!r} has an absolute or parent-relative path; only relative paths are allowed",
            field="files",
        )


def _pick(found: dict[str, bytes]) -> dict[str, bytes]:
    dirs = {posixpath.dirname(p) for p in found}
    if len(dirs) > 1:
        raise AdapterError(
            f"archive holds adapter files in several folders ({sorted(dirs)}); put one adapter at the top level "
            "or inside one folder",
            field="files",
        )
    folder = dirs.pop() if dirs else ""
    if "/" in folder:
        raise AdapterError(
            f"adapter files are nested in {folder!r}; put them at the top level or inside one folder", field="files"
        )
    out = {w: v for w in WANTED if (v := found.get(posixpath.join(folder, w))) is not None}
    if not _complete(out):
        missing = CONFIG_NAME if CONFIG_NAME not in out else WEIGHTS_NAME
        raise AdapterError(f"archive does not hold {missing}", field=missing)
    return out


def _tar_members(data: bytes) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AdapterError(f"upload is not a readable .tar.gz archive: {e}", field="files") from None
    with tar:
        try:
            for m in tar:  # streams headers: a member count cap applies before the whole index is read
                path = m.name.removeprefix("./")
                if m.isdir():
                    _check_path(path)
                    yield path, 0, lambda: b""
                    continue
                if not m.isfile():
                    kind = "link" if (m.issym() or m.islnk()) else "special file"
                    raise AdapterError(
                        f"archive member {m.name!r} is a {kind}; only regular files are allowed", field="files"
                    )
                yield path, m.size, lambda m=m: _read_tar(tar, m)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise AdapterError(f"archive is corrupt: {e}", field="files") from None


def _read_tar(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    return b"" if f is None else f.read(member.size + 1)


def _zip_members(data: bytes) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterError(f"upload is not a readable .zip archive: {e}", field="files") from None
    with zf:
        for info in zf.infolist():
            path = info.filename.removeprefix("./")
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise AdapterError(
                    f"archive member {info.filename!r} is a link or special file; only regular files are allowed",
                    field="files",
                )
            if info.flag_bits & 0x1:
                raise AdapterError(f"archive member {info.filename!r} is encrypted", field="files")
            if info.is_dir():
                _check_path(path.rstrip("/"))
                yield path.rstrip("/"), 0, lambda: b""
                continue
            yield path, info.file_size, lambda info=info: _read_zip(zf, info)


def _read_zip(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as f:
            return f.read(info.file_size + 1)  # never trust the declared size beyond one byte
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise AdapterError(f"archive member {info.filename!r} is corrupt: {e}", field="files") from None
