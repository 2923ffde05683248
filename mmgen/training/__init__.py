"""Training: `loop` (the one training loop, `Run`), `data` (data sets and batch order), `checkpoint` (safetensors +
JSON checkpoints). Nothing is imported here, so that reading a checkpoint's checksum does not load Accelerate."""
