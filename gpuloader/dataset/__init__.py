"""The seed's CPU API: HierarchicalVoxelRayDataset and collate_ray_batch."""
