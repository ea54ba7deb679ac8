"""Federation: the server's aggregation step, checkpoints and the Lightning Fabric orchestrator."""
