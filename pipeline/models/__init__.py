"""Networks: backbones (ResNet, EfficientNet-Lite0/1/2), the CAM classifier and the DeepLab/U-Net
segmenter, and the networks of refine's learned walks (AffinityNet, IRNet's boundary map)."""
