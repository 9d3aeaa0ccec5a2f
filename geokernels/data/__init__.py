"""Datasets: offline synthetic/real-photo sets and loaders for MVTec-AD / VisA folder layouts."""
# segmentation: synthetic shapes, real-photo masks, user folders
from geokernels.data.synthetic import notebook_shape, sector_disk_mask, signed_distance

# anomaly detection: MVTec-AD, VisA, offline textures

__all__ = [name for name in dir() if not name.startswith("_")]
