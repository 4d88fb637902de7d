"""``tairstore sim``: ``step`` (one engine step's time), ``run`` (a serving simulation) and
``sweep`` (a grid of runs).

Examples::

    tairstore sim step --model qwen3-8b --gpu h100 --tp 1 --prefill 2048 --decode 64x4096
    python -m tairstore.hisim.cli step --model qwen3-8b --gpu h20 --decode 128x8192 --json

    tairstore sim run --model qwen3-8b --gpu h20 --trace trace.jsonl --dram-cache 64GiB \
        --ssd-cache 2TiB --output-dir out
    tairstore sim run --backend sglang --model llama-3.1-8b --dtype fp8 --gpu h200 --tp 2 \
        --concurrency 240 --isl 1000 --osl 100 --num-prompts 2400 --output-dir out

``--prefill`` may repeat, and takes ``NEW`` or ``NEW@PREFIX`` (a chunk of NEW tokens after PREFIX
cached ones); ``--decode`` may repeat, and takes ``REQUESTS x KV_LEN``. The ``run`` and ``sweep``
commands live in :mod:`tairstore.hisim.serving_cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .database import make_timer
from .hardware import DEFAULT_REGISTRY, UnknownGPUError
from .latency import PrefillChunk, Step, StepLatencyModel, StepSpecError, parse_decode
from .models import UnknownModelError, get_model
from .serving_cli import add_serving_parsers


def _prefill(spec: str) -> PrefillChunk:
    new, _, prefix = spec.partition("@")
    try:
        return PrefillChunk(int(new), int(prefix or 0))
    except ValueError:
        raise argparse.ArgumentTypeError(f"prefill {spec!r} is not NEW or NEW@PREFIX") from None


def _decode(spec: str) -> tuple[int, int]:
    try:
        return parse_decode(spec)
    except StepSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _configure_step(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in model name (e.g. qwen3-8b) or a HuggingFace config.json path")
    p.add_argument("--gpu", required=True, help="GPU profile (h100, h200, h20, a100, l20, b200)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--prefill", type=_prefill, action="append", default=[],
                   metavar="NEW[@PREFIX]", help="a prefill chunk (repeatable)")
    p.add_argument("--decode", type=_decode, action="append", default=[],
                   metavar="NxKV", help="N decode requests with KV tokens cached (repeatable)")
    p.add_argument("--weight-dtype", choices=("bfloat16", "fp8", "fp8_block"),
                   help="GEMM dtype (default: the model's)")
    p.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), help="KV-cache dtype")
    p.add_argument("--gpu-file", help="TOML file with extra [gpu.NAME] profiles")
    p.add_argument("--tables", help="AIConfigurator GPU folder measured on this GPU")
    p.add_argument("--json", action="store_true", help='print {"inputs": {..}, "step_ms": .., "breakdown": {..}}')
    p.set_defaults(func=run_step)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sim`` (with its ``step`` sub-command) on an argparse subparsers object."""
    sim = subparsers.add_parser("sim", help="HiSim: simulate an inference server")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    _configure_step(sim_sub.add_parser("step", help="predict the time of one engine step"))
    add_serving_parsers(sim_sub)
    return sim


def run_step(args: argparse.Namespace) -> int:
    """Run ``sim step`` for parsed arguments; return the exit status."""
    try:
        if args.gpu_file:
            DEFAULT_REGISTRY.load_toml(args.gpu_file)
        gpu = DEFAULT_REGISTRY.get(args.gpu)
        model = get_model(args.model).with_dtypes(args.weight_dtype, args.kv_dtype)
        decode_kv = tuple(kv for count, kv in args.decode for _ in range(count))
        step = Step(tuple(args.prefill), decode_kv)
        result = StepLatencyModel(model, make_timer(gpu, args.tables), args.tp).predict(step)
    except (UnknownGPUError, UnknownModelError, StepSpecError, OSError) as exc:
        # KeyError subclasses quote their message in str(); print it plain.
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if args.json:
        inputs = {"model": model.name, "gpu": gpu.name, "tp": args.tp,
                  "prefill": [[c.new_tokens, c.prefix] for c in step.prefill],
                  "decode": [list(d) for d in args.decode],
                  "weight_dtype": model.weight_dtype, "kv_dtype": model.kv_dtype}
        print(json.dumps({"inputs": inputs, "step_ms": round(result.step_ms, 4),
                          "breakdown": {k: round(v, 4) for k, v in result.breakdown.items()}}))
        return 0
    print(f"{model.name} on {args.tp} x {gpu.name}: {step.num_tokens} tokens "
          f"({sum(c.new_tokens for c in step.prefill)} prefill, {len(step.decode_kv)} decode)")
    print(f"step time: {result.step_ms:.3f} ms")
    for category, ms in result.breakdown.items():
        sources = ", ".join(sorted(result.sources[category]))
        print(f"  {category:<18} {ms:9.3f} ms  {100 * ms / result.step_ms:5.1f}%  [{sources}]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m tairstore.hisim.cli step ...``."""
    parser = argparse.ArgumentParser(prog="tairstore sim", description="HiSim")
    sub = parser.add_subparsers(dest="sim_command", required=True)
    _configure_step(sub.add_parser("step", help="predict the time of one engine step"))
    add_serving_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
