"""Segmentation networks for weak-label training."""
