"""Sources of an epoch's batches for GPURayLoader: a resident store, the pack stream and
the sample stream."""
