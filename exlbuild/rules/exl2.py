"""EXL2 rules: measurement, allocation, quantized tensors, their refinement and tuning, compiled output directory.

    model ──────────────┬────────────────┬───────────────────────────┐
    calibration-measurement ─► measurement                            │
                               └─► <variant>/allocation (bits) ─┐     │
    calibration ─────────────────────────────────────────────────┴─► <variant>/quantized ─► <variant>/refined
                                                     ─► <variant>/tuned ─► <variant> (compiled)

<variant>/refined and <variant>/tuned (each from model, calibration and the tensors before it) exist only with
refine.steps > 0 (and the variant's bits below refine.below_bits) and tune.steps > 0; without them the next step
takes the tensors before.

Rules only move data between the store and the algorithms in exlbuild.quant.exl2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from exlbuild.errors import ExlbuildError
from exlbuild.graph import BuildContext, Node, Rule
from exlbuild.recipe import LoadedRecipe, VariantSpec
from exlbuild.rules.calibration import CALIBRATION_FILE, INPUT_IDS, TEXT_ROWS

STRATEGY_FILE = "strategy.json"
EXL2_FORMAT_VERSION = "0.3.2"  # the exllamav2 release whose file format the output follows


def compute_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_ids(artifact: Path):
    from safetensors.torch import load_file

    return load_file(str(artifact / CALIBRATION_FILE))[INPUT_IDS]


def load_text_ids(artifact: Path):
    """The calibration's rows of running text: the fits after GPTQ distil the model on these, not on the default
    mix's word-list and random rows, which only widen GPTQ's Hessians (docs/calibration.md, "Text rows")."""
    from safetensors.torch import load_file

    tensors = load_file(str(artifact / CALIBRATION_FILE))
    return tensors[INPUT_IDS][tensors[TEXT_ROWS]]


def model_config(model_dir: Path):
    """The model's config, after checking that EXL2 can store it and that its tokenizer fits its embedding."""
    from exlbuild.model.config import LlamaConfig
    from exlbuild.model.tokenizer import check_vocab_fits, load_tokenizer

    cfg = LlamaConfig.from_dir(model_dir)
    check_exl2_shapes(cfg, model_dir)
    check_vocab_fits(load_tokenizer(model_dir), cfg.vocab_size, model_dir)
    return cfg


def check_exl2_shapes(cfg: Any, model_dir: Path) -> None:
    """EXL2 stores rows in groups of 32 and permutations as 16-bit values (docs/exl2-format.md 2.3, 6)."""
    for name in ("hidden_size", "intermediate_size"):
        value = getattr(cfg, name)
        if value % 32 or value > 65536:
            raise ExlbuildError(f"{model_dir}/config.json: {name} = {value} cannot be stored as EXL2: the input "
                                "width of every linear layer must be a multiple of 32 and at most 65536")
    width = cfg.num_attention_heads * cfg.head_dim
    if width % 32:
        raise ExlbuildError(f"{model_dir}/config.json: attention width {width} (heads × head_dim) is not a multiple "
                            "of 32, which EXL2 needs for o_proj's input")


