"""The bottom layer: grid geometry, errors, safe output files and device choice (imports nothing of mvmm)."""
