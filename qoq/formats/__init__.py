"""The artifact format: kernel layout, reading and writing, and exports for serving engines."""
