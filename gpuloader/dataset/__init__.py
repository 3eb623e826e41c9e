"""The seed's CPU API: HierarchicalVoxelRayDataset, its DatasetView and collate_ray_batch."""
