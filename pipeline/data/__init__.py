"""Data sets in the VOC folder layout: reading and checking them, image-level labels, 3-D
volumes of 2-D slices, the training-time augmentation, and the synthetic demo data set."""
