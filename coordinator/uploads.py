"""Adding an image to the pool from the admin's side: cut it into chunks, send only those the coordinator lacks,
then name it. An interrupted add costs nothing when run again: the chunks that arrived are not sent twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from conode.cluster.chunks import chunk_digest, manifest_of, read_chunk
from conode.errors import DiskImageError
from coordinator.client import AdminClient

Progress = Callable[..., None]  # (text, final=False)


def upload_image(client: AdminClient, name: str, path: Path, progress: Progress) -> str:
    """Send image *path* as *name*; return the coordinator's last word."""
    started = time.monotonic()
    manifest = manifest_of(path, lambda done, total: progress(f"reading {path.name}: {done >> 20}/{total >> 20} MiB"))
    progress(f"read {path.name}: {manifest.size >> 20} MiB in {len(manifest.chunks)} chunks, "
             f"sha256 {manifest.sha256[:16]}", final=True)
    missing = client.request("image_missing", "image_missing_reply", chunks=manifest.chunks)["chunks"]
    first_index: dict[bytes, int] = {}
    for index, digest in enumerate(manifest.chunks):
        first_index.setdefault(digest, index)
    todo = sorted({first_index[digest] for digest in missing if digest in first_index})
    sent = 0
    for count, index in enumerate(todo, 1):
        data = read_chunk(path, index, manifest.size)
        if chunk_digest(data) != manifest.chunks[index]:
            raise DiskImageError(f"image {path} changed while it was being added; add it again when it is complete")
        client.request("image_put", "ok", digest=manifest.chunks[index], data=data)
        sent += len(data)
        progress(f"sending: chunk {count}/{len(todo)}, {sent >> 20} MiB")
    took = time.monotonic() - started
    rate = f", {sent / (1 << 20) / took:.0f} MiB/s" if sent and took > 0 else ""
    progress(f"sent {len(todo)} chunks the coordinator lacked ({sent >> 20} MiB; the image has "
             f"{len(manifest.chunks)}, {len(first_index)} distinct) in {took:.1f} s{rate}", final=True)
    reply = client.request("image_commit", "ok", name=name, size=manifest.size, sha256=manifest.sha256,
                           chunks=manifest.chunks)
    return str(reply.get("detail", "ok"))
