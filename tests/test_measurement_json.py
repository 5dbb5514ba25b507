"""exllamav2 measurement.json: reading, matching to a model, writing (exl2-format.md 4.6, §8 check 8)."""

import json
from dataclasses import replace

import pytest

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.measurement_json import (
    LinearShape,
    MeasuredCandidate,
    Sensitivity,
    make_measurement,
    measurement_to_json,
    parse_measurement,
    read_measurement,
    read_sensitivity,
    validate_measurement,
    write_measurement,
    write_sensitivity,
)
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES, QuantOption, option_to_json

# Summed total_bits of every candidate at SmolLM2-135M shapes, from the doc's tables (3.4).
ATTN_BITS = [1998528, 2023104, 2118144, 2477376, 2956224, 2947200, 3644352, 3647616, 3677040, 3726720,
             3831936, 3775344, 3866304, 3923328, 4811712, 4808064, 5413824, 5717376, 7183296]
MLP_BITS = [6169152, 6365760, 7007328, 7836768, 9159600, 9097152, 9756816, 11101728, 11259840, 11758512,
            11696064, 14357424, 14294976, 16219056, 17182752, 18657312, 21409824]


def smollm2_linears(layers: int = 2, hidden: int = 576, gated: bool = True) -> dict[str, LinearShape]:
    linears = {}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        linears[f"{prefix}.self_attn.q_proj"] = LinearShape(hidden, 576)
        linears[f"{prefix}.self_attn.k_proj"] = LinearShape(hidden, 192)
        linears[f"{prefix}.self_attn.v_proj"] = LinearShape(hidden, 192)
        linears[f"{prefix}.self_attn.o_proj"] = LinearShape(576, hidden)
        if gated:
            linears[f"{prefix}.mlp.gate_proj"] = LinearShape(hidden, 1536)
        linears[f"{prefix}.mlp.up_proj"] = LinearShape(hidden, 1536)
        linears[f"{prefix}.mlp.down_proj"] = LinearShape(1536, hidden)
    return linears


def exllamav2_file(layers: int = 2) -> str:
    """A measurement.json laid out as exllamav2 writes it, costs taken from the doc, not our code."""
    measurement = {}
    for i in range(layers):
        for mode, table, bits in (("self_attn", ATTN_CANDIDATES, ATTN_BITS), ("mlp", MLP_CANDIDATES, MLP_BITS)):
            measurement[f"model.layers.{i}.{mode}"] = [
                {"accuracy": 0.9 + 0.001 * j + 0.01 * i, "total_bits": bits[j]}
                | {p: option_to_json(o) for p, o in zip(table.projections, candidate)}
                for j, candidate in enumerate(table.candidates)
            ]
    measurement["model.norm.norm"] = None
    measurement["lm_head.linear"] = None
    return json.dumps({"measurement": measurement, "last_module_idx": 2 * layers + 2}, indent=4)


def test_literal_candidate_of_the_doc():
    option = '{"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}'
    candidate = (
        f'{{"accuracy": 0.9871, "total_bits": 3644352, "q_proj": {option}, "k_proj": {option}, '
        f'"v_proj": {option}, "o_proj": {option}}}'
    )
    text = f'{{"measurement": {{"model.layers.0.self_attn": [{candidate}], "lm_head.linear": null}}, "last_module_idx": 4}}'
    measurement = parse_measurement(json.loads(text))
    (parsed,) = measurement.modules["model.layers.0.self_attn"]
    assert parsed.accuracy == 0.9871 and parsed.total_bits == 3644352
    assert set(parsed.options.values()) == {QuantOption((4,), (1,), (128,))}
    # Attention candidate 6 at SmolLM2 shapes.
    linears = {k: v for k, v in smollm2_linears(1).items() if ".self_attn." in k}
    validate_measurement(measurement, linears)
    assert json.dumps(measurement_to_json(measurement)["measurement"]["model.layers.0.self_attn"][0]["q_proj"]) == option


def test_read_and_validate(tmp_path):
    path = tmp_path / "measurement.json"
    path.write_text(exllamav2_file())
    measurement = read_measurement(path)
    assert measurement.last_module_idx == 6
    assert list(measurement.modules) == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp",
        "model.norm.norm", "lm_head.linear",
    ]
    assert measurement.modules["model.norm.norm"] is None and measurement.modules["lm_head.linear"] is None
    attn = measurement.modules["model.layers.1.self_attn"]
    mlp = measurement.modules["model.layers.0.mlp"]
    assert len(attn) == 19 and len(mlp) == 17
    assert attn[6].total_bits == 3644352 and attn[6].accuracy == pytest.approx(0.916)
    assert list(attn[6].options) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert attn[6].options["v_proj"] == QuantOption((4,), (1,), (128,))
    assert mlp[4].options["down_proj"] == QuantOption((8, 4, 3), (0.05, 0.1, 0.85), (32, 128, 128))
    validate_measurement(measurement, smollm2_linears(), str(path))


