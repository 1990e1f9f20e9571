"""Exponential moving average of the trainable weights (``optim.ema_decay``).

``ema = decay * ema + (1 - decay) * w`` (computed as ``ema + (1 - decay) * (w - ema)``) after every
optimiser step that changed the weights, starting from the weights at step 0 (no warm-up
correction). The average is kept in fp32 on every rank (all ranks hold the same weights under
ZeRO 0-2, so no communication is needed), written by
rank 0 into each checkpoint as ``ema.safetensors`` and loaded back on resume; at the end it is the
exported ``model.safetensors`` and it is what evaluation during training measures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lamm_ds.engine.checkpoint import CheckpointError

log = logging.getLogger("lamm_ds")

EMA_FILE = "ema.safetensors"
FORMAT = "lamm-ds-ema"


def trainable_names(module: torch.nn.Module) -> list[str]:
    """The parameters the EMA averages: trainable and floating (frozen ones never change)."""
    return [n for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]


def current_weights(engine) -> dict[str, torch.Tensor]:
    """Name -> the engine's present value of each trainable weight, in fp32 (not copied).

    Under bf16/fp16 at ZeRO stage 0 these are DeepSpeed's fp32 master copies: the module holds
    them rounded to 16 bits, and averaging the rounded values would throw away what the optimiser
    accumulated below bf16's resolution. At ZeRO 1-2 the masters are partitioned over the ranks, so
    the (whole) module weights cast to fp32 are used instead."""
    module = engine.module
    named = dict(module.named_parameters())
    weights = {n: named[n].detach() for n in trainable_names(module)}
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0 and hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        names = {id(p): n for n, p in named.items()}
        for low_group, master_group in zip(opt.fp16_groups, opt.fp32_groups):
            for low, master in zip(low_group, master_group):
                if names.get(id(low)) in weights:
                    weights[names[id(low)]] = master.detach()
    return {n: w if w.dtype == torch.float32 else w.float() for n, w in weights.items()}


class WeightEMA:
    """The moving average of a module's trainable weights, by parameter name."""

    def __init__(self, decay: float, shadow: dict[str, torch.Tensor], updates: int = 0,
                 scaler_skips: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.shadow, self.updates = float(decay), shadow, int(updates)
        self.scaler_skips = scaler_skips  # engine.skipped_steps when last seen

    @classmethod
    def from_engine(cls, engine, decay: float) -> "WeightEMA":
        """Started from the engine's weights as they are now (the start of training)."""
        shadow = {n: w.clone() for n, w in current_weights(engine).items()}
        return cls(decay, shadow, 0, getattr(engine, "skipped_steps", 0))

    def update(self, engine) -> bool:
        """Fold in the weights after an optimiser step; False (nothing changed) when DeepSpeed's
        fp16 loss scaler skipped that step (``engine.skipped_steps`` grew: the weights did not move,
        and averaging them again would over-weight them). Steps the non-finite guard skipped never
        reach here."""
        skips = getattr(engine, "skipped_steps", 0)
        if skips != self.scaler_skips:
            self.scaler_skips = skips
            return False
        weights = current_weights(engine)
        shadow = list(self.shadow.values())
        if shadow:
            # ema + (1 - decay) * (w - ema): the same average, and a weight that did not move (frozen, or a
            # head no sample reached) keeps its exact bits, which decay * ema + (1 - decay) * w rounds away
            ends = [weights[n].to(s.dtype) for n, s in self.shadow.items()]  # lerp wants one dtype (fp32 both)
            torch._foreach_lerp_(shadow, ends, 1.0 - self.decay)
        self.updates += 1
        return True

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, tag_dir: Path) -> Path:
        """``<tag_dir>/ema.safetensors`` (rank 0, before the checkpoint is sealed)."""
        path = Path(tag_dir) / EMA_FILE
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
        save_file(tensors, str(path), metadata={"format": FORMAT, "decay": repr(self.decay),
                                                "updates": str(self.updates)})
        return path

    @classmethod
    def load(cls, engine, tag_dir: Path, decay: float) -> "WeightEMA":
        """The EMA a checkpoint holds (already verified against its ``lamm_complete.json``), on
        the device of the module's weights; errors name the file."""
        path = Path(tag_dir) / EMA_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing: optim.ema_decay={decay} needs the weights' moving average, but checkpoint "
                f"{Path(tag_dir).name} was written without one (optim.ema_decay=0). Resume with optim.ema_decay=0, "
                "or start a new run (e.g. fine-tune from the exported model) to average the weights")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable EMA file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a lamm-ds EMA file (format {meta.get('format')!r})")
        weights = current_weights(engine)
        missing, extra = sorted(set(weights) - set(tensors)), sorted(set(tensors) - set(weights))
        wrong = [n for n in weights if n in tensors and tensors[n].shape != weights[n].shape]
        if missing or extra or wrong:
            raise CheckpointError(
                f"{path}: does not match the model's trainable weights (missing {missing[:5]}, unexpected "
                f"{extra[:5]}, other shape {wrong[:5]}); were parameters frozen or unfrozen since the checkpoint?")
        saved_decay = float(meta.get("decay", decay))
        if saved_decay != decay:
            log.warning("%s: averaged with decay %g so far; continuing with optim.ema_decay=%g", path,
                        saved_decay, decay)
        shadow = {n: tensors[n].to(weights[n].device, torch.float32) for n in weights}
        return cls(decay, shadow, int(meta.get("updates", 0)), getattr(engine, "skipped_steps", 0))

    # -- using the average ------------------------------------------------------------------------

    def apply_to(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of a full state dict with the averaged weights in place of the trainable ones
        (buffers and frozen weights as given)."""
        out = dict(state)
        for n, t in self.shadow.items():
            out[n] = t.detach().to(state[n].device if n in state else "cpu", torch.float32).clone()
        return out

    def module_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A separate fp32 model holding the averaged weights and the module's buffers, on its
        device; the training module is not touched."""
        state = {k: v.detach().float() if v.is_floating_point() else v.detach()
                 for k, v in module.state_dict().items()}
        with torch.random.fork_rng(devices=[]):  # a new model draws random weights: leave training's RNG alone
            twin = type(module)(module.cfg, module.dataset_names)
        twin.load_state_dict(self.apply_to(state))
        twin.trained_elements = getattr(module, "trained_elements", None)
        return twin.to(next(module.parameters()).device)

    def describe(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}


def start_ema(engine, decay: float, resume_dir: Path | None) -> WeightEMA | None:
    """The run's EMA: none when ``decay`` is 0, else loaded from the checkpoint tag directory a
    resume starts from, or started from the present weights."""
    if not decay:
        return None
    if resume_dir is not None:
        return WeightEMA.load(engine, resume_dir, decay)
    return WeightEMA.from_engine(engine, decay)
