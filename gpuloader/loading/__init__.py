"""The path of a batch: dataset, sampler, collate, the DALI reader and pipeline, the loader."""
