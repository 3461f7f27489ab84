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


LIMIT = 1 << 20  # the budget the server passes: --max-upload-mb 1


def _bomb_tar(members: list[tuple[str, int]], pax: dict[str, str] | None = None) -> bytes:
    """A .tar.gz whose members are runs of zeros (`size` bytes each): tiny compressed, large unpacked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=9) as tar:
        for i, (name, size) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = size
            if pax and i == 0:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


def _zip_deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


BOMBS = {
    # case: (archive builder, what the message says)
    "one-huge-member": (lambda: _bomb_tar([("adapter_config.json", 2), ("adapter_model.safetensors", 64 << 20)]),
                        "declares 67108864 bytes"),
    "huge-ignored-member": (lambda: _bomb_tar([("README.md", 64 << 20), ("adapter_config.json", 2)]), "README.md"),
    "many-members-each-under": (lambda: _bomb_tar([(f"f{i}.txt", 300 << 10) for i in range(8)]), "f3.txt"),
    # a pax header is read whole by tarfile before any member is seen: only the stream cap stops it
    "pax-header": (lambda: _bomb_tar([("adapter_config.json", 2)], pax={"comment": "x" * (8 << 20)}),
                   "tar stream"),
    "zip-one-huge-member": (lambda: _zip_deflated({"adapter_config.json": b"{}", "adapter_model.safetensors":
                                          bytes(64 << 20)}), "declares 67108864 bytes"),
    "zip-many-members": (lambda: _zip_deflated({f"f{i}.txt": bytes(300 << 10) for i in range(8)}), "f3.txt"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bombs_refused_at_the_budget(case: str) -> None:
    build, needle = BOMBS[case]
    data = build()
    assert len(data) < LIMIT // 4  # small on the wire
    name = "a.zip" if case.startswith("zip") else "a.tar.gz"
    with pytest.raises(AdapterError) as info:
        extract_upload({name: data}, max_total_bytes=LIMIT, limit_name="--max-upload-mb 1")
    assert info.value.status == 413
    assert "--max-upload-mb 1" in str(info.value) and needle in str(info.value), str(info.value)


def test_an_adapter_just_under_the_budget_passes() -> None:
    w = bytes(LIMIT - 1000)
    for data, name in ((_tar([("adapter_config.json", CFG, tarfile.REGTYPE),
                              ("adapter_model.safetensors", w, tarfile.REGTYPE)]), "a.tar.gz"),
                       (_zip({"adapter_config.json": CFG, "adapter_model.safetensors": w}), "a.zip")):
        assert extract_upload({name: data}, max_total_bytes=LIMIT) == {"adapter_config.json": CFG,
                                                                      "adapter_model.safetensors": w}
