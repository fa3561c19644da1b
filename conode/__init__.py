"""conode: idle office workstations as a compute pool of cooperative Linux guests."""

__version__ = "0.1.0"
