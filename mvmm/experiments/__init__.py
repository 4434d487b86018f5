"""Reproducible experiments on public data sets (described in ``data_manifests/``)."""