class Measure(Rule):
    """Every candidate's accuracy for every block (exllamav2's measurement pass)."""

    name = "exl2-measurement"
    version = 12  # 2: float16 states between blocks; 3: sensitivity.json; 4: scale search for GPTQ's loss;
    # 5: k/v Hessians weighted by the attention each token receives; 6: TF32 block passes on CUDA;
    # 7: received attention summed over slices of query positions in rows of more than ~4,000 tokens
    # 8: RMSNorm, the rotary embedding and silu(gate)·up as Triton kernels on CUDA (other float roundings)
    # 9: the block passes' attention on float16 q, k, v on CUDA (stream.pass_precision)
    # 10: the attention each token receives as Triton kernels on CUDA (kernels/attention_received.py)
    # 11: 16-bit attention on CUDA in SDPA's grouped-query mode (measured the same bits; bumped to be sure)
    # 12: GPTQ's inverse factor from one Cholesky factorization of the reversed Hessian (quant/gptq.py)
    # Accuracies and divergences in the machine's float arithmetic: another machine's differ in their last digits
    # (in float64 too). What they decide shows in the quantized tensors, which `build --frozen` compares.
    reproducible = False

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.measure import measure_model
        from exlbuild.quant.exl2.measurement_json import write_measurement_dir

        model_dir = ctx.inputs["model"]
        model_config(model_dir)
        measurement = measure_model(model_dir, load_ids(ctx.inputs["calibration"]), state_dir=ctx.state,
                                    rope_scale=ctx.params["rope"]["scale"], rope_alpha=ctx.params["rope"]["alpha"],
                                    device=compute_device(), probe_tokens=ctx.params["probe_tokens"],
                                    dtype=pass_dtype(ctx.params))
        write_measurement_dir(ctx.out, measurement)
        worst = min(max(c.accuracy for c in cands) for cands in measurement.modules.values() if cands)
        return {"modules": sum(1 for v in measurement.modules.values() if v), "worst_best_accuracy": worst}


class ImportMeasurement(Rule):
    """An existing measurement.json (exllamav2's or ours), checked against the model it is used for."""

    name = "exl2-measurement-import"
    version = 1

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.convert import decoder_linears
        from exlbuild.quant.exl2.measurement_json import read_measurement, validate_measurement, write_measurement_dir

        cfg = model_config(ctx.inputs["model"])
        source = ctx.sources["measurement"]
        measurement = read_measurement(source)
        validate_measurement(measurement, decoder_linears(cfg), str(source))
        write_measurement_dir(ctx.out, measurement)
        return {"source": str(source)}


