"""Command-line pieces shared by `placement plan` and `placement simulate`: where step times
come from (a profile file, or a device spec's roofline for hardware you do not have), the
cluster, the workload and the SLOs."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import KV_CACHE_DTYPES
from placement.latency_model import Profile
from placement.optimizer import Cluster
from placement.simulator import SLO
from placement.workload import LengthSpec, Workload

if TYPE_CHECKING:
    from placement.hardware import ModelSpec

DATASETS = ("sharegpt", "humaneval", "docsum")


def add_kv_cache_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=tuple(KV_CACHE_DTYPES),
        help="the engine's kv_cache_dtype: fp8 caches a byte per element (a measured "
        "--profile is as it was measured)",
    )


def model_spec(args: argparse.Namespace) -> ModelSpec:
    from placement.hardware import ModelSpec

    return ModelSpec.from_config(model_path(args), args.dtype, args.kv_cache_dtype)


def add_source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="profile YAML (placement profile, or hand-written)")
    source.add_argument("--device", help="roofline profile of a device spec: A100-80GB, ...")
    parser.add_argument(
        "--model",
        default="default",
        help="HF model dir or its config.json, or a Hugging Face Hub id; 'default': embedded",
    )
    parser.add_argument("--dtype", default="bfloat16", help="weights and KV dtype")
    add_kv_cache_dtype_arg(parser)
    parser.add_argument("--cluster", default="1x8", help="NODESxGPUS, e.g. 4x8")
    parser.add_argument("--intra-node-gbs", type=float, help="default: the device's, or 300")
    parser.add_argument("--inter-node-gbs", type=float, help="default: the device's, or 25")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        default="512:64",
        help="IN:OUT tokens, each a number or a LOW-HIGH range (e.g. 512:64, 100-900:32-128), "
        f"or a dataset's lengths: {', '.join(DATASETS)}",
    )
    parser.add_argument("--max-input-len", type=int, default=1024, help="dataset filter")
    parser.add_argument("--max-output-len", type=int, default=512, help="dataset cap")
    parser.add_argument("--num-requests", type=int, default=300, help="simulated per rate")
    parser.add_argument("--cv", type=float, default=1.0, help="1: Poisson; >1 burstier")
    parser.add_argument(
        "--prefix-len", type=int, default=0, help="shared tokens before each prompt (cached)"
    )
    parser.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    parser.add_argument("--ttft-slo", type=float, required=True, help="ms")
    parser.add_argument("--tpot-slo", type=float, required=True, help="ms")
    parser.add_argument("--attainment", type=float, default=0.9, help="share meeting both SLOs")


def cluster_from(args: argparse.Namespace) -> Cluster:
    match = re.fullmatch(r"(\d+)x(\d+)", args.cluster)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise SystemExit(f"--cluster {args.cluster!r}: expected NODESxGPUS, e.g. 4x8")
    device = _device(args) if args.device else None
    intra = args.intra_node_gbs or (device.intra_node_gbs if device else 300.0)
    inter = args.inter_node_gbs or (device.inter_node_gbs if device else 25.0)
    return Cluster(int(match[1]), int(match[2]), intra, inter)


def model_path(args: argparse.Namespace) -> Path:
    """--model's config.json: the file named, or its directory's, or a Hugging Face Hub id's
    (fetched alone: a plan needs no weights)."""
    from engine.model_store import model_config_file

    if Path(args.model).expanduser().is_file():
        return Path(args.model).expanduser()
    try:
        return model_config_file(args.model)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from e


def is_hub_model(model: str) -> bool:
    """--model names a Hub repository (no such local path): a plan serves it by that id."""
    return model != "default" and not Path(model).expanduser().exists()


def profile_from(args: argparse.Namespace, cluster: Cluster) -> Profile:
    if args.profile:
        return Profile.load(args.profile)
    from placement.analytic import profile

    device = replace(_device(args), gpus_per_node=cluster.gpus_per_node)
    found = profile(model_spec(args), device)
    if not found.entries:
        raise SystemExit(f"the model fits no tp x pp layout on {device.name}")
    return found


def _device(args: argparse.Namespace):
    from placement.hardware import DEVICES

    if args.device not in DEVICES:
        raise SystemExit(f"--device {args.device!r}: one of {', '.join(sorted(DEVICES))}")
    return DEVICES[args.device]


def slo_from(args: argparse.Namespace) -> SLO:
    return SLO(args.ttft_slo, args.tpot_slo)


def parse_lengths(text: str) -> tuple[LengthSpec, LengthSpec]:
    """'512:64' -> (512, 64); '100-900:32-128' -> ((100, 900), (32, 128))."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"workload {text!r}: expected IN:OUT or a dataset ({DATASETS})")
    return _length(parts[0], text), _length(parts[1], text)


def _length(part: str, text: str) -> LengthSpec:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
    if match is None:
        raise ValueError(f"workload {text!r}: {part!r} is not a number or LOW-HIGH range")
    low = int(match[1])
    high = int(match[2]) if match[2] else None
    if low < 1 or (high is not None and high < low):
        raise ValueError(f"workload {text!r}: {part!r} must be >= 1 and LOW <= HIGH")
    return low if high is None else (low, high)


def workload_from(args: argparse.Namespace) -> Workload:
    try:
        return _workload(args)
    except ValueError as e:
        raise SystemExit(f"--workload: {e}") from None


def _workload(args: argparse.Namespace) -> Workload:
    shared = {"prefix_len": args.prefix_len, "num_prefixes": args.num_prefixes}
    if args.workload not in DATASETS:
        ins, outs = parse_lengths(args.workload)
        return Workload(args.num_requests, ins, outs, cv=args.cv, **shared)
    from transformers import AutoTokenizer

    from bench.datasets import LengthFilter, load
    from engine.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    items = load(
        args.workload,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        2000,
        LengthFilter(max_input=args.max_input_len, max_output=args.max_output_len),
    )
    lengths = tuple((i.input_len, i.output_len) for i in items)
    return Workload(args.num_requests, cv=args.cv, dataset=lengths, **shared)
