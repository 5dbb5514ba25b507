"""Files written by exllamav2 0.3.2's own converter (tests/fixtures, made by bench/exl2_compat.py on the GPU
machine from a random tiny Llama: hidden 256, intermediate 512, 4 heads, 2 KV heads, 2 layers, vocab 1024)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from exlbuild.quant.allocate import allocate
from exlbuild.quant.exl2.measurement_json import (LinearShape, measurement_to_json, parse_measurement,
                                                  read_measurement, validate_measurement)
from exlbuild.quant.exl2.pack import dequantize, validate_layer

FIXTURES = Path(__file__).parent / "fixtures"
LAYERS = {"model.layers.0.self_attn.q_proj": (256, 256), "model.layers.1.mlp.down_proj": (512, 256),
          "lm_head": (256, 1024)}


def test_our_decoder_reproduces_exllamav2s_reconstruction_bit_for_bit():
    data = load_file(str(FIXTURES / "exl2_reference.safetensors"))
    for key, (k, n) in LAYERS.items():
        tensors = {name.rsplit(".", 1)[1]: t for name, t in data.items() if name.startswith(key + ".q_")}
        validate_layer(tensors, layer=key, in_features=k, out_features=n, bias=False)
        ours = dequantize(tensors, out_features=n, layer=key)  # (out, in) fp16
        theirs = data[f"{key}.exllamav2_dq"][:, :n].T  # exllamav2 reconstructs (in, out padded)
        assert torch.equal(ours, theirs), key
        original = data[f"{key}.original"].float()
        error = (ours.float() - original).norm() / original.norm()
        # Gaussian random weights at the options exllamav2 chose (2-3 bits for layer 0's attention: 0.42;
        # 4-bit and more elsewhere: about 0.1); a wrong row order or scale would give errors near 1.4.
        assert error < 0.5, (key, float(error))


def tiny_linears() -> dict[str, LinearShape]:
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (256, 128), "self_attn.v_proj": (256, 128),
              "self_attn.o_proj": (256, 256), "mlp.gate_proj": (256, 512), "mlp.up_proj": (256, 512),
              "mlp.down_proj": (512, 256)}
    return {f"model.layers.{i}.{p}": LinearShape(k, n) for i in range(2) for p, (k, n) in shapes.items()}


def test_exllamav2_measurement_reads_validates_round_trips_and_allocates():
    path = FIXTURES / "exllamav2_tiny_measurement.json"
    m = read_measurement(path)
    validate_measurement(m, tiny_linears(), str(path))  # our bit accounting equals theirs for every candidate
    assert [len(m.modules[f"model.layers.{i}.{b}"]) for i in range(2) for b in ("self_attn", "mlp")] == [19, 17, 19, 17]
    assert m.last_module_idx == 6
    again = parse_measurement(json.loads(json.dumps(measurement_to_json(m))))
    assert measurement_to_json(again) == measurement_to_json(m)
    blocks = [m.modules[k] for k in m.modules if m.modules[k]]
    numel = sum(s.in_features * s.out_features for s in tiny_linears().values())
    solution = allocate([[c.total_bits for c in b] for b in blocks], [[1 - c.accuracy for c in b] for b in blocks],
                        int(numel * 4.0))
    assert solution.cost <= numel * 4.0 and solution.cost / numel > 3.9
