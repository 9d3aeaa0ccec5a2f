"""Datasets: offline synthetic/real-photo sets and loaders for MVTec-AD / VisA folder layouts."""
# segmentation: synthetic shapes, real-photo masks, user folders
from geokernels.data.folder import SegmentationFolder
from geokernels.data.shapes import SyntheticShapes
from geokernels.data.synthetic import notebook_shape, sector_disk_mask, signed_distance

# anomaly detection: MVTec-AD, VisA, offline textures
from geokernels.data._io import DatasetError  # noqa: E402
from geokernels.data.mvtec import MVTEC_CATEGORIES, MVTecAD  # noqa: E402
from geokernels.data.textures import (TEXTURE_CATEGORIES, TEXTURE_DEFECT_TYPES,  # noqa: E402
                                      TextureAnomalyDataset, texture_categories)
from geokernels.data.visa import VISA_CATEGORIES, VisA  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]
