"""`moekit plan`: size a model before buying hardware.

Parameters, FLOPs and MFU, the scaling law, KV cache, memory per device for training and
inference, and the upcycle-or-scratch advice, as rich tables, or as JSON on stdout with
``--json``. The numbers come from moekit.plan; this module only reads the inputs and prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from moekit.cli.values import byte_size
from moekit.config import ModelConfig, MoEConfig, preset, read_config_file
from moekit.convert.hf_folder import read_hf_config
from moekit.model import read_model_config
from moekit.plan import (GIB, INFERENCE_DTYPES, Layout, Precision, budget_plan,
                         count_parameters, device, inference_memory, kv_cache_plan,
                         offload_plan,
                         plan_stages, training_compute, training_flops_per_token,
                         training_memory, uniform_stages, upcycle_or_scratch, utilisation)
from moekit.plan.inference import inference_weight_bytes
from moekit.plan.simulate import Link, Machine, simulate_step
from moekit.plan.units import DTYPE_BYTES

# Where the field flags land in the parsed arguments: --hidden-size in model_hidden_size,
# --moe-top-k in moe_layer_top_k (kept apart from the other flags' names).
MODEL_FIELD = "model_"
MOE_FIELD = "moe_layer_"


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: expected true or false")


def _parser_of(annotation: str):
    """The argparse type of a config field, from its (string) annotation."""
    for prefix, parse in (("bool", _boolean), ("int", int), ("float", float)):
        if annotation.startswith(prefix):
            return parse
    return str


def _integer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None


def _override_flags(group, config_class, flag_prefix: str, dest_prefix: str) -> None:
    for field in dataclasses.fields(config_class):
        if field.name == "moe" or (config_class is MoEConfig and field.name == "hidden_size"):
            continue  # the MoE layers' hidden_size always follows the model's
        group.add_argument(f"--{flag_prefix}{field.name.replace('_', '-')}",
                           dest=dest_prefix + field.name, type=_parser_of(field.type),
                           metavar=field.type.split(" ")[0].upper(), default=None)


def register(subcommands) -> None:
    parser = subcommands.add_parser(
        "plan", help="parameters, FLOPs, MFU, KV cache, memory and scaling of a model",
        description="Size an MoE model: parameters, training FLOPs and MFU, KV cache, memory per "
                    "device for training and inference, the Hunyuan scaling law and the "
                    "upcycle-or-scratch advice. Formulas: docs/plan.md.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a model preset (e.g. skywork-moe-146b)")
    source.add_argument("--config", help="a JSON/TOML/YAML file holding a model config, or a "
                                         "moekit checkpoint folder")
    source.add_argument("--hf-config", metavar="PATH",
                        help="a Hugging Face config.json, or a folder holding one: the model "
                        "`moekit import` maps it onto (a family or feature moekit cannot hold "
                        "is refused naming the key)")
    overrides = parser.add_argument_group(
        "model fields", "override a field of the model (or, with --moe-*, of its MoE layers)")
    _override_flags(overrides, ModelConfig, "", MODEL_FIELD)
    _override_flags(overrides, MoEConfig, "moe-", MOE_FIELD)
    overrides.add_argument("--dense", action="store_true", help="plan the dense variant")

    work = parser.add_argument_group("training workload")
    work.add_argument("--seq-len", type=int, help="sequence length (default: max_seq_len)")
    work.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    work.add_argument("--tokens", type=float, help="training tokens D: total compute")
    work.add_argument("--budget-flops", type=float,
                      help="compute budget C: tokens it buys under the Hunyuan fit")
    work.add_argument("--tokens-per-second", type=float,
                      help="measured training tokens/s per device: MFU")
    work.add_argument("--device", help="accelerator (a100, a800, h100, h800, h200, rtx4090, "
                                       "l40s, mi300x): peak FLOP/s and memory")
    work.add_argument("--peak-tflops", type=float, help="dense BF16 peak per device (overrides "
                                                        "the device's)")
    work.add_argument("--device-memory-gib", type=float,
                      help="memory per device in GiB (overrides the device's)")

    layout = parser.add_argument_group("layout (training memory)")
    layout.add_argument("--world-size", type=int, default=1,
                        help="devices (training: data = world / (tensor x pipeline))")
    layout.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree")
    layout.add_argument("--pipeline", type=int, default=1, help="pipeline stages")
    layout.add_argument("--expert", type=int, default=1, help="expert-parallel degree")
    layout.add_argument("--stage-layers", type=_integer_list,
                        help="layers per pipeline stage, e.g. 5,5,5,5,4 (default: even, or the "
                        "planned non-uniform split when no even one exists)")
    layout.add_argument("--pipeline-micro-batches", type=int, metavar="M",
                        help="micro-batches per step for the pipeline's predicted step time "
                        "(default 4 x pipeline)")
    layout.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                        help="ZeRO stage: 1 shards optimizer states, 2 + gradients, 3 + weights")
    layout.add_argument("--recompute", action="store_true",
                        help="full activation recomputation (the total counts it)")
    layout.add_argument("--weight-bytes", type=int, default=2)
    layout.add_argument("--grad-bytes", type=int, default=2)
    layout.add_argument("--optimizer-bytes", type=int, default=12,
                        help="per parameter (default 12: fp32 master weights + Adam moments)")

    simulate = parser.add_argument_group(
        "step-time simulation (--simulate; moekit/plan/simulate.py, docs/parallel.md)",
        "the layout flags above, the device's peak (--device or --peak-tflops) at a stated "
        "--efficiency, and the links' bandwidths; no input is fitted")
    simulate.add_argument("--simulate", action="store_true",
                          help="predict the step time of the layout, part by part")
    simulate.add_argument("--efficiency", type=float,
                          help="share of the peak the model's FLOPs reach (e.g. 0.5)")
    simulate.add_argument("--link-gbps", type=float, default=100.0,
                          help="bandwidth inside a node, GB/s per device (default 100)")
    simulate.add_argument("--link-between-gbps", type=float, default=25.0,
                          help="bandwidth between nodes, GB/s per device (default 25)")
    simulate.add_argument("--link-latency-us", type=float, default=10.0,
                          help="latency per message, microseconds (default 10)")
    simulate.add_argument("--devices-per-node", type=int, default=8)
    simulate.add_argument("--copy-gbps", type=float,
                          help="bytes a row gather reads and writes on the device, GB/s: "
                          "prices the dispatch's copies (default: not modelled)")
    simulate.add_argument("--expert-load", type=float, metavar="LOAD",
                          help="rows the busiest rank of an expert group computes over the "
                          "group's mean (>= 1); every rank waits for it at each MoE layer "
                          "(default: the model's capacity factor, which bounds it, or 1 when "
                          "dropless)")

    serve = parser.add_argument_group("inference")
    serve.add_argument("--infer-dtype", nargs="+", choices=INFERENCE_DTYPES,
                       default=list(INFERENCE_DTYPES), help="weight formats to compare")
    serve.add_argument("--kv-dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    serve.add_argument("--kv-batch", type=int, default=1, help="sequences in the KV cache")
    serve.add_argument("--kv-context", type=int, help="tokens per sequence (default: seq len)")
    serve.add_argument("--expert-memory", type=byte_size, metavar="SIZE",
                       help="plan serving on one device with the routed experts offloaded and "
                       "a cache of SIZE bytes of them (GB = 10^9, GiB = 2^30); default, with "
                       "--device: the memory the resident part leaves")
    serve.add_argument("--hit-rate", type=float, metavar="H",
                       help="share of routes the expert cache serves, 0 to 1, for the bytes "
                       "moved per token (default: the uniform-routing estimate, cached / all "
                       "experts)")

    upcycle = parser.add_argument_group("upcycle or train from scratch (Skywork-MoE)")
    upcycle.add_argument("--upcycle", action="store_true",
                         help="advise: compare the MoE budget to the dense model's compute")
    upcycle.add_argument("--dense-tokens", type=float,
                         help="tokens the dense model (the MoE's dense variant) was trained on")
    upcycle.add_argument("--moe-tokens", type=float, help="tokens planned for the MoE")

    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(run=run)


def model_config(args) -> ModelConfig:
    """The model of --preset, --config or --hf-config, with the field flags applied."""
    if args.preset:
        values = preset(args.preset).to_dict()
    elif args.config:
        values = _config_from_path(args.config)
    elif args.hf_config:
        values = read_hf_config(args.hf_config)[1].to_dict()
    else:
        values = {}
    moe = dict(values.get("moe") or {})
    for name, value in vars(args).items():
        if value is not None and name.startswith(MOE_FIELD):
            moe[name.removeprefix(MOE_FIELD)] = value
        elif value is not None and name.startswith(MODEL_FIELD):
            values[name.removeprefix(MODEL_FIELD)] = value
    values["moe"] = None if args.dense or not moe else {**moe,
                                                         "hidden_size": values.get("hidden_size")}
    try:
        return ModelConfig.from_dict(values)
    except TypeError as error:  # a field without a default is missing
        raise ValueError(f"the model is incomplete ({error}): give --preset, --config, or "
                         "flags for every required field") from None


def _config_from_path(path: str) -> dict:
    if os.path.isdir(path):
        return read_model_config(path).to_dict()
    values = read_config_file(path)
    # A moekit config.json holds the model under "model"; a plain config file is the model.
    return values["model"] if isinstance(values.get("model"), dict) else values


def _device_figures(args) -> tuple[float | None, float | None]:
    """(peak FLOP/s, memory in GiB) per device, from --device and its overrides."""
    known = device(args.device) if args.device else None
    peak = _given_or(args.peak_tflops, known and known.peak_tflops)
    memory = _given_or(args.device_memory_gib, known and known.memory_gib)
    return (None if peak is None else peak * 1e12), memory


def _given_or(value, default):
    """The flag's value when given (0 included: the library rejects it by name), else the
    default."""
    return default if value is None else value


def build_plan(args) -> dict:
    """Every section the inputs allow, as moekit.plan dataclasses, by name."""
    config = model_config(args)
    seq_len = _given_or(args.seq_len, config.max_seq_len)
    peak_flops, memory_gib = _device_figures(args)
    flops = training_flops_per_token(config, seq_len)
    plan = {"model": config, "parameters": count_parameters(config), "flops_per_token": flops}
    if peak_flops is not None or memory_gib is not None:
        plan["device"] = {"name": args.device, "peak_flops": peak_flops, "memory_gib": memory_gib}
    if args.tokens is not None:
        plan["training_compute"] = training_compute(flops, args.tokens)
    if args.tokens_per_second is not None:
        if peak_flops is None:
            raise ValueError("--tokens-per-second needs --device or --peak-tflops for the peak")
        plan["utilisation"] = utilisation(flops, args.tokens_per_second, peak_flops)
    if args.budget_flops is not None:
        plan["scaling_law"] = budget_plan(args.budget_flops, flops.active_params)
    plan["kv_cache"] = kv_cache_plan(config, args.kv_batch, _given_or(args.kv_context, seq_len),
                                     args.kv_dtype)
    stage_layers = args.stage_layers
    if args.pipeline > 1:
        plan["pipeline_split"] = _pipeline_split(config, args, seq_len, peak_flops)
        if stage_layers is None and config.num_layers % args.pipeline:
            # no even split exists: the memory is that of the planned one
            stage_layers = plan["pipeline_split"]["planned"]["stage_layers"]
    layout = Layout.for_world(args.world_size, args.tensor, args.pipeline, args.expert,
                              stage_layers)
    precision = Precision(args.weight_bytes, args.grad_bytes, args.optimizer_bytes,
                          zero_stage=args.zero)
    plan["training_memory"] = training_memory(config, layout, precision, args.micro_batch,
                                              seq_len, args.recompute)
    plan["inference_memory"] = (
        [inference_memory(config, dtype, args.world_size, memory_gib, args.kv_dtype)
         for dtype in args.infer_dtype] if memory_gib is not None
        else [{"dtype": dtype, "weight_bytes": inference_weight_bytes(config, dtype),
               "devices": args.world_size} for dtype in args.infer_dtype])
    if config.moe is not None and (memory_gib is not None or args.expert_memory is not None):
        plan["offload"] = [offload_plan(config, dtype, memory_gib, args.expert_memory,
                                        args.hit_rate) for dtype in args.infer_dtype]
    elif args.expert_memory is not None or args.hit_rate is not None:
        raise ValueError("--expert-memory and --hit-rate plan offloaded routed experts: they "
                         "need an MoE model, and --device, --device-memory-gib or "
                         "--expert-memory for the cache")
    if args.simulate:
        plan["simulation"] = _simulation(config, layout, args, seq_len, peak_flops)
    if args.upcycle:
        plan["upcycle"] = _upcycle(config, args, seq_len)
    return plan


def _simulation(config: ModelConfig, layout: Layout, args, seq_len: int,
                peak_flops: float | None) -> dict:
    """The predicted step, and how it moves when each input is halved or doubled."""
    if peak_flops is None or args.efficiency is None:
        raise ValueError("--simulate needs the device's peak (--device or --peak-tflops) and "
                         "--efficiency (the share of it the model reaches)")
    micro_batches = _given_or(args.pipeline_micro_batches, 4 * args.pipeline)
    inputs = {"efficiency": args.efficiency, "link_gbps": args.link_gbps,
              "link_between_gbps": args.link_between_gbps, "micro_batches": micro_batches}
    if args.copy_gbps is not None:
        inputs["copy_gbps"] = args.copy_gbps
    capacity = config.moe.capacity_factor if config.moe is not None else None
    expert_load = _given_or(args.expert_load, capacity or 1.0)

    def predict(values: dict):
        copy_gbps = values.get("copy_gbps")
        machine = Machine(flops=peak_flops, efficiency=min(values["efficiency"], 1.0),
                          devices_per_node=args.devices_per_node,
                          inside_node=Link(values["link_gbps"] * 1e9,
                                           args.link_latency_us * 1e-6),
                          between_nodes=Link(values["link_between_gbps"] * 1e9,
                                             args.link_latency_us * 1e-6),
                          copy_bandwidth=None if copy_gbps is None else copy_gbps * 1e9)
        return simulate_step(config, layout, machine, args.micro_batch, seq_len,
                             max(int(values["micro_batches"]), 1), args.recompute,
                             args.weight_bytes, expert_load)

    sensitivity = {name: [predict({**inputs, name: value * factor}).tokens_per_device_per_second
                          for factor in (0.5, 2.0)] for name, value in inputs.items()}
    return {"prediction": predict(inputs), "inputs": inputs | {"expert_load": expert_load},
            "sensitivity": sensitivity,
            "measured_tokens_per_device_per_second": args.tokens_per_second}


def _pipeline_split(config: ModelConfig, args, seq_len: int, peak_flops: float | None) -> dict:
    """Skywork-MoE's non-uniform split beside the even one, with 1F1B predictions."""
    micro_batches = _given_or(args.pipeline_micro_batches, 4 * args.pipeline)
    if micro_batches < 1:
        raise ValueError(f"--pipeline-micro-batches {micro_batches} is not allowed: expected "
                         "an integer >= 1")
    tokens = args.micro_batch * seq_len
    splits = {"planned": plan_stages(config, args.pipeline, seq_len),
              "uniform": uniform_stages(config, args.pipeline, seq_len)}
    return {name: {"stage_layers": split.stage_layers, "stage_flops_per_token": split.stage_costs,
                   "bubble": split.bubble(micro_batches),
                   "relative_step_time": split.step_time(micro_batches, tokens, 1.0)
                   / splits["uniform"].step_time(micro_batches, tokens, 1.0),
                   "step_seconds_at_peak": None if peak_flops is None
                   else split.step_time(micro_batches, tokens, peak_flops)}
            for name, split in splits.items()} | {"micro_batches": micro_batches}


