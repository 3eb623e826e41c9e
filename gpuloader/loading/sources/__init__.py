"""Sources of an epoch's batches for GPURayLoader (the contract: :mod:`.base`): a resident
store (:mod:`.resident`), the pack stream (:mod:`.pack_stream`) and the sample stream
(:mod:`.sample_stream`), built from the loader's setup by :mod:`.make`; every one ends in the
fused pass and the one builder of the batch dict (:mod:`.batch_dict`)."""
