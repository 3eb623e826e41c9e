"""Where rays and grids live: npz files, the packed memory-mapped store, the voxel cache."""