def _upcycle(config: ModelConfig, args, seq_len: int):
    if config.moe is None:
        raise ValueError("--upcycle needs an MoE model (its dense variant is the source)")
    if args.dense_tokens is None or args.moe_tokens is None:
        raise ValueError("--upcycle needs --dense-tokens and --moe-tokens")
    return upcycle_or_scratch(config.dense(), config, args.dense_tokens, args.moe_tokens, seq_len)


def _jsonable(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def run(args) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps({name: _jsonable(section) for name, section in plan.items()}, indent=2))
    else:
        from rich.console import Console
        console = Console()
        for table in _tables(plan):
            console.print(table)
    return 0


# Rich tables -------------------------------------------------------------------------------

def _count(count: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:,.3f} {unit}"
    return f"{count:,.0f}"


def _gib(size: float) -> str:
    return f"{size / GIB:,.2f} GiB"


def _table(title: str, columns: list[str], rows: list[list[str]]):
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _tables(plan: dict):
    params = plan["parameters"]
    yield _table("Parameters", ["component", "total", "active per token"],
                 [[c.name, _count(c.total), _count(c.active)] for c in params.components]
                 + [["total / active with embeddings", _count(params.total),
                     _count(params.active_with_embeddings)],
                    ["active without embeddings", "", _count(params.active_without_embeddings)]])
    flops = plan["flops_per_token"]
    rows = [["6N (dense rule)", f"{flops.six_n:.3e}"],
            ["9.59 N + 2.3e8 (Hunyuan MoE fit)", f"{flops.hunyuan_fit:.3e}"],
            [f"6 (N + VD) + attention at S={flops.seq_len} (MFU)", f"{flops.model_flops:.3e}"]]
    yield _table(f"Training FLOPs per token (N = {_count(flops.active_params)} active, "
                 "without embeddings)", ["rule", "FLOPs"], rows)
    if "training_compute" in plan:
        compute = plan["training_compute"]
        yield _table(f"Training compute for D = {compute.tokens:.3e} tokens", ["rule", "FLOPs"],
                     [["6ND", f"{compute.six_n:.3e}"],
                      ["9.59 N D + 2.3e8 D", f"{compute.hunyuan_fit:.3e}"],
                      ["model FLOPs x D", f"{compute.model_flops:.3e}"]])
    if "utilisation" in plan:
        use = plan["utilisation"]
        yield _table(f"MFU at {use.tokens_per_second:,.0f} tokens/s per device, peak "
                     f"{use.peak_flops / 1e12:,.1f} TFLOP/s", ["FLOPs per token", "MFU"],
                     [["6 (N + VD) + attention", f"{use.mfu:.1%}"],
                      ["Hunyuan fit", f"{use.hunyuan_fit_mfu:.1%}"]])
    if "scaling_law" in plan:
        law = plan["scaling_law"]
        yield _table(f"Hunyuan scaling law, C = {law.budget_flops:.3e} FLOPs",
                     ["active parameters N", "tokens D"],
                     [[f"{_count(law.active_params)} (this model)", f"{law.tokens:.3e}"],
                      [f"{_count(law.published_optimal_active_params)} (Hunyuan's published "
                       "optimum)", f"{law.tokens_at_published_optimum:.3e}"]])
    yield from _memory_tables(plan)
    yield from _offload_table(plan)
    yield from _pipeline_table(plan)
    yield from _simulation_table(plan)
    yield from _upcycle_table(plan)


