"""Data layer: records, text, images and the dataset loaders (imports nothing else of imcap but errors)."""
