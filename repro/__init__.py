"""repro: AlexNet (2012) as two model-parallel towers, on today's PyTorch."""