def _memory_tables(plan: dict):
    kv = plan["kv_cache"]
    yield _table(f"KV cache ({kv.dtype}, batch {kv.batch} x context {kv.context:,})",
                 ["attention", "KV heads", "layers per cache", "per token", "batch x context",
                  "saving vs MHA"],
                 [[v.name + (" (this model)" if v.name == kv.model_variant else ""),
                   str(v.kv_heads), str(v.cla_share), f"{v.bytes_per_token / 2**10:,.1f} KiB",
                   _gib(v.bytes_total), f"{v.saving:.1%}"] for v in kv.variants])
    memory = plan["training_memory"]
    layout = memory.layout
    stage = memory.peak_stage
    rows = [["layers on the device's stage", str(stage.layers)],
            ["parameters held", _count(stage.parameters)],
            ["weights", _gib(stage.weights)], ["gradients", _gib(stage.gradients)],
            ["optimizer states", _gib(stage.optimizer_states)],
            ["activations, no recomputation", _gib(stage.activations)],
            ["activations, full recomputation", _gib(stage.activations_recompute)],
            [f"total ({'with' if memory.recompute else 'without'} recomputation)",
             _gib(stage.total(memory.recompute))]]
    memory_gib = plan.get("device", {}).get("memory_gib")
    if memory_gib is not None:
        fits = stage.total(memory.recompute) <= memory_gib * GIB
        rows.append([f"fits in {memory_gib:g} GiB", "yes" if fits else "no"])
    yield _table(f"Training memory per device: data {layout.data} x tensor {layout.tensor} x "
                 f"pipeline {layout.pipeline}, expert {layout.expert}, ZeRO-"
                 f"{memory.precision.zero_stage}, micro-batch {memory.micro_batch} x "
                 f"{memory.seq_len:,} (the heaviest stage: {stage.stage})", ["", "per device"],
                 rows)
    inference = plan["inference_memory"]
    if inference and isinstance(inference[0], dict):
        yield _table(f"Inference weights over {inference[0]['devices']} devices (give --device "
                     "or --device-memory-gib for what fits)", ["weights", "total", "per device"],
                     [[row["dtype"], _gib(row["weight_bytes"]),
                       _gib(row["weight_bytes"] / row["devices"])] for row in inference])
        return
    first = inference[0]
    yield _table(f"Inference on {first.devices} x {first.device_memory_bytes / GIB:g} GiB "
                 f"(KV cache in {first.kv_dtype})",
                 ["weights", "total", "per device", "fits", "free per device",
                  "KV-cache tokens that fit"],
                 [[row.dtype, _gib(row.weight_bytes), _gib(row.weight_bytes_per_device),
                   "yes" if row.fits else "no", _gib(row.free_bytes_per_device),
                   f"{row.kv_cache_tokens:,}"] for row in inference])


