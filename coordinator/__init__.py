"""The conode coordinator: node registry, job queue, placement, and the admin CLI."""
