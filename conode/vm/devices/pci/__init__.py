"""PCI: a host bridge with configuration mechanism #1, and virtio devices as PCI functions."""
