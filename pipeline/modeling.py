"""Models: build a Llama-style decoder from size fields, or load any causal LM and tokenizer; LoRA; parameters, FLOPs.

A from-scratch model takes its vocabulary and special-token ids from a tokenizer artifact, so the two always agree.
Loading is safe by default: safetensors only, `trust_remote_code` off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from pipeline import gguf
from pipeline.artifacts import MANIFEST, atomic_write_text
from pipeline.config import StageFailed, UserError, config, field

# Architectures that share Llama's config fields; pick one with model.family.
FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}

# Dense bf16 tensor-core peak FLOP/s per device, from vendor data sheets (no sparsity).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "V100": 125e12, "T4": 65e12, "MI300X": 1307e12, "MI250X": 383e12,
}  # fmt: skip


@config
class ModelConfig:
    """Either init_from (continue a model) or the size fields (a new Llama-style model)."""

    init_from: str | None = field(
        None, "Continue from this model: a pretrain/sft artifact folder, a local HF model folder, or a hub name."
    )
    family: str = field("llama", "Architecture of a new model: llama, qwen2 or mistral (same size fields).")
    hidden_size: int = field(128, "Width of the residual stream.", ge=8)
    num_layers: int = field(4, "Number of transformer blocks.", ge=1)
    num_heads: int = field(4, "Attention heads.", ge=1)
    num_kv_heads: int | None = field(None, "Key/value heads for grouped-query attention (None: = num_heads).", ge=1)
    intermediate_size: int | None = field(None, "MLP width (None: ~8/3 x hidden, rounded up to 32).", ge=1)
    max_seq_len: int = field(256, "Context length (max_position_embeddings).", ge=8)
    rope_theta: float = field(10000.0, "RoPE base frequency.", gt=0)
    tie_embeddings: bool = field(True, "Share the input embedding with the output projection (saves params).")
    dropout: float = field(0.0, "Attention dropout probability during training.", ge=0.0, lt=1.0)
    rms_norm_eps: float = field(1e-5, "Epsilon of the RMSNorm layers.", gt=0)
    initializer_range: float = field(0.02, "Std of the normal initialisation of weights.", gt=0)
    attn_implementation: str = field("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (GPU).")
    trust_remote_code: bool = field(False, "Allow init_from models that ship their own Python code. Off: safe.")

    def check(self) -> list[str]:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family: got {self.family!r}, expected one of {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            problems.append(f"num_heads {self.num_heads} must be divisible by num_kv_heads {kv}")
        return problems


def _require_local_if_path_like(path: str, key: str) -> None:
    """Hub ids are `name` or `org/name`: anything else that does not exist is a missing local folder."""
    if not Path(path).exists() and (path.count("/") > 1 or path.startswith((".", "/", "~"))):
        raise UserError(f"{key}: no such folder: {path!r} (did the stage that writes it run?)")


def resolve_model_path(path: str, key: str = "model.init_from") -> str:
    """A pipeline artifact folder stands for its model/ subfolder, a .gguf file for its converted safetensors
    folder (pipeline/gguf.py); anything else is passed on as is. A leading ~ is the home folder. Errors name the
    config `key` the path came from."""
    path = os.path.expanduser(path)
    if gguf.is_gguf(path):
        return gguf.model_folder(path)
    _require_local_if_path_like(path, key)
    folder = Path(path)
    if (folder / MANIFEST).is_file() and (folder / "model").is_dir():
        return str(folder / "model")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(
            f"{key}: {path} is a folder without config.json or manifest.json; "
            "if it is a pipeline stage folder, that stage has not finished"
        )
    return path


def resolve_tokenizer_path(path: str) -> str:
    """A tokenizer (or model) artifact folder stands for its tokenizer/ or model/ subfolder; it must be finished.
    A .gguf file stands for its converted folder, which holds the tokenizer too."""
    path = os.path.expanduser(path)
    if gguf.is_gguf(path):
        return gguf.model_folder(path)
    _require_local_if_path_like(path, "tokenizer")
    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer_config.json").is_file():
        if not (folder / MANIFEST).is_file():
            raise UserError(
                f"tokenizer: {path} is unfinished (no manifest.json) or not a tokenizer folder; "
                "re-run the tokenizer stage that writes it"
            )
        for sub in ("tokenizer", "model"):
            if (folder / sub / "tokenizer_config.json").is_file():
                return str(folder / sub)
        raise UserError(f"tokenizer: {path} holds no tokenizer/ or model/ folder with a tokenizer")
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False, pad_with_eos: bool = False):
    """AutoTokenizer of a tokenizer/model folder or hub name. `pad_with_eos`: a tokenizer without a pad token pads
    with EOS (batched scoring and training need one; the attention mask hides it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer: cannot load {path!r}: {' '.join(str(exc).split())[:300]}") from None
    if pad_with_eos and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_and_tokenizer(
    model: str, tokenizer: str | None, trust_remote_code: bool, pad_with_eos: bool = False, key: str = "init_from"
):
    """(model path, tokenizer) for a stage's model key: an artifact folder stands for its model/, and the tokenizer
    is the `tokenizer` key's if set, else the model's own (load_tokenizer; `pad_with_eos` as there)."""
    path = resolve_model_path(model, key)
    return path, load_tokenizer(tokenizer or path, trust_remote_code, pad_with_eos)


def load_pretrained(auto_class, path: str, trust_remote_code: bool = False, key: str = "init_from", **kwargs):
    """`auto_class.from_pretrained(path)` the safe way (safetensors only, fp32 unless `dtype` is given); a folder or
    name that does not load is a UserError naming the config key, not a traceback."""
    import torch

    kwargs.setdefault("dtype", torch.float32)
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot load {path!r}: {' '.join(str(exc).split())[:300]}") from None


@config
class LoraSection:
    enabled: bool = field(False, "Train LoRA adapters (peft) instead of all weights.")
    r: int = field(16, "Adapter rank.", ge=1)
    alpha: int = field(32, "Adapter scaling numerator (scale = alpha / r).", ge=1)
    dropout: float = field(0.05, "Dropout on the adapter input.", ge=0.0, lt=1.0)
    target_modules: str | list[str] = field(
        "all-linear", "Modules to adapt: 'all-linear' (every linear layer but the output head) or a list of names."
    )
    merge: bool = field(True, "Merge the adapters into the saved model (loads without peft); else save adapters.")


def peft_config(lora: LoraSection, task_type: str = "CAUSAL_LM"):
    """The peft LoraConfig for a LoraSection, or None when LoRA is off."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)  # fmt: skip


def save_model(
    model, tokenizer, folder: Path, merge: bool = False, generation: bool = True, state_dict: dict | None = None
) -> None:
    """save_pretrained (safetensors) of a trained model (unwrapped), its tokenizer and, for a model that writes,
    the generation config (stop at EOS and end-of-turn); LoRA adapters merged into the weights when asked.
    `state_dict`: the weights gathered from every rank (accelerator.get_state_dict) where they are sharded."""
    if merge and hasattr(model, "merge_and_unload"):
        if state_dict is not None and _partitioned(model):
            model = _whole_copy(model, state_dict)  # ZeRO-3: this rank holds a shard; merge a gathered copy
        model, state_dict = model.merge_and_unload(), None  # the merged model's own weights are the whole ones
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if generation:
        from pipeline.generation import generation_config

        generation_config(tokenizer).save_pretrained(folder)


def _without_tied_copies(model, state_dict: dict) -> dict:
    """A gathered state dict without the second name of tied weights (an LM head tied to the embeddings):
    gathering clones tensors (DeepSpeed), so save_pretrained can no longer see that they are one and would write
    both. The model's own parameters say which names share a tensor."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            copies.add(name)
        first.setdefault(id(param), name)
    return {key: value for key, value in state_dict.items() if key not in copies}


def _partitioned(model) -> bool:
    """Parameters split across ranks by ZeRO-3 (each holds a shard; the module's tensors are empty here)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _whole_copy(peft_model, state_dict: dict):
    """A LoRA model rebuilt on this process from weights gathered from every rank: the same architecture and
    adapter config, outside DeepSpeed (a ZeRO-3 config in force would partition it again at construction)."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    dtype = next(iter(state_dict.values())).dtype
    with whole_weights():
        copy = get_peft_model(type(base)(base.config).to(dtype), peft_model.peft_config[peft_model.active_adapter])
    missing, unexpected = copy.load_state_dict(state_dict, strict=False)
    own = copy.state_dict()
    loaded = {own[k].data_ptr() for k in state_dict if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights come once
    if unexpected or untied:
        raise StageFailed(f"gathered weights do not fit the model: missing {untied[:5]}, unexpected {unexpected[:5]}")
    return copy


@contextlib.contextmanager
def whole_weights():
    """Build or load models whole on this process, even where a ZeRO-3 config is in force (transformers then
    partitions every model it constructs, `deepspeed.zero.Init`). For copies gathered from the ranks, and for
    models DeepSpeed will not prepare (a frozen reference or reward model: each process keeps a full copy)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def model_context_length(cfg: ModelConfig) -> int:
    """The longest sequence the init_from model takes, read from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.init_from)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.init_from: cannot load {path!r}: {' '.join(str(exc).split())[:300]}") from None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def default_intermediate_size(hidden: int) -> int:
    # SwiGLU keeps the MLP's parameter count near 4 x hidden^2 with 2/3 of 4 x hidden, rounded for matmuls.
    return 32 * -(-int(8 * hidden / 3) // 32)


def build_model(cfg: ModelConfig, tokenizer, dtype=None):
    """A new model from the size fields, or the `init_from` model; token ids taken from the tokenizer."""
    import torch
    import transformers

    if cfg.init_from:
        path = resolve_model_path(cfg.init_from)
        model = load_pretrained(
            transformers.AutoModelForCausalLM, path, cfg.trust_remote_code, "model.init_from",
            dtype=dtype or torch.float32, attn_implementation=cfg.attn_implementation,
        )  # fmt: skip
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        return model
    config_cls = getattr(transformers, FAMILIES[cfg.family])
    model_config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or default_intermediate_size(cfg.hidden_size),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_config._attn_implementation = cfg.attn_implementation
    model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=dtype or torch.float32)
    return model


def count_parameters(model) -> dict[str, int]:
    """Total parameters, and those that take part in matmuls (the input embedding is a lookup, not a matmul)."""
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    total = sum(p.numel() for p in params.values())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    matmul = total - (0 if tied else embedding.numel())
    return {"total": total, "matmul": matmul, "embedding": embedding.numel()}


def training_flops_per_token(model, seq_len: int) -> float:
    """FLOPs to train on one token: 6 per matmul parameter (forward 2, backward 4), plus attention scores and
    values, 12 x layers x width x context (the PaLM appendix B formula)."""
    config = model.config
    matmul = count_parameters(model)["matmul"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * matmul + attention


def peak_flops(device) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from: the data-sheet table for known GPUs, else a
    fp32 matmul measured now (CPU, unknown GPUs), never below the best this machine has measured before: one
    taken while other processes were busy once put a fresh run's MFU at 101%."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 data sheet"
        machine = f"cuda:{name}"
    else:
        machine = f"{device.type}:{os.cpu_count()}cpus:{torch.get_num_threads()}threads:torch{torch.__version__}"
    return best_measured_flops(machine, measure_matmul_flops(device)), f"{device.type} fp32 matmul measured"


def best_measured_flops(machine: str, measured: float) -> float:
    """The highest matmul rate measured on `machine` so far (this one included), kept in llmpipe's cache. Other
    processes on the machine can only lower a measurement, so the best one is the closest to the peak."""
    import json

    path = gguf.cache_root() / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    best = max(measured, float(known.get(machine, 0.0)))
    if best > known.get(machine, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({**known, machine: best}, indent=1))
        except OSError:  # a read-only cache only costs the memory of this measurement
            pass
    return best


def utilisation(tokens_per_second: float, flops_per_token: float, peak: float, world: int) -> float:
    """Model FLOPs utilisation: achieved over peak FLOP/s, at most 1 (a higher share means the peak was measured
    low, not that the run beat it)."""
    return min(tokens_per_second * flops_per_token / (peak * world), 1.0)


def measure_matmul_flops(device, size: int = 1024, repeats: int = 5) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)  # a private generator: training's RNG stream stays untouched
    a = torch.rand(size, size, generator=generator).to(device)
    b = torch.rand(size, size, generator=generator).to(device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up caches and kernels
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
