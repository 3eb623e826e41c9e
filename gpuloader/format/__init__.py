"""The on-disk format: paths of the layout, the dataset index (metadata, splits, ray tree)."""
