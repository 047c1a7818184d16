"""The `bridge` command: a thin layer over the Python API."""
