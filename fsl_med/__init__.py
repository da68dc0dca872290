"""fsl_med: few-shot medical image segmentation (DINOv2 + ALPNet) on PyTorch Lightning."""

__version__ = "0.1.0"
