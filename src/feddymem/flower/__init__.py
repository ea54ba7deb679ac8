"""FedDyMem over Flower (``pip install feddymem[flower]``): a ServerApp and a ClientApp that reuse the
engine-neutral federation (strategies, server, client runner, checkpoints, reports), typed records on the
wire, and a loopback launcher with TLS and SuperNode authentication."""
