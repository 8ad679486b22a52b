"""The model and its training: the U-Net, Keras fit and its callbacks, the multi-worker loop, the distribution
plan, the cluster of workers and the backend runtime (seeds, precision, devices)."""
