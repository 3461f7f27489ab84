"""Turn an upload into the two adapter files, in memory, without trusting archive metadata.

Accepted: the two files themselves, or one `.tar.gz` / `.tgz` / `.zip` holding them at its top level
or inside a single folder. Members are read one at a time; nothing is extracted to disk, so absolute
paths and `..` cannot escape, but they are refused anyway as signs of a hostile archive. Links,
devices and pickles are refused; other extra files (README.md ...) are ignored.

Archive bombs: the unpacked size is capped by one budget (the server passes its upload limit). Each
member's declared size is charged before a byte of it is read, and a `.tar.gz` is decompressed
through a counting reader that allows only the charged member data plus a small header allowance,
so a huge pax or long-name header stops after about 1 MiB. A bomb is refused before its members are
inflated, never after the whole expansion.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping

from adapters_store.errors import AdapterError
from adapters_store.loader import CONFIG_NAME, KNOWN_FILES, WEIGHTS_NAME, WEIGHTS_NAMES
from adapters_store.safetensors_check import refuse_pickles

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
WANTED = KNOWN_FILES
_TAR_BLOCK = 512
_CHUNK = 1 << 20


class _Budget:
    """Bytes the archive may still unpack to; 413 naming the limit at the first byte over.

    For a tar stream it also says how far the decompressed stream may go: the members charged so far
    (data padded to whole blocks, plus header blocks) and a fixed allowance for headers, so a huge
    pax or long-name header stops after `HEADER_ALLOWANCE` bytes, not after the whole budget."""

    HEADER_ALLOWANCE = 1 << 20

    def __init__(self, limit: int, name: str | None) -> None:
        self.limit = limit
        self.name = name or f"the limit of {limit} bytes"
        self.used = 0
        self.stream_allowance = self.HEADER_ALLOWANCE

    def charge(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise AdapterError(f"archive unpacks to more than {self.limit} bytes ({what}), over {self.name}",
                               field="files", status=413)
        self.stream_allowance += -(-n // _TAR_BLOCK) * _TAR_BLOCK + 3 * _TAR_BLOCK


def _complete(found: dict[str, bytes]) -> bool:
    return CONFIG_NAME in found and any(w in found for w in WEIGHTS_NAMES)


def extract_upload(
    files: Mapping[str, bytes],
    *,
    max_members: int = 64,
    max_member_bytes: int | None = None,
    max_total_bytes: int = 4 << 30,
    limit_name: str | None = None,
) -> dict[str, bytes]:
    """Return `{adapter_config.json: ..., adapter_model.safetensors: ...}` from uploaded files.

    `files` maps each uploaded file name to its bytes. `max_total_bytes` caps what an archive unpacks
    to (all members, ignored ones included); `limit_name` names that cap in messages (e.g. the flag).
    Raises AdapterError (413 for size caps). CPU-bound: call it off the event loop.
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
    budget = _Budget(max_total_bytes, limit_name)
    if name.lower().endswith(".zip"):
        members = _zip_members(data, budget)
    else:
        members = _tar_members(data, budget)
    found: dict[str, bytes] = {}
    count = 0
    for path, size, read in members:
        count += 1
        if count > max_members:
            raise AdapterError(f"archive has more than {max_members} members", field="files", status=413)
        _check_path(path)
        refuse_pickles([path])
        if max_member_bytes is not None and size > max_member_bytes:
            raise AdapterError(
                f"archive member {path!r} is {size} bytes, over the limit of {max_member_bytes}",
                field="files", status=413,
            )
        budget.charge(size, f"member {path!r} declares {size} bytes")  # before a byte of it is read
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


class _CappedReader(io.RawIOBase):
    """The decompressed tar stream, counted: past what the budget allows it raises instead of inflating
    more (member data is allowed once its size is charged; headers get a fixed allowance)."""

    def __init__(self, raw: gzip.GzipFile, budget: _Budget) -> None:
        self._raw = raw
        self._budget = budget
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        cap = self._budget.stream_allowance
        left = cap - self.read_bytes
        want = left + 1 if n is None or n < 0 else min(n, left + 1)
        data = self._raw.read(want)
        self.read_bytes += len(data)
        if self.read_bytes > cap:
            raise AdapterError(f"archive unpacks to more than {self._budget.limit} bytes or hides data in its "
                               f"headers (its tar stream passed {cap} bytes, {self._budget.used} of them declared "
                               f"member data), over {self._budget.name}", field="files", status=413)
        return data


def _tar_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    stream = _CappedReader(gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb"), budget)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # a stream: skipping a member inflates through the cap
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AdapterError(f"upload is not a readable .tar.gz archive: {e}", field="files") from None
    with tar:
        try:
            for m in tar:
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
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise AdapterError(f"archive is corrupt: {e}", field="files") from None


def _read_tar(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    return b"" if f is None else f.read(member.size + 1)


def _zip_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
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
    # zipfile never inflates past the declared size (which the budget has already charged), and a
    # member longer than declared fails its CRC check: reading in chunks keeps each step bounded.
    out = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                out += chunk
                if len(out) > info.file_size:
                    break
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise AdapterError(f"archive member {info.filename!r} is corrupt: {e}", field="files") from None
    return bytes(out)
