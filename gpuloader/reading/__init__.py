"""What runs in worker processes: the sample reader, the DALI pipeline, worker health,
header estimates and the store fill."""
