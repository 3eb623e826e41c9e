"""The path of a batch for GPURayLoader: its setup, its sources, the skip ledger, sparse batches."""
