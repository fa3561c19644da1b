"""The guest CPU: Unicorn (stock or conode's engine), its context layout, the slicer and the Python passage.

Nothing here is imported by this package's own initialisation: the engine must be chosen (``engine``) before
any module imports ``unicorn``.
"""
