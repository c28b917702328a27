"""Pretraining stage: a causal LM trained from scratch (or continued) on packed text, with Accelerate.

    llmpipe pretrain --config configs/tiny/pretrain.yaml [tokenizer=runs/tiny/tokenizer] [train.max_steps=300]
    accelerate launch --config_file launch/accelerate/zero2.yaml -m pipeline.cli pretrain --config ...

Produces `output_dir/model/` (save_pretrained: safetensors + tokenizer + generation config, loads with
AutoModelForCausalLM), `checkpoints/step_N/` (resumable), `metrics.jsonl` and `manifest.json`.

The loop is our own (as nanochat and torchtitan do) rather than transformers' Trainer: the data order is a pure
function of (seed, step), so a resumed run replays exactly the batches an uninterrupted one would see, and the
loop's overhead over a bare PyTorch loop is measured in bench/pretrain.py.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from pipeline.artifacts import (
    atomic_dir,
    begin_stage,
    content_hash,
    describe_input,
    write_manifest,
)
from pipeline.batches import BlockSampler, StreamSampler
from pipeline.checkpoints import find_resume_point, load_checkpoint, save_checkpoint, stopped_message
from pipeline.config import DataConfig, StageFailed, UserError, config, field
from pipeline.data import describe_data, pack_dataset
from pipeline.distributed import all_finite, launch_facts, make_accelerator, world_size
from pipeline.fastpath import StepClock, adamw, fuse_lm_loss, where_it_pays
from pipeline.formats import load_documents
from pipeline.modeling import (
    ModelConfig,
    build_model,
    count_parameters,
    load_tokenizer,
    model_context_length,
    peak_flops,
    save_model,
    training_flops_per_token,
    utilisation,
)
from pipeline.tracking import MetricsLog, log

STAGE = "pretrain"


@config
class TrainConfig:
    seed: int = field(0, "Seed for weight initialisation, data order and dropout.")
    micro_batch_size: int = field(16, "Sequences per process per forward pass.", ge=1)
    tokens_per_step: int | None = field(
        None, "Tokens per optimizer step over all processes; gradient accumulation makes up the difference. "
        "None: micro_batch_size x seq_len x processes (no accumulation).", ge=1,
    )  # fmt: skip
    max_steps: int = field(1000, "Optimizer steps to train.", ge=1)
    lr: float = field(3e-3, "Peak learning rate.", gt=0)
    min_lr_ratio: float = field(0.1, "Final learning rate as a share of the peak.", ge=0.0, le=1.0)
    warmup_steps: int = field(50, "Linear warmup steps from 0 to the peak.", ge=0)
    schedule: str = field("cosine", "After warmup: cosine, wsd (constant then linear decay), or constant.")
    decay_fraction: float = field(0.2, "wsd: share of the steps spent decaying at the end.", gt=0.0, le=1.0)
    weight_decay: float = field(0.1, "AdamW weight decay (not applied to norms and biases).", ge=0.0)
    betas: tuple[float, float] = field((0.9, 0.95), "AdamW betas.")
    eps: float = field(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = field(1.0, "Clip the global gradient norm to this (0: no clipping).", ge=0.0)
    gradient_checkpointing: bool = field(False, "Recompute activations in backward: less memory, ~30% slower.")
    compile: bool | None = field(
        None, "torch.compile the model and its loss. None: on a GPU, not on a CPU (bench/RESULTS.md)."
    )
    fused_adamw: bool | None = field(None, "AdamW as one fused kernel per step. None: on a GPU, not on a CPU.")
    fused_loss: bool = field(
        False, "LM head + cross-entropy in chunks, never the whole logits (Liger's fused linear cross-entropy, in "
        "PyTorch): less memory, so a larger micro-batch fits. Not under ZeRO-3.",
    )  # fmt: skip
    fused_loss_chunk: int = field(4096, "fused_loss: tokens per chunk.", ge=1)

    def check(self) -> list[str]:
        if self.schedule not in ("cosine", "wsd", "constant"):
            return [f"schedule: got {self.schedule!r}, expected cosine, wsd or constant"]
        if self.warmup_steps >= self.max_steps:
            return [f"warmup_steps {self.warmup_steps} must be below max_steps {self.max_steps}"]
        return []


@config
class PretrainConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, metrics.jsonl, ...).")
    tokenizer: str | None = field(
        None, "Tokenizer: a tokenizer stage folder or any HF tokenizer path (None: the init_from model's)."
    )
    model: ModelConfig = field(factory=ModelConfig, help="The model: new (size fields) or init_from.")
    data: DataConfig = field(
        help="Training text, a 'text' column (map another with data.columns), or chats ('messages') rendered by "
        "the tokenizer's chat template: a mixture of both is mid-training."
    )
    validation_data: DataConfig | None = field(None, "Held-out text; None: split validation_fraction off data.")
    validation_fraction: float = field(0.01, "Share of documents held out for validation.", gt=0.0, lt=0.5)
    seq_len: int | None = field(None, "Tokens per training sequence (None: model.max_seq_len).", ge=8)
    num_proc: int = field(2, "Worker processes for tokenization (cached on disk afterwards).", ge=1)
    precision: str = field(
        "auto", "auto (the launch config's mixed_precision; else bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."
    )
    train: TrainConfig = field(factory=TrainConfig, help="Optimisation.")
    log_every: int = field(10, "Log loss, lr, grad norm, tokens/s and MFU every N steps.", ge=1)
    timing_warmup_steps: int = field(
        3, "Steps (of each start or resume) left out of the manifest's tokens/s and MFU: compilation and warm-up, "
        "reported apart as warmup_seconds.", ge=0,
    )  # fmt: skip
    eval_every: int = field(100, "Validation loss and perplexity every N steps (and at the end).", ge=1)
    eval_batches: int = field(
        20, "Validation micro-batches per evaluation over all processes (a multiple of the process count).", ge=1
    )
    checkpoint_every: int = field(100, "Save a resumable checkpoint every N steps.", ge=1)
    keep_checkpoints: int = field(2, "Keep the newest N checkpoints.", ge=1)
    resume: str = field("auto", "auto (newest checkpoint in output_dir, if any), never, or a checkpoint path.")
    report_to: list[str] = field(factory=list, help="Extra trackers: tensorboard and/or wandb.")

    def check(self) -> list[str]:
        problems = []
        if self.tokenizer is None and self.model.init_from is None:
            problems.append("tokenizer: required for a new model (set tokenizer=<tokenizer stage folder>)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32, bf16 or fp16")
        if self.seq_len and self.seq_len > self.model.max_seq_len and not self.model.init_from:
            problems.append(f"seq_len {self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        unknown = sorted(set(self.report_to) - {"tensorboard", "wandb"})
        if unknown:
            problems.append(f"report_to: unknown tracker(s) {unknown}; expected tensorboard or wandb")
        return problems


Config = PretrainConfig


# --- helpers ----------------------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the configured decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - max(1, round(cfg.decay_fraction * cfg.max_steps))
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (step - decay_start + 1) / (cfg.max_steps - decay_start)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not norms and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def run(cfg: PretrainConfig) -> dict | None:
    import torch
    from tqdm.auto import tqdm

    # --- check inputs before any compute: tokenizer, batch arithmetic, data, resume point
    started = time.time()
    out = Path(cfg.output_dir)
    tokenizer_path = cfg.tokenizer or cfg.model.init_from
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    seq_len = cfg.seq_len or cfg.model.max_seq_len
    if cfg.model.init_from:  # a continued model brings its own context length: default to it, never exceed it
        context = model_context_length(cfg.model)
        seq_len = cfg.seq_len or min(context, 2048)
        if seq_len > context:
            raise UserError(f"seq_len {seq_len} exceeds the context length {context} of {cfg.model.init_from}")
    world = world_size()
    micro_tokens = cfg.train.micro_batch_size * seq_len * world
    tokens_per_step = cfg.train.tokens_per_step or micro_tokens
    if tokens_per_step % micro_tokens:
        raise UserError(
            f"train.tokens_per_step {tokens_per_step} must be a multiple of micro_batch_size x seq_len x processes "
            f"= {cfg.train.micro_batch_size} x {seq_len} x {world} = {micro_tokens}"
        )
    accumulation = tokens_per_step // micro_tokens
    docs = load_documents(cfg.data, tokenizer)
    val_docs = load_documents(cfg.validation_data, tokenizer) if cfg.validation_data else None
    resume_from = find_resume_point(out / "checkpoints", cfg.resume, cfg)

    # The model is built before the Accelerator: under a ZeRO-3 launch, transformers would otherwise build it
    # inside deepspeed.zero.Init, whose different initialisation breaks "same result as one process". A launch
    # config with zero3_init_flag: true (models too big for one device's memory) gets zero.Init as it asks.
    zero3_init = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "true"
    model = None if zero3_init else _seeded_model(cfg, tokenizer)
    accelerator = make_accelerator(cfg.precision, out, cfg.report_to, accumulation)
    rank, micro = accelerator.process_index, cfg.train.micro_batch_size
    if accelerator.is_main_process:
        begin_stage(out, cfg, fresh=resume_from is None)

    # --- data: rank 0 tokenizes and packs (cached on disk by content), the other ranks then read the cache
    if cfg.num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; Rust threads would oversubscribe
    tokenizer_hash = content_hash(tokenizer_path) if os.path.exists(tokenizer_path) else tokenizer_path
    with accelerator.main_process_first():
        if cfg.data.streaming:
            val_docs = val_docs or docs.take(max(1, round(1 / cfg.validation_fraction)))
            docs = docs if cfg.validation_data else docs.skip(max(1, round(1 / cfg.validation_fraction)))
            train_blocks = pack_dataset(docs, tokenizer, seq_len, tokenizer_hash)
            val_blocks = np.stack(
                [np.asarray(r["input_ids"]) for r in pack_dataset(val_docs, tokenizer, seq_len, tokenizer_hash)]
                or [[]]
            )
        else:
            if val_docs is None:
                split = docs.train_test_split(test_size=cfg.validation_fraction, seed=cfg.train.seed)
                docs, val_docs = split["train"], split["test"]
            train_blocks = pack_dataset(docs, tokenizer, seq_len, tokenizer_hash, cfg.num_proc)
            train_blocks = train_blocks.with_format("numpy")
            val_blocks = np.asarray(
                pack_dataset(val_docs, tokenizer, seq_len, tokenizer_hash, cfg.num_proc).with_format("numpy")[
                    "input_ids"
                ]
            )
    # The evaluated blocks are the same whatever the number of processes: each rank takes a share of them.
    eval_batches = min(cfg.eval_batches, len(val_blocks) // micro) // world
    if eval_batches == 0:
        raise UserError(
            f"validation: {len(val_blocks)} blocks of {seq_len} tokens, fewer than one micro-batch per process "
            f"({micro} x {world}); raise validation_fraction or give validation_data"
        )

    # --- model and optimizer; DeepSpeed gets the batch numbers it cannot infer without a DataLoader
    model = model or _seeded_model(cfg, tokenizer)
    model.config.use_cache = False
    n_params = count_parameters(model)
    flops_per_token = training_flops_per_token(model, seq_len)
    log(
        f"{n_params['total'] / 1e6:.2f}M parameters ({n_params['matmul'] / 1e6:.2f}M in matmuls), "
        f"{flops_per_token / 1e6:.1f} MFLOPs per token; {world} process(es) x {micro} x {seq_len} tokens "
        f"x {accumulation} accumulation = {tokens_per_step} tokens per step",
        STAGE,
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = accelerator.device
    fused_adamw, compile_model = (where_it_pays(v, device) for v in (cfg.train.fused_adamw, cfg.train.compile))
    optimizer = adamw(
        param_groups(model, cfg.train.weight_decay), cfg.train.lr, cfg.train.betas, cfg.train.eps, fused_adamw
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = micro
        ds_config["gradient_clipping"] = cfg.train.grad_clip
    if cfg.train.fused_loss:
        plugin = accelerator.state.deepspeed_plugin
        fuse_lm_loss(model, cfg.train.fused_loss_chunk, plugin.zero_stage if plugin else None)
    if compile_model:  # in place: torch.compile(model)'s wrapper would save every weight as `_orig_mod.<name>`
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step, state = 0, {}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        start_step = state["step"]
        log(f"resumed from {resume_from} at step {start_step}", STAGE)
    if cfg.data.streaming:
        sampler = StreamSampler(train_blocks, start_step * micro * world * accumulation, micro, world, accumulation)
        get_batch = sampler.blocks
    else:
        sampler = BlockSampler(len(train_blocks), cfg.train.seed, micro, world, accumulation)

        def get_batch(step, micro_step, r):  # noqa: E306
            return train_blocks[sampler.indices(step, micro_step, r)]["input_ids"]

    if cfg.report_to:
        accelerator.init_trackers("llmpipe-pretrain", config={"output_dir": str(out)})
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator, start_step if resume_from else None)
    peak, peak_source = peak_flops(accelerator.device)

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        with torch.no_grad():
            for b in range(eval_batches):
                start = (b * world + rank) * micro
                batch = torch.from_numpy(val_blocks[start : start + micro]).long().to(accelerator.device)
                loss = model(input_ids=batch, labels=batch).loss
                total += torch.stack([loss.double() * batch.numel(), torch.tensor(batch.numel(), device=loss.device)])
        total = accelerator.reduce(total, "sum")
        model.train()
        return (total[0] / total[1]).item()

    # --- train
    model.train()
    val_loss_initial = state.get("val_loss_initial")
    if val_loss_initial is None:
        val_loss_initial = evaluate()
        metrics_log.write(0, {"val_loss": val_loss_initial, "val_ppl": math.exp(min(val_loss_initial, 50))})
    first_samples, last = None, {}
    clock = StepClock.resumed(cfg.timing_warmup_steps, state)
    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=start_step,
        disable=not accelerator.is_main_process,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
    )
    for step in range(start_step, cfg.train.max_steps):
        clock.start()
        lr = learning_rate(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            blocks = get_batch(step, micro_step, rank)
            if first_samples is None and not cfg.data.streaming:
                first_samples = accelerator.gather(torch.as_tensor(sampler.indices(step, 0, rank))).tolist()
            batch = torch.as_tensor(blocks, dtype=torch.long, device=accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                step_loss += loss.detach() / accumulation
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
                    if not all_finite(accelerator, step_loss, grad_norm):
                        raise StageFailed(stopped_message(
                            out / "checkpoints", step, f"non-finite training signal (loss {float(step_loss):.4g}, "
                            f"grad norm {float(grad_norm) if grad_norm is not None else 'n/a'})",
                            "Lower train.lr or raise train.warmup_steps"))  # fmt: skip
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        seconds = clock.stop()
        window["loss"] += step_loss.item()
        window["steps"] += 1
        window["seconds"] += seconds
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.train.max_steps:
            loss_avg = accelerator.reduce(
                torch.tensor(window["loss"] / window["steps"], device=accelerator.device), "mean"
            ).item()
            tokens_per_second = tokens_per_step * window["steps"] / window["seconds"]
            last = {
                "loss": loss_avg,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_second": tokens_per_second,
                "tokens": done * tokens_per_step,
                "mfu": utilisation(tokens_per_second, flops_per_token, peak, world),
            }
            metrics_log.write(done, last)
            bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
            window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
        if done % cfg.eval_every == 0 or done == cfg.train.max_steps:
            val_loss = evaluate()
            last.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            metrics_log.write(done, {"val_loss": val_loss, "val_ppl": last["val_ppl"]})
            if accelerator.is_main_process:
                bar.write(f"step {done}: val loss {val_loss:.4f}, ppl {last['val_ppl']:.2f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.train.max_steps:
            save_checkpoint(
                accelerator,
                out / "checkpoints",
                done,
                {
                    "val_loss_initial": val_loss_initial,
                    **clock.state(),
                    "tokens": done * tokens_per_step,
                },
                cfg.keep_checkpoints,
            )
    bar.close()
    if "val_loss" not in last:  # resumed at the very end: nothing trained in this process
        last["val_loss"] = evaluate()
        last["val_ppl"] = math.exp(min(last["val_loss"], 50))

    # --- save: a model folder that AutoModelForCausalLM loads, then the manifest, last
    facts = launch_facts(accelerator, model)
    state_dict = accelerator.get_state_dict(model)
    metrics = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        with atomic_dir(out / "model") as tmp:
            save_model(unwrapped, tokenizer, tmp, state_dict=state_dict)
        total_tokens = cfg.train.max_steps * tokens_per_step
        steady = clock.tokens_per_second(tokens_per_step, cfg.train.max_steps)  # clock.seconds spans every process
        metrics = {
            "parameters": n_params["total"], "parameters_matmul": n_params["matmul"],
            "flops_per_token": flops_per_token, "steps": cfg.train.max_steps, "tokens": total_tokens,
            "tokens_per_step": tokens_per_step, "gradient_accumulation": accumulation,
            "precision": accelerator.mixed_precision, "val_loss_initial": val_loss_initial,
            "val_loss": last["val_loss"], "val_ppl": last["val_ppl"], "train_loss": last.get("loss"),
            "tokens_per_second": steady, "mfu": utilisation(steady, flops_per_token, peak, world),
            "train_seconds": clock.seconds, "warmup_seconds": clock.warmup_seconds,
            "timed_steps": clock.steady_steps, "compile": compile_model, "fused_adamw": fused_adamw,
            "fused_loss": cfg.train.fused_loss,
            "peak_flops_per_device": peak, "peak_flops_source": peak_source,
            "resumed_from_step": start_step if resume_from else None,
            "n_train_blocks": None if cfg.data.streaming else len(train_blocks),
            "first_micro_batch_samples_by_rank": first_samples, **facts,
        }  # fmt: skip
        inputs = {"tokenizer": {tokenizer_path: tokenizer_hash}, "data": describe_data(cfg.data)}
        if cfg.model.init_from:
            inputs["init_from"] = describe_input(cfg.model.init_from)
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        log(
            f"done: val loss {val_loss_initial:.3f} -> {last['val_loss']:.3f}, "
            f"{metrics['tokens_per_second']:,.0f} tokens/s, MFU {metrics['mfu']:.1%} -> {out / 'model'}",
            STAGE,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _seeded_model(cfg: PretrainConfig, tokenizer):
    import torch

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, tokenizer)
