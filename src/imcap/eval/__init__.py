"""Scoring layer: the COCO caption toolkit's metrics, the CIDEr-D training reward, figures (uses data)."""
