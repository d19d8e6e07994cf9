"""Training infrastructure shared by classification, detection and segmentation: steps, checkpoints, logs."""
