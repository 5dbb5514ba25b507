"""How a measurement's allocation splits the bits between the attention and the MLP blocks, against each kind's
cheapest candidate (a CPU probe: is there room to move bits from one kind to the other?).

    python bench/allocation_split.py MEASUREMENT_DIR MODEL_DIR [BITS ...]

MEASUREMENT_DIR: a measurement artifact's data directory (measurement.json, sensitivity.json); MODEL_DIR: the
imported model's data directory (its config.json). Prints, per target bitrate, each kind's bits per weight and how
many of its blocks took their cheapest candidate.
"""

from __future__ import annotations

import sys
from pathlib import Path

from exlbuild.model.config import LlamaConfig
from exlbuild.quant.exl2.convert import allocate_strategy, linear_shapes
from exlbuild.quant.exl2.measurement_json import read_measurement_dir
from exlbuild.quant.exl2.options import pad_to_32


def main() -> None:
    measurement = read_measurement_dir(Path(sys.argv[1]))
    cfg = LlamaConfig.from_dir(Path(sys.argv[2]))
    targets = [float(b) for b in sys.argv[3:]] or [2.5, 3.0, 4.0]
    # Weights of one block of each kind, output widths padded as the allocation's budget counts them.
    weights = {kind: sum(s.in_features * pad_to_32(s.out_features) for name, s in linear_shapes(cfg).items()
                         if name.startswith(kind + "."))
               for kind in ("self_attn", "mlp")}
    for bits in targets:
        strategy = allocate_strategy(measurement, cfg, bits)["strategy"]
        line = [f"{bits:.2f} bpw:"]
        for kind, numel in weights.items():
            chosen = {key: entry for key, entry in strategy.items() if key.endswith("." + kind)}
            floor = {key: min(c.total_bits for c in measurement.modules[key]) for key in chosen}
            used = sum(entry["total_bits"] for entry in chosen.values())
            at_floor = sum(entry["total_bits"] == floor[key] for key, entry in chosen.items())
            line.append(f"{kind} {used / (numel * len(chosen)):.3f} bpw (cheapest {min(floor.values()) / numel:.3f}; "
                        f"{at_floor} of {len(chosen)} blocks at their cheapest)")
        print(" ".join(line))


if __name__ == "__main__":
    main()
