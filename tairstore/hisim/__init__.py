"""HiSim: a CPU-only simulator of an LLM inference server.

Part 1 is the step-latency model: the time of one engine step (prefill chunks plus decode tokens)
of a model on a GPU, summed over its operators, each timed from measured AIConfigurator tables,
scaled from a measured GPU, or from a fitted roofline. See docs/HISIM.md.

Typical use::

    from tairstore.hisim import Step, predict_step
    t = predict_step("qwen3-8b", "h100", Step.of(prefill=[2048], decode=64, kv_len=4096))
    print(t.step_ms, t.breakdown)
"""

from __future__ import annotations

from pathlib import Path

from .database import make_timer
from .hardware import GPU, GPURegistry, UnknownGPUError, get_gpu
from .kernels import Estimate, KernelTimer
from .latency import PrefillChunk, Step, StepLatencyModel, StepSpecError, StepTime
from .models import ModelConfig, UnknownModelError, from_hf_config, get_model

__all__ = [
    "GPU", "GPURegistry", "UnknownGPUError", "get_gpu",
    "ModelConfig", "UnknownModelError", "from_hf_config", "get_model",
    "Estimate", "KernelTimer", "make_timer",
    "PrefillChunk", "Step", "StepLatencyModel", "StepSpecError", "StepTime",
    "step_model", "predict_step",
]


def step_model(model: str | ModelConfig, gpu: str | GPU, tp: int = 1,
               tables_dir: Path | str | None = None) -> StepLatencyModel:
    """A :class:`StepLatencyModel` from names (or configs) of a model and a GPU."""
    cfg = get_model(model) if isinstance(model, str) else model
    dev = get_gpu(gpu) if isinstance(gpu, str) else gpu
    return StepLatencyModel(cfg, make_timer(dev, tables_dir), tp)


def predict_step(model: str | ModelConfig, gpu: str | GPU, step: Step, tp: int = 1) -> StepTime:
    """Predicted time of one step of ``model`` on ``tp`` GPUs of kind ``gpu``."""
    return step_model(model, gpu, tp).predict(step)
