"""Loading the base model and tokenizer: a local HF directory, a hub id (when online) or a GGUF file.

Weights load from safetensors only (or GGUF, de-quantised by transformers); model code shipped with a
checkpoint runs only when `model.trust_remote_code` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dapt_core.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelConfigError(ValueError):
    pass


def _kwargs(cfg: ModelConfig) -> dict:
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        if not Path(cfg.base or "", cfg.gguf_file).is_file():
            raise ModelConfigError(f"model.gguf_file: {cfg.gguf_file} not found in model.base ({cfg.base})")
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def _require_base(cfg: ModelConfig) -> str:
    if not cfg.base:
        raise ModelConfigError(
            "model.base is required for this stage: a local model directory, a hub id, or a folder holding "
            "model.gguf_file"
        )
    return cfg.base


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The base tokenizer (a fast tokenizer: batched encoding and `tokenizer.backend_tokenizer` are needed)."""
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    return AutoTokenizer.from_pretrained(_require_base(cfg), **_kwargs(cfg))


def load_model(cfg: ModelConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The base causal LM, in float32 unless `dtype` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = _kwargs(cfg)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    model = AutoModelForCausalLM.from_pretrained(_require_base(cfg), dtype=dtype or torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        # transformers de-quantises GGUF weights to `dtype` but keeps the GGUF "quantizer", which makes the
        # model refuse save_pretrained. The weights are plain tensors now: drop it so stages can save them.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model


def module_names(cfg: ModelConfig) -> tuple[str, set[str]]:
    """The base model's class name and the dotted names of all its submodules, from its config alone: the model is
    built on PyTorch's meta device, so no weights are read or allocated (the same cost for 135M and 70B parameters)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(_require_base(cfg), **_kwargs(cfg))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.trust_remote_code)
    return type(model).__name__, {name for name, _ in model.named_modules() if name}


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS in front of encoded text (Llama 2/3 do; GPT-2/SmolLM/Qwen do not): packing and
    SFT follow the tokenizer's own convention."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]


def load_from_dir(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer saved by a dapt stage (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(path)


def base_fingerprint(cfg: ModelConfig) -> str:
    """A content hash of the base model, for cache keys: the weights/tokenizer files of a local directory
    (or the GGUF file), else the hub id (online use: pin a revision in the id's directory instead)."""
    from dapt_core.hashing import sha256_file, stable_hash

    base = _require_base(cfg)
    tokenizer_files = sorted(p for p in Path(cfg.tokenizer).rglob("*") if p.is_file()) if cfg.tokenizer else []
    tokenizer_part = [(str(p), sha256_file(p)) for p in tokenizer_files]
    root = Path(base)
    if not root.exists():
        return stable_hash("hub", base, cfg.gguf_file, tokenizer_part, cfg.trust_remote_code)
    if cfg.gguf_file:
        files = [root / cfg.gguf_file]
    else:  # weights, configs, tokenizer files, and remote code (.py) when trust_remote_code runs it
        files = sorted(
            p for p in root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".model", ".txt", ".py")
        )
    return stable_hash([(p.name, sha256_file(p)) for p in files], tokenizer_part, cfg.trust_remote_code)
