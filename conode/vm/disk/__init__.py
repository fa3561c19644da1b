"""Guest disks (cobd's backends): read-only base images shared by guests, and each guest's copy-on-write
overlay. The virtio-blk device model (conode/vm/devices/virtio/block.py) knows only the disk's interface."""
