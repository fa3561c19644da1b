"""The machine's devices: the legacy PC parts the kernel needs, and conode's paravirtual devices."""
