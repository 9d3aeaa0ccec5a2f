"""End-to-end flow-mismatch scoring on this machine's CPU: the shipped U-Net's cost per row vs rows per
model call, and fused (several chunkings) vs the reference loop with the same model, B = 8 and 2.

    PYTHONPATH=. python benchmarks/anomaly_e2e_cpu.py [detector.pt]

Medians of 3 interleaved runs (shared CPUs are noisy); recorded in benchmarks/RESULTS.md."""
import time, sys, statistics, torch
if sys.argv[1:2] in (["-h"], ["--help"]):
    print(__doc__)
    sys.exit(0)
torch.set_num_threads(2)
from geokernels.models.detector import FlowMismatchDetector
from geokernels.data.textures import TextureAnomalyDataset
from geokernels.reference.flow_mismatch import flow_mismatch as ref_fm
import geokernels
det = FlowMismatchDetector.pretrained() if len(sys.argv) < 2 else FlowMismatchDetector.load(sys.argv[1])
ds = TextureAnomalyDataset("grass", split="test", size=64)
x8 = det._model_space(torch.stack([ds[i]["image"] for i in range(8)]))
model, ci, _ = det._member("grass")
vel = det._velocity(model, ci)
K, T = 8, 24
def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
with torch.inference_mode():
    # 1. model cost per sample vs batch rows (384 rows each)
    res = {b: [] for b in (8, 16, 32, 64)}
    for rep in range(2):
        for b in res:
            xx = x8.repeat(b // 8, 1, 1, 1)
            tt = torch.full((b,), 0.5)
            vel(xx, tt)
            res[b].append(timed(lambda: [vel(xx, tt) for _ in range(384 // b)]) / 384 * 1e3)
    for b, v in res.items():
        print(f"model rows/call {b:3d}: {min(v):.2f} ms/row (runs {[round(a, 2) for a in v]})", flush=True)
    # 2./3. end to end
    for B in (8, 2):
        x = x8[:B]
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(B, K, *x.shape[1:], generator=g)
        cfg = {"reference loop": lambda: ref_fm(vel, x, K=K, T=T, noise=noise),
               "fused chunk=2K (detector CPU default)": lambda: geokernels.flow_mismatch(vel, x, K=K, T=T, chunk=2 * K),
               "fused chunk=all": lambda: geokernels.flow_mismatch(vel, x, K=K, T=T),
               "fused chunk=K": lambda: geokernels.flow_mismatch(vel, x, K=K, T=T, chunk=K)}
        times = {k: [] for k in cfg}
        for rep in range(3):
            for k, f in cfg.items():
                times[k].append(timed(f))
        ref = statistics.median(times["reference loop"])
        for k, v in times.items():
            med = statistics.median(v)
            print(f"B={B} {k:38s} median {med:6.2f} s  x{ref / med:.2f} vs reference  (runs {[round(a, 2) for a in v]})", flush=True)
