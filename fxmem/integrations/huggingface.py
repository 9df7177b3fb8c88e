"""The Hugging Face ``Trainer`` trains its model's step under an fxmem budget, the Trainer's own
optimizer (AdamW by default) counted in it.

    from transformers import Trainer, TrainingArguments
    from fxmem.integrations.huggingface import optimize_trainer

    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out"), train_dataset=ds)
    optimize_trainer(trainer, budget="2GiB", lowering="inductor")
    trainer.train()
    trainer.save_model("out/final")    # the model's own keys and config.json

How: the Trainer keeps ``trainer.model`` (the model itself: saving, evaluation, the dataset
columns its ``forward`` takes, its label names) and trains ``trainer.model_wrapped``, "the most
external model" (where ``DistributedDataParallel`` goes); :func:`optimize_trainer` puts the
:class:`fxmem.OptimizedModule` there, and a callback hands it the optimizer the Trainer creates
when training begins, before the first step is planned.

``TrainingArguments(torch_compile=True, torch_compile_backend="fxmem")`` does not work: Accelerate
checks the backend's name against its own list (``'FXMEM' is not a valid DynamoBackend``).

Not supported here: ``fp16``/``bf16`` (Accelerate's autocast is applied to a model it prepares,
which it does not do to a wrapped one), several devices or processes, DeepSpeed, FSDP,
``model_init`` and ``auto_find_batch_size`` (they replace the trained model).
"""

from __future__ import annotations

import logging

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fxmem.integrations.huggingface needs transformers and accelerate: "
                      "pip install 'fxmem[hf]' (or: pip install transformers accelerate)") from exc

import fxmem
from fxmem.api.proxy import ModelProxy

__all__ = ["FxmemCallback", "optimize_trainer", "trainer_optimizer"]

log = logging.getLogger(__name__)


def trainer_optimizer(optimizer) -> torch.optim.Optimizer | None:
    """The ``torch.optim`` optimizer inside Accelerate's ``AcceleratedOptimizer`` (and other
    wrappers that keep it as ``.optimizer``)."""
    seen = 0
    while optimizer is not None and type(optimizer).__module__.split(".")[0] != "torch" \
            and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer, seen = optimizer.optimizer, seen + 1
        if seen > 8:
            break
    return optimizer


class FxmemCallback(TrainerCallback):
    """Hands the Trainer's optimizer to ``module`` when training begins (the optimizer exists
    then, and the first step is not planned yet), so its state and step count against the
    budget. ``trainer``: checks that the Trainer trains ``module``."""

    def __init__(self, module: fxmem.OptimizedModule, trainer: Trainer | None = None):
        if not isinstance(module, fxmem.OptimizedModule):
            raise TypeError(f"FxmemCallback takes an fxmem.OptimizedModule, got "
                            f"{type(module).__name__}")
        self.module, self.trainer = module, trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.trainer is not None and self.trainer.model_wrapped is not self.module:
            raise RuntimeError(
                "fxmem: the Trainer replaced the module it trains (trainer.model_wrapped), so the "
                "step would run without fxmem; call optimize_trainer(trainer, budget) again "
                "after whatever rebuilt the model")
        inner = trainer_optimizer(optimizer)
        if inner is None:
            log.warning("fxmem: the Trainer has no optimizer at train begin; its state is not "
                        "counted in the budget")
            return
        self.module.optimizer = inner
        log.info("fxmem: the Trainer's %s counts against the budget", type(inner).__name__)


def _check_trainer(trainer: Trainer, options: dict) -> None:
    """Refuse set-ups where the Trainer would not train the OptimizedModule, or would train it
    otherwise than fxmem plans."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"optimize_trainer takes a transformers.Trainer, got "
                        f"{type(trainer).__name__}")
    if isinstance(trainer.model, ModelProxy):
        raise ValueError("pass the model itself to Trainer(model=...), not fxmem.optimize(...) "
                         "of it, then call optimize_trainer(trainer, budget)")
    if "optimizer" in options:
        raise ValueError("optimize_trainer counts the Trainer's own optimizer; do not pass one")
    args = trainer.args
    refused = {
        "fp16/bf16 mixed precision": args.fp16 or args.bf16,
        "several devices or processes": args.n_gpu > 1 or args.world_size > 1,
        "DeepSpeed": trainer.is_deepspeed_enabled,
        "FSDP": trainer.is_fsdp_enabled or getattr(trainer, "is_fsdp_xla_enabled", False),
        "model_init": trainer.model_init is not None,
        "auto_find_batch_size": args.auto_find_batch_size,
        "an already wrapped model": trainer.model_wrapped is not trainer.model and not (
            isinstance(trainer.model_wrapped, fxmem.OptimizedModule)
            and trainer.model_wrapped.module is trainer.model),  # optimize_trainer again
    }
    for what, present in refused.items():
        if present:
            raise NotImplementedError(f"fxmem.integrations.huggingface does not support {what}")


def optimize_trainer(trainer: Trainer, budget: int | str, **options) -> fxmem.OptimizedModule:
    """Make ``trainer`` train ``trainer.model`` under ``budget`` with fxmem: the step is
    :func:`fxmem.optimize` of the model with ``options`` (``lowering``, ``allow``,
    ``strategy``...), planned on the first training step with the Trainer's optimizer counted.
    ``trainer.model`` stays the model (saved, evaluated and inspected as usual); returns the
    :class:`fxmem.OptimizedModule`, which is ``trainer.model_wrapped`` (``.plan`` after the first
    step)."""
    _check_trainer(trainer, options)
    module = fxmem.optimize(trainer.model, budget, **options)
    trainer.model_wrapped = module
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, FxmemCallback):
            trainer.remove_callback(callback)
    trainer.add_callback(FxmemCallback(module, trainer))
    log.info("fxmem: the Trainer trains %s under the budget %s", type(trainer.model).__name__,
             budget)
    return module
