"""A small root image for tests: an ext2 file system made of the packaged initramfs's files (busybox and
conode's agent), which guest/init can switch to as it switches to any image's root."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

from conode.vm.guest_image import packaged_image_dir


def root_image(into: Path, extra: dict[str, str]) -> Path:
    """An ext2 root file system made of the packaged initramfs's files (without its /init) plus *extra*."""
    tree = into / "root-tree"
    tree.mkdir()
    cpio = gzip.decompress((packaged_image_dir() / "initramfs.cpio.gz").read_bytes())
    subprocess.run(["cpio", "-id", "--quiet"], input=cpio, cwd=tree, check=True, capture_output=True)
    (tree / "init").unlink()
    (tree / "job").mkdir()
    for name, text in extra.items():
        (tree / name).write_text(text)
    image = into / "root.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", str(tree), str(image), "24M"], check=True,
                   capture_output=True)
    return image
