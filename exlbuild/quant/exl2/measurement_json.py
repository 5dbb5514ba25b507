"""exllamav2's measurement.json (docs/exl2-format.md 4.6): read, check against a model, write; and exlbuild's
sensitivity.json beside it (what each block's error costs at the model's output; exllamav2 has no such file)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.options import QuantOption, option_from_json, option_to_json, total_bits

# Modules the reference lists without measuring them (final norm and head).
UNMEASURED_MODULES = ("model.norm.norm", "lm_head.linear")


@dataclass(frozen=True, eq=False)
class MeasuredCandidate:
    """One whole-block candidate: its accuracy, its cost and the option of each of its linears."""

    accuracy: float
    total_bits: int
    options: Mapping[str, QuantOption]  # projection name (q_proj, …) → option, in file order


@dataclass(frozen=True)
class Sensitivity:
    """What one block's error costs at the model's output, from the probe of the measurement pass: with the
    probe candidate's output in place of the block's (relative error `error` on the probe rows), the model's
    next-token distribution moves by `kl` (mean KL divergence from the unquantized model, nats per token)."""

    kl: float
    error: float

    @property
    def weight(self) -> float:
        """KL per unit of squared relative error: predicted KL of any candidate = weight × (1 − accuracy)²."""
        return self.kl / self.error**2 if self.error > 0 else 0.0


@dataclass(frozen=True, eq=False)
class Measurement:
    """`modules` maps `<module key>.<mode>` (e.g. model.layers.3.self_attn) to its candidates in list
    order, or None for the unmeasured final norm and head. `sensitivity` maps measured module keys to their
    Sensitivity; it is empty for a measurement made elsewhere (exllamav2 measures no such thing)."""

    modules: Mapping[str, tuple[MeasuredCandidate, ...] | None]
    last_module_idx: int
    sensitivity: Mapping[str, Sensitivity] = field(default_factory=dict)


@dataclass(frozen=True)
class LinearShape:
    """What a linear layer's cost depends on."""

    in_features: int
    out_features: int
    bias: bool = False


def make_measurement(modules: Mapping[str, Sequence[MeasuredCandidate]], prefix: str = "",
                     sensitivity: Mapping[str, Sensitivity] | None = None) -> Measurement:
    """A complete measurement of a model's decoder modules, in module order, as the reference writes it:
    the null entries of the final norm and head appended, and `last_module_idx` the index of the head
    in its module list (embedding, the decoder modules, norm, head), i.e. 2L + 2 for L layers."""
    entries: dict[str, tuple[MeasuredCandidate, ...] | None] = {k: tuple(v) for k, v in modules.items()}
    entries.update({prefix + key: None for key in UNMEASURED_MODULES})
    return Measurement(entries, last_module_idx=len(modules) + 2, sensitivity=dict(sensitivity or {}))


# ---------------------------------------------------------------------------------------------
# JSON form


def _candidate_to_json(candidate: MeasuredCandidate) -> dict[str, Any]:
    obj: dict[str, Any] = {"accuracy": candidate.accuracy, "total_bits": candidate.total_bits}
    obj.update({name: option_to_json(option) for name, option in candidate.options.items()})
    return obj


def measurement_to_json(measurement: Measurement) -> dict[str, Any]:
    modules = {
        key: None if candidates is None else [_candidate_to_json(c) for c in candidates]
        for key, candidates in measurement.modules.items()
    }
    return {"measurement": modules, "last_module_idx": measurement.last_module_idx}


def write_measurement(path: str | Path, measurement: Measurement) -> None:
    """Write the file as the reference does (JSON, indent 4); exllamav2's -m accepts it."""
    Path(path).write_text(json.dumps(measurement_to_json(measurement), indent=4))


