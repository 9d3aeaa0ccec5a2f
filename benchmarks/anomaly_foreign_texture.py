"""Why pasted foreign texture is flagged per image but not delineated per pixel (issue 9).

For every foreign_texture test crop of a category, grouped by the photo the patch came from:
mean heatmap inside the mask (and on the same pixels of the defect-free crop), mean outside, the
pixel AUROC of mask pixels against the other pixels of the same crops, and the share of the
in-mask excess carried by the top 10 % of mask pixels; then, over all foreign-texture crops, the
mask split into its seam (the outer 3 pixels) and its interior, each ranked against the pixels
outside the mask. SPEC-default scoring (K=8, T=24, min, r=2, no smoothing). Results:
benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/anomaly_foreign_texture.py [detector.pt] [category ...]
"""
import sys

import numpy as np
import scipy.ndimage
import torch

import geokernels.data.textures as tx
from geokernels.metrics import auroc
from geokernels.models.detector import FlowMismatchDetector


def detector_and_categories(argv):
    """(detector on CPU, categories) from '[detector.pt] [category ...]' (default: the shipped
    detector; grass and gravel, where foreign texture is missed)."""
    torch.set_num_threads(2)
    path = argv[0] if argv and argv[0].endswith(".pt") else None
    categories = [a for a in argv if not a.endswith(".pt")] or ["grass", "gravel"]
    det = FlowMismatchDetector.load(path, device="cpu") if path else \
        FlowMismatchDetector.pretrained(device="cpu")
    return det, categories


def main(argv):
    det, categories = detector_and_categories(argv)
    size = next(iter(det.members.values())).config["image_size"]
    for cat in categories:
        ds = tx.TextureAnomalyDataset(cat, split="test", size=size)
        items, cleans, src = [], [], []
        for i, d in enumerate(ds.defects):
            if d == "foreign_texture":
                item, clean, source = ds._generate(i)   # generate + foreign_source in one draw
                items.append(item)
                cleans.append(clean)
                src.append(source)
        x = torch.stack([s["image"] for s in items])
        mask = torch.stack([s["mask"][0] for s in items]).bool()
        heat, _ = det.score(x, category=cat)
        heat_clean, _ = det.score(torch.stack(cleans), category=cat)
        for name in sorted(set(src)):
            sel = [j for j, s in enumerate(src) if s == name]
            h, m, hc = heat[sel], mask[sel], heat_clean[sel]
            excess = (h[m] - hc[m]).sort(descending=True).values
            top = excess[: max(1, excess.numel() // 10)].sum() / excess.sum()
            print(f"{cat} <- {name}: {len(sel)} crops; mean H in mask {h[m].mean():.4f} "
                  f"(same pixels, clean crop {hc[m].mean():.4f}), outside {h[~m].mean():.4f}; "
                  f"pixel AUROC within these crops {auroc(h, m):.3f}; top 10 % of mask pixels "
                  f"carry {100 * top:.0f} % of the excess", flush=True)
        interior = torch.from_numpy(np.stack(
            [scipy.ndimage.binary_erosion(m.numpy(), iterations=3) for m in mask]))
        outside = ~mask
        for part, sel in (("seam (outer 3 px of the mask)", mask & ~interior),
                          ("interior", interior)):
            keep = sel | outside
            print(f"{cat}, all sources, {part}: {int(sel.sum())} pixels, mean H "
                  f"{heat[sel].mean():.4f} vs outside {heat[outside].mean():.4f}; pixel AUROC "
                  f"against outside {auroc(heat[keep], sel[keep]):.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    main(sys.argv[1:])
