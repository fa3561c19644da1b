"""A RAM image is shared copy-on-write: every guest mapped from it starts with its content, and what one guest
writes is seen by no other guest and never reaches the image."""

from conode.vm.cpu.unicorn_cpu import GuestRam, RamImage

SIZE = 1 << 20


def test_private_copies_start_from_the_image_and_stay_apart():
    image = RamImage(SIZE)
    with image.writable() as memory:
        memory[4096:4100] = b"boot"
    first, second = GuestRam(SIZE, image), GuestRam(SIZE, image)
    assert first.read(4096, 4) == b"boot" and second.read(0, 4) == bytes(4)
    first.view[4096:4100] = b"job1"
    assert first.read(4096, 4) == b"job1"
    assert second.read(4096, 4) == b"boot"
    assert GuestRam(SIZE, image).read(4096, 4) == b"boot"  # a later guest still gets the pristine bytes
    image.close()


def test_an_image_of_another_size_is_refused():
    image = RamImage(SIZE)
    try:
        GuestRam(2 * SIZE, image)
    except ValueError as exc:
        assert "RAM image" in str(exc)
    else:
        raise AssertionError("a RAM image of the wrong size was accepted")
    finally:
        image.close()