def _parse_candidate(obj: Any, where: str) -> MeasuredCandidate:
    if not isinstance(obj, Mapping):
        raise ExlbuildError(f"{where}: expected a candidate object, got {type(obj).__name__}")
    accuracy, bits = obj.get("accuracy"), obj.get("total_bits")
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy):
        raise ExlbuildError(f"{where}: accuracy must be a finite number, got {accuracy!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise ExlbuildError(f"{where}: total_bits must be a positive integer, got {bits!r}")
    options = {
        name: option_from_json(value, f"{where}.{name}")
        for name, value in obj.items()
        if name not in ("accuracy", "total_bits")
    }
    if not options:
        raise ExlbuildError(f"{where}: the candidate names no linear layer")
    return MeasuredCandidate(float(accuracy), bits, options)


def parse_measurement(obj: Any, source: str = "measurement.json") -> Measurement:
    """Plain data from the decoded JSON; errors name `source` and the offending key."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("measurement"), Mapping):
        raise ExlbuildError(f"{source}: expected an object with a 'measurement' object")
    last = obj.get("last_module_idx")
    if isinstance(last, bool) or not isinstance(last, int):
        raise ExlbuildError(f"{source}: last_module_idx must be an integer, got {last!r}")
    modules: dict[str, tuple[MeasuredCandidate, ...] | None] = {}
    for key, value in obj["measurement"].items():
        if value is None:
            modules[key] = None
        elif isinstance(value, list) and value:
            where = f"{source}: measurement[{key!r}]"
            modules[key] = tuple(_parse_candidate(c, f"{where}[{i}]") for i, c in enumerate(value))
        else:
            # Parallel-decoder models ({"attn": [...], "mlp": [...]}) are not supported.
            raise ExlbuildError(f"{source}: measurement[{key!r}] must be null or a non-empty list of candidates")
    return Measurement(modules, last)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ExlbuildError(f"{path}: cannot read the {what} ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ExlbuildError(f"{path}: not valid JSON ({e})") from e


def read_measurement(path: str | Path) -> Measurement:
    """measurement.json alone (no sensitivity: see read_sensitivity)."""
    return parse_measurement(_read_json(Path(path), "measurement"), str(path))


def write_sensitivity(path: str | Path, measurement: Measurement) -> None:
    obj = {key: {"kl": s.kl, "error": s.error, "weight": s.weight} for key, s in measurement.sensitivity.items()}
    Path(path).write_text(json.dumps({"sensitivity": obj}, indent=2) + "\n")


def read_sensitivity(path: str | Path, measurement: Measurement) -> Measurement:
    """`measurement` with the sensitivity.json at `path`, which must cover exactly its measured modules."""
    obj = _read_json(Path(path), "sensitivity")
    entries = obj.get("sensitivity") if isinstance(obj, Mapping) else None
    if not isinstance(entries, Mapping):
        raise ExlbuildError(f"{path}: expected an object with a 'sensitivity' object")
    measured = {k for k, v in measurement.modules.items() if v is not None}
    if set(entries) != measured:
        odd = sorted(set(entries) ^ measured)
        raise ExlbuildError(f"{path}: does not match its measurement: module {odd[0]!r} is in only one of them")
    sensitivity = {}
    for key, value in entries.items():
        kl, error = (value.get(k) if isinstance(value, Mapping) else None for k in ("kl", "error"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in (kl, error)):
            raise ExlbuildError(f"{path}: sensitivity[{key!r}] needs finite non-negative 'kl' and 'error', "
                                f"got {value!r}")
        sensitivity[key] = Sensitivity(float(kl), float(error))
    return replace(measurement, sensitivity=sensitivity)


MEASUREMENT_FILE = "measurement.json"
SENSITIVITY_FILE = "sensitivity.json"  # exlbuild's measurements only (quant/exl2/measure.py)


def write_measurement_dir(directory: Path, measurement: Measurement) -> None:
    """measurement.json, and sensitivity.json beside it where the measurement has sensitivities."""
    write_measurement(directory / MEASUREMENT_FILE, measurement)
    if measurement.sensitivity:
        write_sensitivity(directory / SENSITIVITY_FILE, measurement)


def read_measurement_dir(directory: Path) -> Measurement:
    """What write_measurement_dir wrote: without a sensitivity.json (an imported exllamav2 measurement) the
    measurement has no sensitivities."""
    measurement = read_measurement(directory / MEASUREMENT_FILE)
    if (directory / SENSITIVITY_FILE).is_file():
        measurement = read_sensitivity(directory / SENSITIVITY_FILE, measurement)
    return measurement


# ---------------------------------------------------------------------------------------------
# Matching a measurement to a model


def validate_measurement(
    measurement: Measurement, linears: Mapping[str, LinearShape], source: str = "measurement"
) -> None:
    """Check that the measurement belongs to a model whose quantized decoder linears are `linears`
    (full keys such as model.layers.0.self_attn.q_proj, in model order; not the head). Dense models:
    MoE experts and parallel-decoder blocks are not matched.

    Every module of those linears must be measured, with each candidate naming exactly the module's
    linears and costing what the options cost at this model's shapes; no other module may be measured.
    Raises ExlbuildError naming the first mismatch.
    """
    expected: dict[str, dict[str, LinearShape]] = {}
    for key, shape in linears.items():
        module, _, projection = key.rpartition(".")
        expected.setdefault(module, {})[projection] = shape

    def foreign(detail: str) -> ExlbuildError:
        return ExlbuildError(f"{source}: measurement of another model: {detail}")

    for module, shapes in expected.items():
        candidates = measurement.modules.get(module)
        if candidates is None:
            raise foreign(f"module {module!r} is not measured")
        for i, candidate in enumerate(candidates):
            if set(candidate.options) != set(shapes):
                raise foreign(f"{module}[{i}] has linears {sorted(candidate.options)}, this model has {sorted(shapes)}")
            cost = sum(
                total_bits(candidate.options[p], s.in_features, s.out_features, s.bias) for p, s in shapes.items()
            )
            if cost != candidate.total_bits:
                layout = ", ".join(f"{p} {s.in_features}×{s.out_features}" for p, s in shapes.items())
                raise foreign(
                    f"{module}[{i}] costs {candidate.total_bits} bits in the file but {cost} at this model's "
                    f"shapes ({layout})"
                )
    extra = [k for k, v in measurement.modules.items() if v is not None and k not in expected]
    if extra:
        raise foreign(f"module {extra[0]!r} is measured but not in this model")
