"""Which interior times t_j carry the per-pixel signal of each defect type (issue 9).

For every test crop of a category: Delta_j(p) = min_k sum_c (v(x_t, t_j) - (x - eps_k))^2 at
each of the T interior times (SPEC 3, K=8, T=24, the documented Philox noise); then the pixel
AUROC of Delta_j alone within the crops of each defect type, and of the SPEC heatmap H with the
time weight t^r for r = 0, 1, 2 (2 is the default; over all test crops it is the pixel AUROC of
`geokernels anomaly eval`). If no single t_j separates a defect type's pixels, no weighting of
the times can: the model itself does not see that defect per pixel. Runs on CUDA when there is
one. Results: benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/anomaly_per_time.py [detector.pt] [category ...]
"""
import sys

import torch

from geokernels.data.textures import TEXTURE_DEFECT_TYPES, TextureAnomalyDataset
from geokernels.metrics import auroc
from geokernels.reference.flow_mismatch import flow_mismatch_noise

from anomaly_foreign_texture import detector_and_categories  # the sibling script

K, T = 8, 24


@torch.no_grad()
def per_time_mismatch(model, x, cond):
    """(B, T, H, W): Delta_j for j = 1..T, aggregated with min over the K paths."""
    B, C, H, W = x.shape
    noise = flow_mismatch_noise(B, K, C, H, W, seed=0).to(x.device, x.dtype)
    out = []
    for j in range(1, T + 1):
        t = j / (T + 1)
        tt = torch.full((B,), t, dtype=x.dtype, device=x.device)
        deltas = [((model((1 - t) * noise[:, k] + t * x, tt, cond) - (x - noise[:, k])) ** 2)
                  .sum(1) for k in range(K)]
        out.append(torch.stack(deltas, 1).min(1).values.cpu())
    return torch.stack(out, 1)


def main(argv):
    det, categories = detector_and_categories(argv)
    if None not in det.members:
        raise SystemExit("this script reads class-conditional or single-model detectors")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = det.members[None].eval().to(device)
    size = model.config["image_size"]
    tj = torch.arange(1, T + 1, dtype=torch.float32) / (T + 1)
    print("t_j:", " ".join(f"{t:.2f}" for t in tj.tolist()))
    for cat in categories:
        ds = TextureAnomalyDataset(cat, split="test", size=size)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([s["image"] for s in items]).float()
        if det.settings["input_range"] == "[-1,1]":
            x = x * 2 - 1
        cond = None
        if model.num_classes:
            cond = torch.full((x.shape[0],), det.class_names.index(cat), dtype=torch.long,
                              device=device)
        mask = torch.stack([s["mask"][0] for s in items]).bool()
        crops = {kind: [i for i, k in enumerate(ds.defects) if k == kind]
                 for kind in TEXTURE_DEFECT_TYPES}
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        delta = per_time_mismatch(model, x, cond)
        for kind, sel in crops.items():
            row = [auroc(delta[sel, j], mask[sel]) for j in range(T)]
            print(f"{cat} {kind:16s} pixel AUROC of Delta_j:", " ".join(f"{a:.2f}" for a in row),
                  flush=True)
        for r in (0, 1, 2):
            heat = (delta * (tj ** r)[None, :, None, None]).mean(1)
            by_kind = ", ".join(f"{kind} {auroc(heat[sel], mask[sel]):.3f}"
                                for kind, sel in crops.items())
            print(f"{cat} H with t^{r}: pixel AUROC over all {len(ds)} test crops "
                  f"{auroc(heat, mask):.3f} (within each defect type's crops: {by_kind})",
                  flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    main(sys.argv[1:])
