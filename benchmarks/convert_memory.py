#!/usr/bin/env python3
"""Peak anonymous memory of `moekit import` and `moekit export` on a sharded checkpoint,
beside the checkpoint's size and beside loading the whole model (what import did before it
streamed).

    python benchmarks/convert_memory.py                  # a 3.8 GB Mixtral-layout checkpoint
    python benchmarks/convert_memory.py --size-gb 8 --dir /big/disk

It writes a random Mixtral-layout checkpoint (bf16, shards of --shard-gb) into a temporary
folder under --dir, then runs each conversion in a fresh process that samples its own RssAnon
(/proc/self/status) every millisecond: the growth over the process's RssAnon just before the
command is the figure. Memory-mapped weights are file pages (RssFile), which the kernel can
drop at will, so they do not count; what does is what the process allocates. The bound
printed beside each figure is the one tests/test_convert_streaming.py holds a 200 MB case to:
one shard + the largest stacked expert tensor + 64 MiB. Needs about 3x --size-gb of disk.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARGIN_BYTES = 64 * 2**20


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def peak_growth(function) -> dict:
    """Call ``function`` (which returns a dict) in this process, sampling RssAnon meanwhile:
    its result, with the peak growth over the RssAnon before the call (bytes) and seconds."""
    baseline = peak = _rss_anon()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {**result, "peak_growth": max(peak, _rss_anon()) - baseline, "seconds": seconds}


def _measured(what: list[str]) -> dict:
    """In the child process: a moekit command, or ``load FOLDER`` (``load_hf``, the whole
    model in memory)."""
    from moekit.cli import build_parser, main
    from moekit.convert import load_hf
    build_parser()  # every command's modules loaded before the baseline
    if what[0] == "load":
        return peak_growth(lambda: {"code": 0, "parameters": sum(
            p.numel() for p in load_hf(what[1]).parameters())})
    return peak_growth(lambda: {"code": main(what)})


def write_checkpoint(folder: Path, layers: int, experts: int, hidden: int, ffn: int,
                     shard_bytes: int) -> dict:
    """A random Mixtral-layout folder as transformers saves one (bf16, sharded; the config
    with the keys moekit and transformers read); returns its
    sizes: total, largest shard and largest stacked expert tensor, in bytes."""
    import torch
    from safetensors.torch import save_file

    from moekit.convert.hf_folder import CONFIG_FILE, INDEX_FILE, shard_names
    vocab, heads = 1024, max(hidden // 128, 1)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "num_local_experts": experts,
              "num_experts_per_tok": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16"}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}self_attn.{projection}.weight"] = (hidden, hidden)
        shapes[f"{prefix}block_sparse_moe.gate.weight"] = (experts, hidden)
        for expert in range(experts):
            for matrix, shape in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)),
                                  ("w2", (hidden, ffn))):
                shapes[f"{prefix}block_sparse_moe.experts.{expert}.{matrix}.weight"] = shape
    sizes = {name: torch.Size(shape).numel() * 2 for name, shape in shapes.items()}
    files = shard_names(sizes, shard_bytes)
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for file in dict.fromkeys(files.values()):
        save_file({name: torch.empty(shapes[name], dtype=torch.bfloat16).uniform_(
                       -0.02, 0.02, generator=generator)
                   for name in shapes if files[name] == file}, str(folder / file),
                  metadata={"format": "pt"})
    (folder / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": files}))
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    per_shard = {}
    for name, file in files.items():
        per_shard[file] = per_shard.get(file, 0) + sizes[name]
    return {"total": sum(sizes.values()), "largest_shard": max(per_shard.values()),
            "largest_stacked": experts * 2 * ffn * hidden * 2}  # gate_up_proj, bf16


def _in_fresh_process(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", *argv], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def run(folder: Path, layers: int, experts: int, hidden: int, ffn: int,
        shard_bytes: int, compare_in_memory: bool) -> dict:
    sizes = write_checkpoint(folder / "hf", layers, experts, hidden, ffn, shard_bytes)
    report = {"sizes": sizes, "bound": sizes["largest_shard"] + sizes["largest_stacked"]
              + MARGIN_BYTES}
    report["import"] = _in_fresh_process(["import", "--from", str(folder / "hf"),
                                          "--out", str(folder / "moekit")])
    report["export"] = _in_fresh_process(["export", "--from", str(folder / "moekit"),
                                          "--layout", "mixtral", "--out", str(folder / "back"),
                                          "--max-shard-size", str(shard_bytes)])
    if compare_in_memory:  # the model built whole, as import did before it streamed
        report["in_memory"] = _in_fresh_process(["load", str(folder / "hf")])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0,
                        help="checkpoint size, roughly (default 3)")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="shard size (default 0.5)")
    parser.add_argument("--dir", default=None, help="where the temporary folders go")
    parser.add_argument("--geometry", type=int, nargs=4, metavar=("LAYERS", "EXPERTS",
                                                                   "HIDDEN", "FFN"),
                        help="the model instead of --size-gb (the test's small case)")
    parser.add_argument("--shard-bytes", type=int, help="shard size in bytes (with --geometry)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child process: one command, measured
        print(json.dumps(_measured(args.measure)))
        return
    if args.geometry:
        layers, experts, hidden, ffn = args.geometry
        shard_bytes = args.shard_bytes
    else:  # layers of 8 experts of 4096 x 4096 (0.81 GB in bf16; 0.94 GB with attention)
        layers, experts, hidden, ffn = max(round(args.size_gb / 0.81), 1), 8, 4096, 4096
        shard_bytes = int(args.shard_gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        report = run(Path(folder), layers, experts, hidden, ffn, shard_bytes,
                     compare_in_memory=not args.geometry)
    if args.json:
        print(json.dumps(report))
        return
    sizes, mib = report["sizes"], 2**20
    print(f"checkpoint: {sizes['total'] / 1e9:.2f} GB in shards of at most "
          f"{sizes['largest_shard'] / 1e9:.2f} GB; largest stacked expert tensor "
          f"{sizes['largest_stacked'] / mib:.0f} MiB; bound {report['bound'] / mib:.0f} MiB")
    for step in ("import", "export", "in_memory"):
        figure = report[step]["peak_growth"]
        print(f"{step:>9}: peak RssAnon growth {figure / mib:8.1f} MiB = "
              f"{figure / sizes['total']:.3f} x the checkpoint, {figure / report['bound']:.3f} x "
              f"the bound ({report[step]['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
