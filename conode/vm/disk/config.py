"""A machine's disk as configured: which base image, which overlay, how much the guest may write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conode.errors import DiskImageError
from conode.limits import DEFAULT_DISK_BUDGET_MIB, MAX_DISK_BUDGET_MIB
from conode.vm.disk.image import BaseImage
from conode.vm.disk.overlay import CowDisk
from conode.vm.state import blob, bounded

MAX_PATH_CHARS = 4096
ROOT_DEVICE = "/dev/vda"  # the guest's name for the disk: it is the only block device
ROOT_PARAMETER = "conode.root"  # guest/init mounts the device it names and switches its root to it


@dataclass(frozen=True)
class DiskConfig:
    """A disk for the guest (/dev/vda). Two configurations are the same machine whatever the paths: a base
    image is known by its digest (checked when a snapshot is restored), an overlay by its contents."""

    base: Path = field(compare=False)
    overlay: Path | None = field(default=None, compare=False)  # None: a fresh overlay in a temporary file
    budget_mib: int = DEFAULT_DISK_BUDGET_MIB
    read_only: bool = False
    root: bool = False  # the guest's root file system is on the disk (guest/init switches to it)

    def kernel_cmdline(self) -> str:
        """What the kernel command line says about this disk: with *root*, which device holds the root."""
        return f"{ROOT_PARAMETER}={ROOT_DEVICE}" if self.root else ""

    def open(self) -> CowDisk:
        if not 1 <= self.budget_mib <= MAX_DISK_BUDGET_MIB:
            raise DiskImageError(f"the disk budget must be between 1 and {MAX_DISK_BUDGET_MIB} MiB "
                                 f"(got {self.budget_mib})")
        base = BaseImage(self.base)
        try:
            return CowDisk(base, self.overlay, self.budget_mib << 20, self.read_only)
        except DiskImageError:
            base.close()
            raise


@dataclass(frozen=True)
class DiskConfigState:
    """The disk in a saved machine's configuration (the overlay's contents are in the machine's state)."""

    base: str = blob(max_len=MAX_PATH_CHARS)  # where the base image was; restoring may be given another path
    budget_mib: int = bounded(1, MAX_DISK_BUDGET_MIB)
    read_only: bool
    root: bool

    @classmethod
    def of(cls, config: DiskConfig | None) -> "DiskConfigState | None":
        return None if config is None else cls(str(config.base), config.budget_mib, config.read_only, config.root)

    def config(self) -> DiskConfig:
        return DiskConfig(Path(self.base), None, self.budget_mib, self.read_only, self.root)
