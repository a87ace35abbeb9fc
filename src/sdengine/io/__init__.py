"""Cross-cutting input/output helpers: paths inside configured folders, atomic writes, images."""
