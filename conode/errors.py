"""The project's exceptions: one base class, messages that tell the user what to do."""


class ConodeError(Exception):
    """Base of every error a conode user can meet; its message is one line meant for a person."""


class GuestImageError(ConodeError):
    """The guest kernel or initramfs is missing, corrupt or unusable."""


class DiskImageError(ConodeError):
    """A guest disk's base image or overlay is missing, damaged or does not fit the guest."""


class SnapshotError(ConodeError):
    """A snapshot file cannot be written or is not a valid conode snapshot."""


class GuestCrashed(ConodeError):
    """The guest stopped in a way it cannot continue from (kernel panic, triple fault, CPU error)."""


class GuestTimeout(ConodeError):
    """The guest did not reach an expected point within the allowed time."""


class EngineError(ConodeError):
    """The CPU engine (Unicorn) is missing, of an unsupported version, or misbehaved."""
