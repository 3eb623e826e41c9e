"""Where rays and grids live: npz files, the ray pack, the voxel cache, store layouts and
budgets, resident stores."""
