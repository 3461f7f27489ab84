"""extract_upload: two files or one archive in; hostile archives refused."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from adapters_store import AdapterError, extract_upload

CFG, W = b'{"peft_type": "LORA"}', b"weights-bytes"
GOOD = {"adapter_config.json": CFG, "adapter_model.safetensors": W}


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """members: (name, content or None, tar type)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc/passwd"
            info.size = len(content or b"")
            tar.addfile(info, io.BytesIO(content) if content else None)
    return buf.getvalue()


def _zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_two_files() -> None:
    assert extract_upload({**GOOD, "README.md": b"hi"}) == GOOD


@pytest.mark.parametrize("prefix", ["", "my-adapter/", "./"])
def test_tar_and_zip(prefix: str) -> None:
    members = [(prefix + "adapter_config.json", CFG, tarfile.REGTYPE),
               (prefix + "adapter_model.safetensors", W, tarfile.REGTYPE),
               (prefix + "README.md", b"x", tarfile.REGTYPE)]
    if prefix == "my-adapter/":
        members.insert(0, ("my-adapter", None, tarfile.DIRTYPE))
    assert extract_upload({"a.tar.gz": _tar(members)}) == GOOD
    assert extract_upload({"a.tgz": _tar(members)}) == GOOD
    assert extract_upload({"a.zip": _zip({m[0]: m[1] or b"" for m in members if m[1]})}) == GOOD


ATTACKS = {
    "absolute": ([("/etc/adapter_config.json", CFG, tarfile.REGTYPE)], "absolute or parent-relative"),
    "dotdot": ([("../../adapter_model.safetensors", W, tarfile.REGTYPE)], "absolute or parent-relative"),
    "symlink": ([("adapter_model.safetensors", None, tarfile.SYMTYPE)], "is a link"),
    "hardlink": ([("adapter_model.safetensors", None, tarfile.LNKTYPE)], "is a link"),
    "device": ([("dev", None, tarfile.CHRTYPE)], "special file"),
    "fifo": ([("fifo", None, tarfile.FIFOTYPE)], "special file"),
    "pickle": ([("adapter_config.json", CFG, tarfile.REGTYPE), ("adapter_model.bin", b"x", tarfile.REGTYPE)],
               "pickled"),
    "missing": ([("adapter_config.json", CFG, tarfile.REGTYPE)], "does not hold adapter_model.safetensors"),
    "two_folders": ([("a/adapter_config.json", CFG, tarfile.REGTYPE), ("b/adapter_model.safetensors", W,
                                                                        tarfile.REGTYPE)], "several folders"),
    "nested": ([("a/b/adapter_config.json", CFG, tarfile.REGTYPE), ("a/b/adapter_model.safetensors", W,
                                                                      tarfile.REGTYPE)], "nested"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_tar_attacks(case: str) -> None:
    members, needle = ATTACKS[case]
    with pytest.raises(AdapterError) as info:
        extract_upload({"evil.tar.gz": _tar(members)})
    assert needle in str(info.value)


def test_zip_attacks() -> None:
    with pytest.raises(AdapterError, match="link or special file"):
        extract_upload({"a.zip": _zip(GOOD, symlink="evil-link")})
    with pytest.raises(AdapterError, match="absolute or parent-relative"):
        extract_upload({"a.zip": _zip({"../adapter_config.json": CFG, "adapter_model.safetensors": W})})


def test_size_and_count_caps() -> None:
    big = _tar([("adapter_config.json", CFG, tarfile.REGTYPE), ("adapter_model.safetensors", b"x" * 100,
                                                                   tarfile.REGTYPE)])
    with pytest.raises(AdapterError, match="over the limit of 50") as info:
        extract_upload({"a.tar.gz": big}, max_member_bytes=50)
    assert info.value.status == 413
    many = _tar([(f"f{i}.txt", b"x", tarfile.REGTYPE) for i in range(10)])
    with pytest.raises(AdapterError, match="more than 5 members") as info:
        extract_upload({"a.tar.gz": many}, max_members=5)
    assert info.value.status == 413
    with pytest.raises(AdapterError, match="more than 120 bytes"):
        extract_upload({"a.zip": _zip({"a.txt": b"x" * 100, "b.txt": b"y" * 100})}, max_total_bytes=120)


def test_garbage_and_wrong_shapes() -> None:
    with pytest.raises(AdapterError, match="not a readable .tar.gz"):
        extract_upload({"a.tar.gz": b"garbage"})
    with pytest.raises(AdapterError, match="not a readable .zip"):
        extract_upload({"a.zip": b"garbage"})
    with pytest.raises(AdapterError, match="send adapter_config.json and adapter_model.safetensors"):
        extract_upload({"adapter_config.json": CFG})
    with pytest.raises(AdapterError, match="pickled"):
        extract_upload({"adapter_config.json": CFG, "adapter_model.pt": b"x"})