def _offload_table(plan: dict):
    if "offload" not in plan:
        return
    offload = plan["offload"]
    answers = {None: "-", True: "yes", False: "no"}
    rows = [["fits resident", *(answers[row.fits_resident] for row in offload)],
            ["resident part (all but routed experts)",
             *(_gib(row.resident_bytes) for row in offload)],
            ["one routed expert", *(f"{row.expert_bytes / 2**20:,.1f} MiB" for row in offload)],
            ["expert cache", *(_gib(max(row.cache_bytes, 0)) for row in offload)],
            ["experts cached", *(f"{row.cached_experts:,} of {row.experts:,}"
                                 for row in offload)],
            ["fits offloaded", *(answers[row.fits_offloaded] for row in offload)],
            ["hit rate" + (" (uniform routing)" if offload[0].given_hit_rate is None else ""),
             *(f"{row.hit_rate:.1%}" for row in offload)],
            ["expert bytes moved per token", *(f"{row.bytes_per_token / 2**20:,.1f} MiB"
                                               for row in offload)]]
    yield _table("Serving on one device with offloaded experts (moekit serve --expert-memory)",
                 ["", *(row.dtype for row in offload)], rows)


def _pipeline_table(plan: dict):
    if "pipeline_split" not in plan:
        return
    split = plan["pipeline_split"]
    rows = []
    for name in ("planned", "uniform"):
        part = split[name]
        seconds = part["step_seconds_at_peak"]
        rows.append([name, ", ".join(map(str, part["stage_layers"])),
                     f"{max(part['stage_flops_per_token']):.3e}",
                     f"{part['bubble']:.1%}", f"{part['relative_step_time']:.3f}",
                     "" if seconds is None else f"{seconds:.3g} s"])
    yield _table(f"Pipeline split (Skywork-MoE's non-uniform split; 1F1B, "
                 f"{split['micro_batches']} micro-batches)",
                 ["split", "layers per stage", "slowest stage FLOPs/token", "bubble",
                  "step time vs uniform", "step at peak"], rows)


