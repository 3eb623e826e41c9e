"""The order of an epoch and every decision in it: the sampler, resume states, replacements of
bad samples, the epoch and batch plans."""
