"""Framework-free inference core: tiling and stitching, normalisation, metrics, model metadata.

Everything here depends on NumPy only, so the offline training pipeline imports the very same
code for its evaluation (one implementation, no copies).
"""
