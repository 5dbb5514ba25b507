"""Time the bit allocator on an 80-layer model (hidden 4096, MLP 14336, GQA k/v 1024) at several targets.

Costs: the bpw spread of the reference candidate lists (docs/exl2-format.md 3.4) times each block's weight
count, with a little per-layer jitter; errors fall off exponentially with bpw, vary by layer and carry noise,
so some candidates are dominated as in real measurements. Seeded: the same instance on every run.

    python bench/allocate_bench.py
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # measure one core

import time

import numpy as np

from exlbuild.quant.allocate import allocate

ATTN_BPW = [2.2589, 2.2867, 2.3941, 2.8001, 3.3414, 3.3312, 4.1191, 4.1228, 4.1561, 4.2122,
            4.3312, 4.2672, 4.3700, 4.4345, 5.4386, 5.4345, 6.1191, 6.4622, 8.1191]
MLP_BPW = [2.3243, 2.3984, 2.6401, 2.9526, 3.4510, 3.4274, 3.6760, 4.1827, 4.2423, 4.4301,
           4.4066, 5.4093, 5.3858, 6.1107, 6.4738, 7.0293, 8.0664]
LAYERS, HIDDEN, KV, INTER = 80, 4096, 1024, 14336


def instance(seed: int = 0) -> tuple[list[list[int]], list[list[float]], int]:
    rng = np.random.default_rng(seed)
    attn_numel = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV
    mlp_numel = 3 * HIDDEN * INTER
    costs, errors = [], []
    for layer in range(LAYERS):
        edge = 1.0 + 2.0 * np.exp(-layer / 4) + np.exp(-(LAYERS - 1 - layer) / 4)  # first/last layers matter more
        for bpw, numel, scale in ((ATTN_BPW, attn_numel, 0.02), (MLP_BPW, mlp_numel, 0.05)):
            bpw = np.array(bpw) * (1 + 0.002 * rng.standard_normal(len(bpw)))
            costs.append([int(b * numel) for b in bpw])
            err = scale * edge * rng.uniform(0.7, 1.4) * np.exp(-0.9 * (bpw - 2.2))
            errors.append(np.clip(err * (1 + 0.05 * rng.standard_normal(len(bpw))), 1e-6, 1.0).tolist())
    numel = LAYERS * (attn_numel + mlp_numel)
    return costs, errors, numel


def main() -> None:
    costs, errors, numel = instance()
    print(f"{LAYERS} layers, {len(costs)} slots, {numel / 1e9:.2f}G weights")
    print(" target   bpw      time     gap/objective  grid loss (bpw)")
    for bits in (2.5, 3.0, 3.5, 4.0, 4.65, 5.0, 6.0, 8.0):
        budget = int(numel * bits)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            result = allocate(costs, errors, budget, numel=numel)
            times.append(time.perf_counter() - start)
        print(f"{bits:6.2f}  {result.cost / numel:.4f}  {min(times) * 1e3:6.0f} ms  "
              f"{result.gap / result.objective:12.2e}  {result.grid_loss_bits / numel:.5f}")


if __name__ == "__main__":
    main()
