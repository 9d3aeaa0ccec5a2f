"""Anomaly-detection metrics (SPEC 3): AUROC, average precision, F1-max and AUPRO.

All four are exact: every distinct score is one threshold, and tied scores move together, exactly
as in scikit-learn (``roc_auc_score``, ``average_precision_score``, ``precision_recall_curve``)
and in the MVTec-AD evaluation code (AUPRO). Inputs may be torch tensors (CPU or CUDA), numpy
arrays or nested lists; the work runs on the input's device, results are Python floats. Scores
are scanned for NaN (an error) -- on CUDA that is one host sync per call, which a metric that
returns a Python float needs anyway. Integer scores are compared in float64 (exact below 2**53).

How it stays exact and streams
------------------------------
Each metric is a functional of the ROC / PRO curve, and that curve only changes slope where a
*positive* score sits: between two consecutive distinct positive scores the true-positive count
(and the per-region overlap) is constant, so the curve there is a horizontal run whose length is
just the number of negatives falling in that gap. So we

1. sort the positive scores and take their distinct values ``u_0 < u_1 < ... < u_{M-1}`` with
   per-value positive counts and region weights (1 / region size, for AUPRO);
2. take the negatives chunk by chunk (``chunk_size`` at a time), sort each chunk, and count with
   two ``searchsorted`` passes of ``u`` how many negatives of the chunk tie each ``u_i`` and how
   many fall strictly between ``u_{i-1}`` and ``u_i`` (2M+1 counts, summed over chunks);
3. read every metric off the resulting 2M+2 curve vertices. A tie between positives and
   negatives gives the diagonal segment scikit-learn's trapezoid draws; the horizontal runs hold
   every other vertex scikit-learn would list (collinear, so areas are unchanged).

CPU chunks are sorted with numpy (an in-place SIMD sort, much faster than ``torch.sort`` on CPU
and without an index array); CUDA chunks with ``torch.sort``.

Memory. One-shot functions: the negatives of one chunk are copied and sorted at a time (4 or 8
bytes per element, plus an int64 index per element on CUDA), plus the sorted positives (about 24
bytes per positive pixel: values, int64 order, float64 weights). ``AnomalyMetricAccumulator``:
every pixel is stored once, in its score dtype (float32: 4 bytes, float64: 8 bytes); positive
pixels additionally keep their region size as int32. Labels cost nothing (positives and
negatives go to different lists). ``compute`` sorts the stored negatives in place on the CPU (no
extra memory; CUDA: a ``chunk_size`` temporary) and needs the sorted positives as above, plus
O(M) for the curve -- never a second copy of all pixels.

AUPRO protocol (MVTec AD, Bergmann et al. 2021): regions are the 8-connected components of each
ground-truth mask (``scipy.ndimage.label`` with a full 3x3 structure, per image); PRO(t) is the
mean over all regions of the test set of the fraction of the region's pixels with score >= t;
FPR(t) is the fraction of anomaly-free pixels with score >= t. The curve (0, 0), (FPR(t), PRO(t))
for every distinct score t (descending), (1, 1) is integrated with the trapezoid rule up to
``fpr_limit``, linearly interpolated at ``fpr_limit``, and divided by ``fpr_limit``. Connected
components are labelled on the CPU (masks of CUDA inputs are copied to the host for that, as
uint8; the scores stay on the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "AnomalyMetricAccumulator",
]

_DEFAULT_CHUNK = 1 << 22          # negatives sorted per step (bounds temporaries)
_LABEL_CHUNK_PIXELS = 1 << 24      # pixels labelled per scipy call (bounds the int32 label map)
# in-plane 8-connectivity for a stack of (N, H, W) masks: no connection across images
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor, array or list of numbers: {e}") from None
    raise TypeError(f"{name} must be a torch.Tensor, numpy array or list, got {type(x).__name__}")


# Element-wise passes over CPU tensors go through numpy: single-threaded and several times faster
# than the equivalent torch CPU calls for sorting, boolean reductions and masked selection. The
# torch branches are what CUDA tensors take (tests also run them on the CPU via this switch).
_NUMPY_ON_CPU = True


def _use_numpy(t: torch.Tensor) -> bool:
    return _NUMPY_ON_CPU and t.device.type == "cpu"


def _any_nan(t: torch.Tensor) -> bool:
    if _use_numpy(t):
        return bool(np.isnan(t.numpy()).any())
    return bool(torch.isnan(t).any())


def _count_true(mask: torch.Tensor) -> int:
    if _use_numpy(mask):
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.sum())


def _select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]`` as a new 1-D tensor (both 1-D)."""
    if _use_numpy(values):
        return torch.from_numpy(values.numpy()[mask.numpy()])
    return values[mask]