@pytest.mark.parametrize(
    "linears, message",
    [
        (
            smollm2_linears(hidden=640),
            r"model.layers.0.self_attn\[0\] costs 1998528 bits in the file but \d+ at this model's shapes "
            r"\(q_proj 640×576",
        ),
        (smollm2_linears(layers=3), "module 'model.layers.2.self_attn' is not measured"),
        (smollm2_linears(layers=1), "module 'model.layers.1.self_attn' is measured but not in this model"),
        (
            smollm2_linears(gated=False),
            r"model.layers.0.mlp\[0\] has linears \['down_proj', 'gate_proj', 'up_proj'\], "
            r"this model has \['down_proj', 'up_proj'\]",
        ),
    ],
)
def test_measurement_of_another_model(linears, message):
    with pytest.raises(ExlbuildError, match="m.json: measurement of another model: " + message):
        validate_measurement(parse_measurement(json.loads(exllamav2_file())), linears, "m.json")


def test_write_round_trip(tmp_path):
    original = parse_measurement(json.loads(exllamav2_file()))
    decoder_modules = {k: v for k, v in original.modules.items() if v is not None}
    rebuilt = make_measurement(decoder_modules)
    assert rebuilt.last_module_idx == 6  # 2L + 2: embedding, 2L decoder modules, norm, head
    path = tmp_path / "out" / "measurement.json"
    path.parent.mkdir()
    write_measurement(path, rebuilt)
    assert path.read_text() == exllamav2_file()  # the same text as the file that was read
    again = read_measurement(path)
    assert measurement_to_json(again) == measurement_to_json(original)
    validate_measurement(again, smollm2_linears())


def test_prefixed_unmeasured_modules():
    candidate = MeasuredCandidate(0.99, 123, {"up_proj": QuantOption((4,), (1,), (128,))})
    measurement = make_measurement({"language_model.model.layers.0.mlp": [candidate]}, prefix="language_model.")
    assert list(measurement.modules) == [
        "language_model.model.layers.0.mlp", "language_model.model.norm.norm", "language_model.lm_head.linear",
    ]
    assert measurement.last_module_idx == 3


def _edit(change):
    obj = json.loads(exllamav2_file(1))
    change(obj["measurement"])
    return obj


MLP = "model.layers.0.mlp"


@pytest.mark.parametrize(
    "obj, message",
    [
        ([], "expected an object with a 'measurement' object"),
        ({"measurement": {}}, "last_module_idx must be an integer"),
        (_edit(lambda m: m.update({MLP: []})), r"measurement\['model.layers.0.mlp'\] must be null or a non-empty list"),
        (_edit(lambda m: m.update({MLP: {"attn": [], "mlp": []}})), "must be null or a non-empty list"),
        (_edit(lambda m: m[MLP][3].update(total_bits=1.5)), r"\[3\]: total_bits must be a positive integer"),
        (_edit(lambda m: m[MLP][3].update(accuracy="high")), r"\[3\]: accuracy must be a finite number"),
        (_edit(lambda m: m[MLP][3]["up_proj"].update(bits=[2, 3])), r"\[3\].up_proj: .*strictly decreasing"),
        (_edit(lambda m: m[MLP][2]["up_proj"]["group_size"].pop("3")), r"\[2\].up_proj: group_size keys"),
    ],
)
def test_malformed_files(obj, message):
    with pytest.raises(ExlbuildError, match=message) as error:
        parse_measurement(obj, "x.json")
    assert str(error.value).startswith("x.json: ")


def test_unreadable_files(tmp_path):
    with pytest.raises(ExlbuildError, match="cannot read the measurement"):
        read_measurement(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ExlbuildError, match="broken.json: not valid JSON"):
        read_measurement(broken)


def test_sensitivity_round_trip_and_errors(tmp_path):
    measurement = parse_measurement(json.loads(exllamav2_file()))
    modules = [k for k, v in measurement.modules.items() if v is not None]
    sensitivity = {k: Sensitivity(kl=0.01 * (i + 1), error=0.02) for i, k in enumerate(modules)}
    measured = replace(measurement, sensitivity=sensitivity)
    assert measured.sensitivity[modules[1]].weight == pytest.approx(0.02 / 0.02**2)
    path = tmp_path / "sensitivity.json"
    write_sensitivity(path, measured)
    assert read_sensitivity(path, measurement).sensitivity == sensitivity
    assert read_measurement(write_and(tmp_path, measured)).sensitivity == {}  # measurement.json stays exllamav2's

    entries = json.loads(path.read_text())["sensitivity"]
    entries.pop(modules[0])
    path.write_text(json.dumps({"sensitivity": entries}))
    with pytest.raises(ExlbuildError, match=rf"sensitivity.json: does not match its measurement: module '{modules[0]}"):
        read_sensitivity(path, measurement)
    entries[modules[0]] = {"kl": -1.0, "error": 0.1}
    path.write_text(json.dumps({"sensitivity": entries}))
    with pytest.raises(ExlbuildError, match=rf"sensitivity\['{modules[0]}'\] needs finite non-negative"):
        read_sensitivity(path, measurement)
    path.write_text("[]")
    with pytest.raises(ExlbuildError, match="expected an object with a 'sensitivity' object"):
        read_sensitivity(path, measurement)


def write_and(tmp_path, measurement):
    path = tmp_path / "measurement.json"
    write_measurement(path, measurement)
    assert path.read_text() == exllamav2_file()
    return path
