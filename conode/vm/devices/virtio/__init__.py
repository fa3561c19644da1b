"""Paravirtual devices over virtio-mmio: the transport, split virtqueues, and each device with its backend."""
