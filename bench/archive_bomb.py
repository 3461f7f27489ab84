"""CPU time and memory to refuse archive bombs (issue 17): a ~1.5 MB upload that unpacks to ~1.5 GB.

Run from the repository root: `python -m bench.archive_bomb [--gb 1.5] [--limit-mb 200] [--json PATH]`.
Each bomb is built in memory by streaming zeros through the compressor (never 1.5 GB at once), then
handed to `extract_upload` with the server's default upload limit as the budget, as the API does.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import tarfile
import time
import zipfile
from collections.abc import Callable

from adapters_store import AdapterError, extract_upload

_CHUNK = bytes(1 << 20)


def zip_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("adapter_config.json", b"{}")
        with z.open("adapter_model.safetensors", "w", force_zip64=True) as f:
            for _ in range(size >> 20):
                f.write(_CHUNK)
    return buf.getvalue()


def tgz_bomb(size: int, pax: bool = False) -> bytes:
    """One member of `size` zeros; with `pax`, the zeros are a pax header value instead (a header tarfile
    reads whole before any member is seen)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        if pax:  # one "LEN comment=0000...\n" record, streamed
            body = size + len(" comment=\n")
            n = body + len(str(body))
            n = body + len(str(n))
            info = tarfile.TarInfo("././@PaxHeader")
            info.type = tarfile.XHDTYPE
            info.size = n
            gz.write(info.tobuf(tarfile.USTAR_FORMAT))
            gz.write(f"{n} comment=".encode())
            _zeros(gz, size, b"0")
            gz.write(b"\n" + bytes(-n % 512))
            size = 2
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = size
        gz.write(info.tobuf(tarfile.USTAR_FORMAT))
        _zeros(gz, size)
        gz.write(bytes(-size % 512) + bytes(1024))
    return buf.getvalue()


def _zeros(f: gzip.GzipFile, size: int, byte: bytes = b"\0") -> None:
    chunk = byte * len(_CHUNK)
    while size:
        n = min(size, len(chunk))
        f.write(chunk[:n])
        size -= n


def measure(name: str, data: bytes, limit: int) -> dict[str, object]:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        extract_upload({name: data}, max_total_bytes=limit, limit_name=f"--max-upload-mb {limit >> 20}")
        outcome = "accepted"
    except AdapterError as e:
        outcome = f"{e.status}: {e}"
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"archive": name, "compressed_bytes": len(data), "cpu_s": cpu, "wall_s": wall,
            "peak_rss_growth_mb": rss / 1024, "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.5, help="what each bomb unpacks to")
    ap.add_argument("--limit-mb", type=int, default=200, help="the budget (--max-upload-mb)")
    ap.add_argument("--json", metavar="PATH", help="write the figures here as JSON")
    args = ap.parse_args()
    size, limit = int(args.gb * (1 << 30)) >> 20 << 20, args.limit_mb << 20
    bombs: list[tuple[str, Callable[[], bytes]]] = [
        ("bomb.zip", lambda: zip_bomb(size)), ("bomb.tar.gz", lambda: tgz_bomb(size)),
        ("pax-header-bomb.tar.gz", lambda: tgz_bomb(size, pax=True)),
    ]
    rows = []
    print(f"budget {args.limit_mb} MB; each bomb unpacks to {size >> 20} MB")
    print(f"{'archive':<24} {'upload':>10} {'cpu s':>7} {'wall s':>7} {'rss +MB':>8}  outcome")
    for name, build in bombs:
        row = measure(name, build(), limit)
        rows.append(row)
        print(f"{name:<24} {row['compressed_bytes'] / 1e6:>8.2f}MB {row['cpu_s']:7.3f} {row['wall_s']:7.3f} "
              f"{row['peak_rss_growth_mb']:8.1f}  {str(row['outcome'])[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
