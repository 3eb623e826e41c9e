"""Augmentation: cube symmetries, counter-based randomness, per-sample plans, the seed's
transforms, and the numpy and CUDA back ends that apply them."""