def _score_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    """The dtype scores are compared in: exact for every input dtype."""
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.float32      # widening is exact
    return torch.float64          # float64 and integers (exact up to 2**53)


def _prepare_scores(x, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    t = t.to(_score_dtype(t.dtype, name))
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if _any_nan(t):
        raise ValueError(f"{name} contains NaN values")
    return t


def _prepare_binary(x, name: str, device: torch.device) -> torch.Tensor:
    """A bool tensor; ints/floats must be exactly 0 or 1 (a 0/255 mask is an error, not a guess)."""
    t = _as_tensor(x, name)
    if t.dtype.is_complex:
        raise TypeError(f"{name} must hold 0/1 values, got dtype {t.dtype}")
    if t.dtype != torch.bool:
        bad = (t != 0) & (t != 1)
        if _count_true(bad):
            value = t[bad].flatten()[0].item()
            hint = " (divide 0/255 masks by 255)" if value == 255 else ""
            raise ValueError(f"{name} must contain only 0 and 1, found {value!r}{hint}")
        t = t != 0
    return t.to(device)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _as_maps(t: torch.Tensor, name: str) -> torch.Tensor:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[1] == 1:
        return t.squeeze(1)
    raise ValueError(f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W), "
                     f"got {tuple(t.shape)}")


def _region_sizes(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For every True pixel of ``masks`` (N, H, W), in row-major order, the size of its
    8-connected region (int32, on the masks' device), and the number of regions."""
    host = masks.to("cpu", torch.uint8).numpy()
    n_images, height, width = host.shape
    per_call = max(1, _LABEL_CHUNK_PIXELS // max(1, height * width))
    pieces, total_regions = [], 0
    for start in range(0, n_images, per_call):
        block = host[start:start + per_call]
        if not block.any():
            continue
        import scipy.ndimage

        labelled, n_regions = scipy.ndimage.label(block, structure=_STRUCTURE_8)
        sizes = np.bincount(labelled.ravel())
        pieces.append(sizes[labelled[block.astype(bool)]].astype(np.int32))
        total_regions += int(n_regions)
    sizes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return torch.from_numpy(sizes).to(masks.device), total_regions


# --------------------------------------------------------------------------------------------
# the exact curve engine
# --------------------------------------------------------------------------------------------
@dataclass
class _PositiveTable:
    ascending: torch.Tensor            # (M,) distinct positive scores, ascending
    counts: torch.Tensor               # (M,) int64 positives per distinct value
    weights: torch.Tensor | None       # (M,) float64 summed region weights 1/|R| per value


def _sort(values: torch.Tensor, with_order: bool = False):
    """Ascending sort; numpy on the CPU (SIMD sort, no index array unless asked for)."""
    if _use_numpy(values):
        array = values.numpy()
        if with_order:
            order = np.argsort(array, kind="stable")
            return torch.from_numpy(array[order]), torch.from_numpy(order)
        return torch.from_numpy(np.sort(array))
    if with_order:
        return torch.sort(values, stable=True)
    return torch.sort(values).values


def _sort_in_place(values: torch.Tensor) -> torch.Tensor:
    """Sort a contiguous 1-D tensor we own: in place on the CPU, a sorted copy on CUDA."""
    if _use_numpy(values):
        values.numpy().sort()
        return values
    return torch.sort(values).values


def _positive_table(pos_scores: torch.Tensor, pos_region_sizes: torch.Tensor | None) -> _PositiveTable:
    if pos_region_sizes is None:
        values, order = _sort(pos_scores.contiguous()), None
    else:
        values, order = _sort(pos_scores.contiguous(), with_order=True)
    last_of_run = torch.ones_like(values, dtype=torch.bool)
    last_of_run[:-1] = values[1:] != values[:-1]
    ends = torch.nonzero(last_of_run).flatten()            # index of the last element of each tie run
    cum_counts = ends + 1
    counts = torch.diff(cum_counts, prepend=cum_counts.new_zeros(1))
    weights = None
    if pos_region_sizes is not None:
        # cumulative sum in the sorted order, differences at run ends: deterministic rounding
        w = pos_region_sizes[order.to(pos_region_sizes.device)].to(torch.float64).reciprocal()
        cum_w = torch.cumsum(w, 0)[ends]
        weights = torch.diff(cum_w, prepend=cum_w.new_zeros(1))
    return _PositiveTable(values[ends].contiguous(), counts, weights)


def _count_negatives(table: _PositiveTable, sorted_negatives: torch.Tensor,
                     bins: torch.Tensor) -> None:
    """Add to ``bins`` (2M+1, ascending codes) the negatives of one sorted chunk: code 2i+1 =
    "equal to u_i", code 2i = "strictly between u_{i-1} and u_i", code 2M = "above u_{M-1}"."""
    n = sorted_negatives.numel()
    if n == 0:
        return
    below = torch.searchsorted(sorted_negatives, table.ascending, right=False)   # # neg < u_i
    at_or_below = torch.searchsorted(sorted_negatives, table.ascending, right=True)
    bins[1::2] += at_or_below - below
    bins[0:-1:2] += below - torch.cat([below.new_zeros(1), at_or_below[:-1]])
    bins[-1] += n - at_or_below[-1]


@dataclass
class _Curve:
    """Vertices of the ROC / PRO curve in descending-threshold order, starting at (0, 0).

    Vertex 2d+2 is "threshold = d-th largest distinct positive score"; the others end the
    horizontal runs of negatives between two positive values (and above / below all of them).
    """
    fp: torch.Tensor               # (2M+2,) float64 cumulative false positives
    tp: torch.Tensor               # (2M+2,) float64 cumulative true positives
    pro: torch.Tensor | None       # (2M+2,) float64 cumulative region weight / number of regions
    thresholds_desc: torch.Tensor  # (M,) distinct positive scores, descending
    n_pos: int
    n_neg: int


def _make_curve(table: _PositiveTable, bins: torch.Tensor, n_pos: int, n_neg: int,
                n_regions: int | None) -> _Curve:
    m = table.ascending.numel()
    fp_steps = bins.flip(0).to(torch.float64)              # descending thresholds from here on
    tp_steps = torch.zeros(2 * m + 1, dtype=torch.float64, device=bins.device)
    tp_steps[1::2] = table.counts.flip(0).to(torch.float64)
    zero = fp_steps.new_zeros(1)
    fp = torch.cat([zero, torch.cumsum(fp_steps, 0)])
    tp = torch.cat([zero, torch.cumsum(tp_steps, 0)])
    pro = None
    if table.weights is not None:
        pro_steps = torch.zeros_like(tp_steps)
        pro_steps[1::2] = table.weights.flip(0) / n_regions
        pro = torch.cat([zero, torch.cumsum(pro_steps, 0)])
    return _Curve(fp, tp, pro, table.ascending.flip(0), n_pos, n_neg)


def _new_bins(table: _PositiveTable, device) -> torch.Tensor:
    return torch.zeros(2 * table.ascending.numel() + 1, dtype=torch.int64, device=device)


def _curve_from_arrays(scores: torch.Tensor, positive: torch.Tensor,
                       region_sizes: torch.Tensor | None = None, n_regions: int | None = None,
                       chunk_size: int = _DEFAULT_CHUNK, n_pos: int | None = None) -> _Curve:
    scores = scores.reshape(-1)
    positive = positive.reshape(-1)
    if n_pos is None:
        n_pos = _count_true(positive)
    n_neg = scores.numel() - n_pos
    _require_both_classes(n_pos, n_neg)
    table = _positive_table(_select(scores, positive), region_sizes)
    bins = _new_bins(table, scores.device)
    for start in range(0, scores.numel(), chunk_size):
        stop = start + chunk_size
        negatives = _select(scores[start:stop], ~positive[start:stop])   # a copy we own
        _count_negatives(table, _sort_in_place(negatives), bins)
    return _make_curve(table, bins, n_pos, n_neg, n_regions)


def _require_both_classes(n_pos: int, n_neg: int, what: str = "labels") -> None:
    if n_pos == 0 or n_neg == 0:
        present = "1 (anomalous)" if n_neg == 0 else "0 (normal)"
        raise ValueError(f"{what} contain only {present} entries: the metric needs both normal "
                         f"and anomalous samples")


def _auroc_from_curve(c: _Curve) -> float:
    # trapezoid rule on integer counts, normalised once (scikit-learn: auc(fpr, tpr))
    area = torch.sum(torch.diff(c.fp) * (c.tp[1:] + c.tp[:-1])) * 0.5
    return float(area) / (c.n_pos * c.n_neg)


def _ap_from_curve(c: _Curve) -> float:
    # AP = sum_n (R_n - R_{n-1}) P_n; recall only moves at positive values (vertices 2d+2)
    tp = c.tp[2::2]
    fp = c.fp[2::2]
    gained = torch.diff(tp, prepend=tp.new_zeros(1))
    return float(torch.sum(gained * (tp / (tp + fp)))) / c.n_pos


def _f1_from_curve(c: _Curve) -> tuple[float, float]:
    # F1 = 2TP / (TP + FP + P); for a fixed TP it is largest at the positive value itself
    tp = c.tp[2::2]
    fp = c.fp[2::2]
    f1 = 2 * tp / (tp + fp + c.n_pos)
    best = int(torch.argmax(f1))
    return float(f1[best]), float(c.thresholds_desc[best])


def _aupro_from_curve(c: _Curve, fpr_limit: float) -> float:
    x = (c.fp / c.n_neg).cpu()
    y = c.pro.cpu()
    # the MVTec protocol appends (1, 1); our last vertex is already (1, total PRO = 1)
    inside = int(torch.searchsorted(x, torch.tensor([fpr_limit], dtype=torch.float64),
                                    right=True))            # vertices with x <= fpr_limit
    xs, ys = x[:inside], y[:inside]
    area = float(torch.sum(torch.diff(xs) * (ys[1:] + ys[:-1]))) * 0.5
    last = inside - 1
    if inside < x.numel() and float(x[last]) < fpr_limit:
        x0, x1, y0, y1 = float(x[last]), float(x[inside]), float(y[last]), float(y[inside])
        y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y_at_limit + y0) * (fpr_limit - x0)
    return area / fpr_limit


def _check_fpr_limit(fpr_limit) -> float:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)):
        raise TypeError(f"fpr_limit must be a real number, got {type(fpr_limit).__name__}")
    v = float(fpr_limit)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return v