class Allocate(Rule):
    """One candidate per block: the target bits per weight with the least predicted error."""

    name = "exl2-allocation"
    version = 3  # 2: squared-error objective; 3: weighted by the measured sensitivities
    reproducible = False  # it records the measurement's numbers and the objective (Measure says why)

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.convert import allocate_strategy
        from exlbuild.quant.exl2.measurement_json import read_measurement_dir

        cfg = model_config(ctx.inputs["model"])
        result = allocate_strategy(read_measurement_dir(ctx.inputs["measurement"]), cfg, ctx.params["bits"])
        (ctx.out / STRATEGY_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return {k: v for k, v in result.items() if k != "strategy"}


class Quantize(Rule):
    """GPTQ with each block's chosen options, layer by layer; resumes at the next unfinished layer."""

    name = "exl2-quantized"
    version = 11  # 2: float16 states between blocks; rfn_error on metric rows; 3: scale search for GPTQ's loss;
    # 4: k/v Hessians weighted by received attention; 5: TF32 block passes on CUDA; 6: as measurement 7;
    # 7: as measurement 8; 8: as measurement 9; 9: as measurement 10; 10: as measurement 11; 11: as measurement 12

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.convert import quantize_model, strategy_from_json

        model_config(ctx.inputs["model"])
        allocation = json.loads((ctx.inputs["allocation"] / STRATEGY_FILE).read_text())
        strategy = strategy_from_json(allocation["strategy"])
        rope = ctx.params["rope"]
        metrics = quantize_model(ctx.inputs["model"], load_ids(ctx.inputs["calibration"]), strategy,
                                 ctx.params["head_bits"], ctx.out, state_dir=ctx.state, rope_scale=rope["scale"],
                                 rope_alpha=rope["alpha"], device=compute_device(), dtype=pass_dtype(ctx.params))
        return {**metrics, "target_bits": allocation["bits"]}


class Refine(Rule):
    """The quantized tensors with each layer's codes, group scale maxima and norm weights fitted to the unquantized
    layer's output."""

    name = "exl2-refined"
    version = 17  # 2: a layer's fit kept only if it lowered the layer's loss over all calibration rows
    # 3: judged on held-out rows, not trained on; large layers fitted in parts (refine.weights_per_fit)
    # 4: on the calibration's text rows only
    # 5: the whole refinement dropped unless it lowered the model's next-token KL on the held-out rows
    # 6: the group multipliers scale the weights, not the linears' inputs (the fused straight-through kernels;
    #    written here in e93d08e, but the number itself stayed 5 until 7)
    # 7: the layer's norms, rotary embedding, activation, the loss and Adam's update as Triton kernels on CUDA
    # 8: the passes over all rows with float16 attention on CUDA, as measurement 9
    # 9: the model check's KL divergence as a Triton kernel on CUDA (tuned 9)
    # 10: as measurement 11
    # 11: the linears' input factors (held-out checks, linears fitted in part) as one Triton kernel each way (tuned 11)
    # 12: the steps' attention as Triton kernels on CUDA, its backward deterministic by construction (tuned 12)
    # 13: heads of 128 back on flash attention (12 sent them to the kernel, not yet timed there; tuned 13)
    # 14: the attention's dK and dV summed over query heads after their kernel, not in it (tuned 14)
    # 15: heads of 128 on the Triton attention too (tuned 15)
    # 16: the multipliers expanded to one factor per feature by one Triton kernel each way, their gradient summed
    #     over each group's features in another order (kernels/expand.py; tuned 16)
    # 17: that gradient summed in chunks of features, as a tree (tuned 17)

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.refine import refine_model

        return _fit(ctx, refine_model, weights_per_fit=ctx.params["weights_per_fit"], state_dir=ctx.state)

    def rehearse(self, node: Node, ready: dict[str, Path]) -> Callable[[], str | None] | None:
        return _rehearsal("refined", node, ready)


class Tune(Rule):
    """The quantized tensors with their fp16 group scale maxima and norm weights fitted to the unquantized model."""

    name = "exl2-tuned"
    version = 17  # 2: multipliers on input features, bfloat16 activations and a deterministic backward on CUDA;
    # 3: the calibration perplexity with float32 rotary tables on CUDA
    # 4: a plain Adam (torch.optim's fused one rounds differently)
    # 5: on the calibration's text rows only
    # 6: the FP16 model's states computed once (its weights as stored, not via float16), layers checkpointed, the
    #    KL in slices of tokens, the calibration perplexity through the block passes (TF32 on CUDA)
    # 7: the layer's norms, rotary embedding and activation and Adam's update as Triton kernels on CUDA
    # 8: the FP16 model's states with flash attention on CUDA, not cuDNN's (llama.ATTENTION_BACKENDS); the
    #    calibration perplexity's passes with float16 attention (measurement 9)
    # 9: the KL divergence and its gradient as Triton kernels on CUDA (kernels/kl_divergence.py)
    # 10: as refined 10
    # 11: the linears' input factors as one Triton kernel each way for linears that read one input (q/k/v, gate/up)
    # 12: as refined 12
    # 13: as refined 13
    # 14: as refined 14
    # 15: as refined 15
    # 16: as refined 16; the final norm's weight times its factor, and the head's factor, each rounded to the compute
    #     dtype before their product
    # 17: as refined 17

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.tune import tune_model

        return _fit(ctx, tune_model)

    def rehearse(self, node: Node, ready: dict[str, Path]) -> Callable[[], str | None] | None:
        return _rehearsal("tuned", node, ready)


def _fit(ctx: BuildContext, fit: Callable[..., dict[str, Any]], **options: Any) -> dict[str, Any]:
    """Run a fit after the quantization pass (refine_model, tune_model: the same arguments, and `options` of
    its own) from a node's inputs, on the calibration's text rows."""
    model_config(ctx.inputs["model"])
    p = ctx.params
    return fit(ctx.inputs["model"], ctx.inputs["quantized"], ctx.out, load_text_ids(ctx.inputs["calibration"]),
               p["steps"], p["lr"], p["rows_per_step"], rope_scale=p["rope"]["scale"], rope_alpha=p["rope"]["alpha"],
               device=compute_device(), **options)


def _rehearsal(fit: str, node: Node, ready: dict[str, Path]) -> Callable[[], str | None] | None:
    """The fit's rehearsal on the GPU (exlbuild.quant.exl2.rehearse), once the model is there: its first Triton
    compiles and library loads happen while the build does the work before it."""
    if "model" not in ready:
        return None
    from exlbuild.quant.exl2.rehearse import start_rehearsal

    return start_rehearsal(fit, ready["model"], node.deps["calibration"].params["length"], node.params,
                           node.info["head_bits"], compute_device())


class Compile(Rule):
    """The directory exllamav2 loads: shards, config.json with quantization_config, the model's other files."""

    name = "exl2-compiled"
    version = 1

    def run(self, ctx: BuildContext) -> dict[str, Any]:
        from exlbuild.quant.exl2.compile import compile_model

        p = ctx.params
        config = {"quant_method": "exl2", "version": EXL2_FORMAT_VERSION, "bits": p["bits"],
                  "head_bits": p["head_bits"], "calibration": p["calibration"]}
        return compile_model(ctx.inputs["quantized"], ctx.inputs["model"], ctx.out, p["shard_size"], config)


def pass_params(recipe: LoadedRecipe) -> dict[str, str]:
    """The passes' dtype as a parameter of the measurement and quantized nodes where it is not the default: a recipe
    that leaves it at float32 keeps the keys it had before passes.dtype existed."""
    dtype = recipe.spec.passes.dtype
    return {} if dtype == "float32" else {"dtype": dtype}


def pass_dtype(params: dict[str, Any]) -> Any:
    """The torch dtype of a measurement's or quantized node's passes (pass_params)."""
    import torch

    return getattr(torch, params.get("dtype", "float32"))


def measurement_node(recipe: LoadedRecipe, model: Node, calibration: Node) -> Node:
    rope = {"scale": recipe.spec.rope.scale, "alpha": recipe.spec.rope.alpha}
    if recipe.spec.measurement.file:
        return Node("measurement", "measurement", rule=ImportMeasurement(), deps={"model": model},
                    sources={"measurement": recipe.resolve(recipe.spec.measurement.file)})
    params = {"rope": rope, "probe_tokens": recipe.spec.measurement.probe_tokens, **pass_params(recipe)}
    return Node("measurement", "measurement", rule=Measure(), params=params,
                deps={"model": model, "calibration": calibration})


def variant_nodes(recipe: LoadedRecipe, name: str, variant: VariantSpec, model: Node, calibration: Node,
                  measurement: Node) -> list[Node]:
    rope = {"scale": recipe.spec.rope.scale, "alpha": recipe.spec.rope.alpha}
    info = {"bits": variant.bits, "head_bits": variant.head_bits, "format": "exl2"}
    allocation = Node(f"{name}/allocation", "allocation", rule=Allocate(), params={"bits": variant.bits},
                      deps={"measurement": measurement, "model": model}, info=info)
    quantized = Node(f"{name}/quantized", "quantized", rule=Quantize(),
                     params={"head_bits": variant.head_bits, "rope": rope, **pass_params(recipe)},
                     deps={"model": model, "calibration": calibration, "allocation": allocation}, info=info)
    made = [allocation, quantized]
    refine = dataclasses.asdict(recipe.spec.refine)
    # Whether a variant is refined at all is the graph's choice, not part of what its refined tensors are.
    below_bits = refine.pop("below_bits")
    fits = [("refined", Refine(), refine)] if variant.bits < below_bits else []
    fits.append(("tuned", Tune(), dataclasses.asdict(recipe.spec.tune)))
    for step, rule, params in fits:
        if params["steps"]:
            made.append(Node(f"{name}/{step}", step, rule=rule, params={**params, "rope": rope},
                             deps={"model": model, "calibration": calibration, "quantized": made[-1]}, info=info))
    c = recipe.spec.calibration
    dataset = f"({c.dataset})" if c.dataset in ("default", "generated") else Path(c.dataset).name
    compiled = Node(name, "compiled", rule=Compile(),
                    params={"bits": variant.bits, "head_bits": variant.head_bits, "shard_size": variant.shard_size,
                            "calibration": {"rows": c.rows, "length": c.length, "dataset": dataset}},
                    deps={"quantized": made[-1], "model": model}, export_dir=recipe.out_dir(name, variant),
                    info=info)
    return [*made, compiled]
