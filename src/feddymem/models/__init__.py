"""The model in plain PyTorch: backbone, generator, loss, anomaly map, the pure-torch FedDyMemModel."""