def _scores_and_labels(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    s = _prepare_scores(scores, "scores")
    lab = _prepare_binary(labels, "labels", s.device)
    _check_same_shape(s, lab, "scores", "labels")
    return s, lab


# --------------------------------------------------------------------------------------------
# public one-shot functions
# --------------------------------------------------------------------------------------------
def auroc(scores, labels) -> float:
    """Area under the ROC curve, exactly as ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: any shape (image scores (N,), or heatmaps (N, H, W) for pixel AUROC), higher =
            more anomalous; torch tensor (CPU/CUDA), numpy array or list. NaN is an error.
        labels: same shape, 0/1 or bool (1 = anomalous).
    Returns: a Python float. Raises ValueError if ``labels`` hold only one class.
    """
    return _auroc_from_curve(_curve_from_arrays(*_scores_and_labels(scores, labels)))


def average_precision(scores, labels) -> float:
    """Average precision, exactly as ``sklearn.metrics.average_precision_score``
    (sum over thresholds of (R_n - R_{n-1}) * P_n, one threshold per distinct score).

    Shapes as :func:`auroc`. Raises ValueError if ``labels`` hold only one class.
    """
    return _ap_from_curve(_curve_from_arrays(*_scores_and_labels(scores, labels)))


def f1_max(scores, labels, *, return_threshold: bool = False):
    """The largest F1 = 2PR/(P+R) over all thresholds (the points of
    ``sklearn.metrics.precision_recall_curve``); a pixel is positive when score >= threshold.

    Shapes as :func:`auroc`. With ``return_threshold=True`` returns ``(f1, threshold)`` (the
    highest threshold reaching the maximum).
    """
    f1, threshold = _f1_from_curve(_curve_from_arrays(*_scores_and_labels(scores, labels)))
    return (f1, threshold) if return_threshold else f1


def aupro(heatmaps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD protocol,
    SPEC 3; see the module docstring).

    Args:
        heatmaps: (H, W), (N, H, W) or (N, 1, H, W) anomaly maps, higher = more anomalous.
        masks: ground truth, same shape, 0/1 or bool. Regions are the 8-connected components
            of each image's mask.
        fpr_limit: integration limit in (0, 1] (default 0.3).
    Returns: AUPRO in [0, 1] as a Python float.
    """
    limit = _check_fpr_limit(fpr_limit)
    s = _as_maps(_prepare_scores(heatmaps, "heatmaps"), "heatmaps")
    m = _as_maps(_prepare_binary(masks, "masks", s.device), "masks")
    _check_same_shape(s, m, "heatmaps", "masks")
    n_pos = _count_true(m)
    if n_pos == 0:
        raise ValueError("masks contain no anomalous pixel: AUPRO needs at least one region")
    if n_pos == m.numel():
        raise ValueError("masks contain no normal pixel: AUPRO needs anomaly-free pixels")
    sizes, n_regions = _region_sizes(m)
    curve = _curve_from_arrays(s, m, sizes, n_regions, n_pos=n_pos)
    return _aupro_from_curve(curve, limit)


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------
class _Stream:
    """Scores of one level (image or pixel), split by label, each stored exactly once."""

    def __init__(self, with_regions: bool):
        self.with_regions = with_regions
        self.negatives: list[torch.Tensor] = []
        self.positives: list[torch.Tensor] = []
        self.region_sizes: list[torch.Tensor] = []
        self.n_regions = 0
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.n_pos = 0
        self.n_neg = 0

    def add(self, scores: torch.Tensor, positive: torch.Tensor, name: str,
            region_sizes: torch.Tensor | None = None, n_regions: int = 0) -> None:
        if self.dtype is None:
            self.dtype = scores.dtype
        if self.device is None:
            self.device = scores.device
        if scores.device != self.device:
            raise ValueError(f"{name} is on {scores.device}, earlier batches were on {self.device}")
        if scores.dtype == torch.float64 and self.dtype == torch.float32:
            raise TypeError(f"{name} is float64 but earlier batches were float32; comparing in "
                            f"float32 would round scores -- pass dtype=torch.float64 to the "
                            f"accumulator")
        scores = scores.reshape(-1).to(self.dtype)
        positive = positive.reshape(-1)
        neg = _select(scores, ~positive)
        pos = _select(scores, positive)
        if neg.numel():
            self.negatives.append(neg)
        if pos.numel():
            self.positives.append(pos)
            if self.with_regions:
                self.region_sizes.append(region_sizes)
        self.n_regions += n_regions
        self.n_pos += pos.numel()
        self.n_neg += neg.numel()

    def curve(self, chunk_size: int, what: str) -> _Curve:
        _require_both_classes(self.n_pos, self.n_neg, what)
        pos = torch.cat(self.positives)
        sizes = torch.cat(self.region_sizes) if self.with_regions else None
        table = _positive_table(pos, sizes)
        del pos, sizes
        bins = _new_bins(table, self.device)
        for neg in self.negatives:
            for start in range(0, neg.numel(), chunk_size):
                # sorting the stored chunk in place is harmless: order carries no information
                _count_negatives(table, _sort_in_place(neg[start:start + chunk_size]), bins)
        return _make_curve(table, bins, self.n_pos, self.n_neg,
                           self.n_regions if self.with_regions else None)


class AnomalyMetricAccumulator:
    """Collects a test set batch by batch and computes every SPEC-3 metric at the end.

    ``update(heatmaps=..., masks=..., image_scores=..., image_labels=...)`` takes any subset:
    pixel metrics need heatmaps + masks, image metrics need image scores + labels (when labels
    are omitted but masks are given, an image is anomalous iff its mask has an anomalous pixel).
    ``compute()`` returns a dict with ``image_auroc``, ``image_ap``, ``image_f1_max``,
    ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max`` and ``aupro`` (those with data), equal to the
    one-shot functions on the concatenated data.

    Memory: each pixel score is stored once, in float32 (float16/bfloat16/float32 inputs) or
    float64 (float64/integer inputs, or ``dtype=torch.float64``), on the device it arrived on;
    positive pixels also keep an int32 region size. ``compute`` sorts the stored negatives in
    place (CPU; on CUDA one ``chunk_size`` sorted copy at a time) and needs about 24 bytes per
    positive pixel for the sorted positives (see the module docstring). Ground-truth
    masks are labelled on the CPU in ``update`` (CUDA masks are copied to the host for that).
    """

    def __init__(self, *, fpr_limit: float = 0.3, dtype: torch.dtype | None = None,
                 chunk_size: int = _DEFAULT_CHUNK):
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.reset()

    def reset(self) -> None:
        self._pixels = _Stream(with_regions=True)
        self._images = _Stream(with_regions=False)
        for stream in (self._pixels, self._images):
            stream.dtype = self.dtype

    @property
    def num_pixels(self) -> int:
        return self._pixels.n_pos + self._pixels.n_neg

    @property
    def num_images(self) -> int:
        return self._images.n_pos + self._images.n_neg

    def update(self, *, heatmaps=None, masks=None, image_scores=None, image_labels=None) -> None:
        """Add one batch. heatmaps/masks: (N, H, W), (N, 1, H, W) or (H, W); image_scores /
        image_labels: (N,)."""
        if (heatmaps is None) != (masks is None):
            raise ValueError("heatmaps and masks must be given together")
        if heatmaps is None and image_scores is None:
            raise ValueError("update needs heatmaps + masks and/or image_scores")
        if image_labels is not None and image_scores is None:
            raise ValueError("image_labels given without image_scores")
        derived_labels = None
        if heatmaps is not None:
            s = _as_maps(_prepare_scores(heatmaps, "heatmaps"), "heatmaps")
            m = _as_maps(_prepare_binary(masks, "masks", s.device), "masks")
            _check_same_shape(s, m, "heatmaps", "masks")
            sizes, n_regions = _region_sizes(m)
            self._pixels.add(s, m, "heatmaps", sizes, n_regions)
            derived_labels = m.flatten(1).any(1)
        if image_scores is not None:
            s = _prepare_scores(image_scores, "image_scores").reshape(-1)
            if image_labels is None:
                if derived_labels is None:
                    raise ValueError("image_labels are required when no masks are given")
                lab = derived_labels.to(s.device)
            else:
                lab = _prepare_binary(image_labels, "image_labels", s.device).reshape(-1)
            if lab.numel() != s.numel():
                raise ValueError(f"image_scores and image_labels must have the same number of "
                                 f"entries, got {s.numel()} and {lab.numel()}")
            self._images.add(s, lab, "image_scores")

    def compute(self) -> dict[str, float]:
        """All metrics for the data seen so far (raises ValueError if a level with data lacks
        one of the two classes, or if nothing was added)."""
        out: dict[str, float] = {}
        if self.num_images == 0 and self.num_pixels == 0:
            raise ValueError("no data: call update() before compute()")
        if self.num_images:
            c = self._images.curve(self.chunk_size, "image_labels")
            out["image_auroc"] = _auroc_from_curve(c)
            out["image_ap"] = _ap_from_curve(c)
            out["image_f1_max"] = _f1_from_curve(c)[0]
        if self.num_pixels:
            c = self._pixels.curve(self.chunk_size, "masks")
            out["pixel_auroc"] = _auroc_from_curve(c)
            out["pixel_ap"] = _ap_from_curve(c)
            out["pixel_f1_max"] = _f1_from_curve(c)[0]
            out["aupro"] = _aupro_from_curve(c, self.fpr_limit)
        return out