def _simulation_table(plan: dict):
    if "simulation" not in plan:
        return
    simulation = plan["simulation"]
    step = simulation["prediction"]
    rows = [[part.replace("_", " "), f"{getattr(step, part):.4g} s"]
            for part in ("compute", "tensor_parallel", "all_to_all", "point_to_point",
                         "dispatch", "imbalance", "bubble", "all_reduce", "step")]
    rows.append(["tokens per device per second", f"{step.tokens_per_device_per_second:,.0f}"])
    measured = simulation["measured_tokens_per_device_per_second"]
    if measured:
        rows.append(["measured (--tokens-per-second)", f"{measured:,.0f}"])
    for name, (low, high) in simulation["sensitivity"].items():
        rows.append([f"tokens/s with {name} x0.5 / x2", f"{low:,.0f} / {high:,.0f}"])
    yield _table("Predicted step (no overlap of communication and compute)", ["part", ""], rows)


def _upcycle_table(plan: dict):
    if "upcycle" in plan:
        advice = plan["upcycle"]
        yield _table("Upcycle or train from scratch (Skywork-MoE's 2x rule)", ["", ""],
                     [["advice", advice.recommendation],
                      ["C_MoE / C_dense", f"{advice.budget_ratio:.2f}"], ["why", advice.reason]])
