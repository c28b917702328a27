"""The pretraining fast path: torch.compile, fused AdamW, a fused LM head + cross-entropy, steady-state timing.

Each switch is a key of the pretrain stage's `train` section; `None` means "where it pays": on a GPU, not on a CPU
(bench/RESULTS.md has what each one measured). The fused loss is our own chunked version of what Liger's
FusedLinearCrossEntropy does: the logits of a micro-batch (tokens x vocabulary, 2 GB in fp32 for 16 x 1024 tokens
and a 32k vocabulary) are never held at once; each chunk's logits are made, turned into the loss and its gradients,
and dropped. It is plain PyTorch, so it runs (and is tested) on a CPU too.
"""

from __future__ import annotations

import time

from pipeline.config import UserError


def where_it_pays(value: bool | None, device) -> bool:
    """A fast-path switch: as configured, or (None) on for CUDA devices and off elsewhere."""
    return bool(value) if value is not None else device.type == "cuda"


def adamw(groups: list[dict], lr: float, betas, eps: float, fused: bool):
    """torch's AdamW; `fused` runs the whole update as one kernel per parameter group (CUDA and CPU)."""
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Mean cross-entropy of `hidden @ weight.T` against `targets` (ignore_index -100), `chunk` rows at a time.
        The gradients are made in the forward pass, chunk by chunk, so backward holds two gradient tensors and no
        logits. Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as the unfused
        head and transformers' loss do."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk: int):
            device = hidden.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
            with torch.autocast(device, enabled=False):
                w = weight.to(dtype)
                valid = targets != -100
                count = valid.sum().clamp(min=1)
                grad_hidden = torch.empty_like(hidden)
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                for start in range(0, hidden.shape[0], chunk):
                    h = hidden[start : start + chunk].to(dtype)
                    t, keep = targets[start : start + chunk], valid[start : start + chunk]
                    logits = (h @ w.T).float()
                    logsumexp = torch.logsumexp(logits, dim=-1)
                    picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
                    total += ((logsumexp - picked) * keep).sum()
                    grad = torch.softmax(logits, dim=-1)  # d(sum of losses)/d logits = softmax - one-hot
                    grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
                    grad = (grad * (keep.unsqueeze(1) / count)).to(dtype)
                    grad_hidden[start : start + chunk] = (grad @ w).to(hidden.dtype)
                    grad_weight += (grad.T @ h).float()
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            return total / count

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden * grad_output, grad_weight * grad_output, None, None

    return LinearCrossEntropy


def linear_cross_entropy(hidden, weight, targets, chunk: int = 4096):
    """Mean next-token cross-entropy without the full logits: `hidden` [N, H], `weight` [V, H], `targets` [N]."""
    return _linear_cross_entropy().apply(hidden, weight, targets, chunk)


def fuse_lm_loss(model, chunk: int, zero_stage: int | None = None) -> None:
    """Give `model` (a transformers causal LM) a forward that, with labels, computes the loss by
    `linear_cross_entropy` from the decoder's last hidden states and returns no logits; without labels it is the
    model's own forward. An instance attribute, so DDP, FSDP and torch.compile call it as the model's forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = model.get_output_embeddings()
    decoder = getattr(model, model.base_model_prefix, None)
    config = model.config
    why = None
    if zero_stage == 3:
        why = "under DeepSpeed ZeRO-3 the LM head's weight is partitioned outside its own forward"
    elif decoder is None or head is None or getattr(head, "bias", None) is not None:
        why = f"{type(model).__name__} has no plain linear LM head over a `{model.base_model_prefix}` decoder"
    elif any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        why = f"{type(model).__name__} scales or caps its logits, which the fused loss does not"
    if why:
        raise UserError(f"train.fused_loss: {why}; set train.fused_loss=false")
    unfused = model.forward

    def forward(input_ids=None, labels=None, **kwargs):
        if labels is None:
            return unfused(input_ids=input_ids, **kwargs)
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        loss = linear_cross_entropy(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, labels[:, 1:].reshape(-1), chunk
        )
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward


class StepClock:
    """Seconds of training steps, with the first `warmup` steps of this process (compilation, allocator and kernel
    warm-up) apart: tokens/s is a steady-state number, as nanochat and torchtitan report it."""

    def __init__(self, warmup: int, train_seconds: float = 0.0, steady_seconds: float = 0.0, steady_steps: int = 0):
        self.warmup, self.seen = warmup, 0
        self.seconds, self.steady_seconds, self.steady_steps = train_seconds, steady_seconds, steady_steps
        self.warmup_seconds = 0.0
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        seconds = time.perf_counter() - self._start
        self.seconds += seconds
        self.seen += 1
        if self.seen <= self.warmup:
            self.warmup_seconds += seconds
        else:
            self.steady_seconds += seconds
            self.steady_steps += 1
        return seconds

    @classmethod
    def resumed(cls, warmup: int, checkpoint_state: dict) -> StepClock:
        """A clock that goes on from a checkpoint's `state()` (a fresh one without it)."""
        keys = ("train_seconds", "steady_seconds", "steady_steps")
        return cls(warmup, **{key: checkpoint_state[key] for key in keys if key in checkpoint_state})

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run's numbers cover the whole run."""
        return {
            "train_seconds": self.seconds,
            "steady_seconds": self.steady_seconds,
            "steady_steps": self.steady_steps,
        }

    def tokens_per_second(self, tokens_per_step: int, steps: int) -> float:
        """Steady-state tokens/s; when no step was past a warm-up, all `steps` (those `seconds` covers, resumed ones
        included) over all seconds."""
        if self.steady_steps:
            return tokens_per_step * self.steady_steps / max(self.steady_seconds, 1e-9)
        return tokens_per_step * steps / max(self.seconds, 1e-9)
