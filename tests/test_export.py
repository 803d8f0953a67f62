"""GGUF export, read back with the independent `gguf` reader, and the layer-index mapping.

The mapping test compares llama.cpp's control vector ``direction.L`` with the PyTorch path adding
the same vector to decoder layer L's output (Hugging Face ``hidden_states[L + 1]``).
"""

import argparse
import os
import signal
import stat
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from llama_helpers import random_inn_steerer

from innsteer.core.errors import ConfigError
from innsteer.core.steerers import AffineSteerer, LinearSteerer
from innsteer.llama.export import export, export_control_vector, export_steer_gguf, read_control_vector


def fields(reader):
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_inn_export_holds_everything(tmp_path):
    steerer = random_inn_steerer(24, mlp_hidden=8, couplings=3, layer=7, alpha=2.5, model_id="m", behavior="b")
    export_steer_gguf(steerer, tmp_path / "s.gguf", model_hint="llama")
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    meta = fields(reader)
    assert meta["general.architecture"] == "innsteer"
    assert meta["innsteer.format_version"] == 1 and meta["innsteer.kind"] == "inn"
    assert (meta["innsteer.hidden_size"], meta["innsteer.mlp_hidden"], meta["innsteer.num_couplings"]) == (24, 8, 3)
    assert meta["innsteer.layer"] == 7 and meta["innsteer.alpha"] == pytest.approx(2.5)
    assert meta["innsteer.clamp"] == pytest.approx(steerer.inn.config.clamp)
    assert (meta["innsteer.model_id"], meta["innsteer.model_hint"], meta["innsteer.behavior"]) == ("m", "llama", "b")
    inn = steerer.inn
    for name, ref in (("mean", inn.mean), ("scale", inn.scale), ("direction", steerer.direction)):
        np.testing.assert_array_equal(tensor(reader, name).data, ref.numpy())
    cond, trans = inn.partitions()
    for k in range(3):
        np.testing.assert_array_equal(tensor(reader, f"coupling.{k}.cond_idx").data, cond[k].numpy())
        np.testing.assert_array_equal(tensor(reader, f"coupling.{k}.trans_idx").data, trans[k].numpy())
        for name, ref in (("w1", inn.w1[k]), ("b1", inn.b1[k]), ("w2", inn.w2[k]), ("b2", inn.b2[k])):
            t = tensor(reader, f"coupling.{k}.{name}")
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data).reshape(ref.shape), ref.detach().numpy())


def test_bf16_export_rounds_like_torch(tmp_path):
    steerer = random_inn_steerer(16, mlp_hidden=8, couplings=2)
    export_steer_gguf(steerer, tmp_path / "s.gguf", weight_dtype="bfloat16")
    t = tensor(gguf.GGUFReader(tmp_path / "s.gguf"), "coupling.1.w2")
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    bits = np.asarray(t.data).view(np.uint16).reshape(-1)
    expected = steerer.inn.w2[1].detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(-1)
    np.testing.assert_array_equal(bits, expected)


def test_control_vector_file_is_the_stock_format(tmp_path):
    vector = torch.randn(32)
    export_control_vector(LinearSteerer(vector, 9, method="caa"), tmp_path / "cv.gguf", model_hint="llama")
    reader = gguf.GGUFReader(tmp_path / "cv.gguf")
    meta = fields(reader)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama" and meta["controlvector.layer_count"] == 1
    assert [t.name for t in reader.tensors] == ["direction.9"]
    t = tensor(reader, "direction.9")
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [32]
    np.testing.assert_array_equal(t.data, vector.numpy())
    directions, info = read_control_vector(tmp_path / "cv.gguf")
    assert list(directions) == [9] and info["model_hint"] == "llama"
    np.testing.assert_array_equal(directions[9], vector.numpy())


def test_export_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="cannot steer layer 0"):
        export_control_vector(LinearSteerer(torch.ones(8), 0), tmp_path / "a.gguf")
    for kind in ("innsteer", "controlvector"):
        steerer = (
            random_inn_steerer(8, mlp_hidden=4, layer=-2) if kind == "innsteer" else LinearSteerer(torch.ones(8), -2)
        )
        with pytest.raises(ConfigError, match="layer -2 is negative"):
            export(steerer, tmp_path / "n.gguf", format=kind)
    # wrong kinds are user errors the CLI reports in one line (ConfigError), not TypeErrors
    with pytest.raises(ConfigError, match="nonlinear"):
        export(random_inn_steerer(8, mlp_hidden=4), tmp_path / "b.gguf", format="controlvector")
    with pytest.raises(ConfigError, match="linear_act steerer is not additive"):
        export(AffineSteerer(torch.ones(8), torch.zeros(8), 3), tmp_path / "c.gguf", format="controlvector")
    with pytest.raises(ConfigError, match="not an INN steerer"):
        export(LinearSteerer(torch.ones(8), 3), tmp_path / "d.gguf")
    with pytest.raises(ValueError, match="unknown export format"):
        export(LinearSteerer(torch.ones(8), 3), tmp_path / "e.gguf", format="onnx")


def test_export_command_from_saved_steer_files(tmp_path):
    from innsteer.cli import llama as llama_cli

    parser = argparse.ArgumentParser()
    llama_cli.register(parser.add_subparsers())
    inn_file, linear_file = tmp_path / "inn.safetensors", tmp_path / "caa.safetensors"
    steerer = random_inn_steerer(16, mlp_hidden=8, layer=4)
    steerer.save(inn_file)
    LinearSteerer(torch.arange(16.0), 5, method="caa").save(linear_file)
    for argv in (
        [str(inn_file), "-o", str(tmp_path / "inn.gguf"), "--weight-dtype", "bfloat16"],
        [str(linear_file), "-o", str(tmp_path / "cv.gguf"), "--format", "controlvector"],
    ):
        args = parser.parse_args(["export", *argv])
        assert args.func(args) == 0
    meta = fields(gguf.GGUFReader(tmp_path / "inn.gguf"))
    assert meta["innsteer.layer"] == 4 and meta["innsteer.hidden_size"] == 16
    directions, _ = read_control_vector(tmp_path / "cv.gguf")
    np.testing.assert_array_equal(directions[5], np.arange(16.0, dtype=np.float32))


def test_a_signed_steerer_exports_one_map_per_side(tmp_path):
    """A GGUF holds one map: each side exports alone, and is that map's own export (the away map
    with its default alpha negative: it is the map of negative alphas)."""
    from innsteer.cli import llama as llama_cli
    from innsteer.core.steerers import SignedSteerer

    toward = random_inn_steerer(16, mlp_hidden=8, layer=4, alpha=2.0, seed=0)
    away = random_inn_steerer(16, mlp_hidden=8, couplings=3, layer=4, alpha=2.0, seed=1)
    signed_file = tmp_path / "signed.safetensors"
    SignedSteerer(toward, away).save(signed_file)
    with pytest.raises(ConfigError, match="--side toward / --side away"):
        export(signed_file, tmp_path / "both.gguf")
    with pytest.raises(ConfigError, match="only a signed .* has sides, not an INN steerer"):
        export(toward, tmp_path / "x.gguf", side="away")
    with pytest.raises(ConfigError, match="unknown side 'up'"):
        export(signed_file, tmp_path / "x.gguf", side="up")
    parser = argparse.ArgumentParser()
    llama_cli.register(parser.add_subparsers())
    for side, alone, alpha in (("toward", toward, 2.0), ("away", away, -2.0)):
        args = parser.parse_args(["export", str(signed_file), "-o", str(tmp_path / f"{side}.gguf"), "--side", side])
        assert args.func(args) == 0
        export_steer_gguf(alone, tmp_path / f"{side}-alone.gguf", alpha=alpha)
        assert (tmp_path / f"{side}.gguf").read_bytes() == (tmp_path / f"{side}-alone.gguf").read_bytes()
        meta = fields(gguf.GGUFReader(tmp_path / f"{side}.gguf"))
        assert meta["innsteer.alpha"] == alpha and meta["innsteer.num_couplings"] == alone.inn.config.num_couplings
    assert not (tmp_path / "both.gguf").exists() and not (tmp_path / "x.gguf").exists()


@pytest.mark.llama
@pytest.mark.slow
def test_direction_l_is_decoder_layer_l_output_in_the_pytorch_path(tmp_path, default_lm):
    """A control vector written for layer L acts in llama.cpp like the same vector added to decoder
    layer L's output in transformers (same GGUF, dequantized); L-1 and L+1 do not."""
    pytest.importorskip("llama_cpp")
    from llama_helpers import last_logits, log_softmax

    from innsteer.core.hooks import steering
    from innsteer.hf.models import default_gguf_path
    from innsteer.llama.steering import SteeredLlama

    lm = default_lm
    text = "The quick brown fox jumps over the lazy dog. In the morning, the farmer"
    ids = lm.tokenizer(text)["input_ids"]
    layer = 10
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(3)) * 6
    steerer = LinearSteerer(vector, layer, method="caa")
    with torch.inference_mode(), steering(lm.model, steerer, alpha=1.0, positions="all"):
        hf = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
    llm = SteeredLlama(str(default_gguf_path()), n_ctx=256, n_threads=2)
    distance = {}
    for shift in (-1, 0, 1):
        path = tmp_path / f"cv{shift}.gguf"
        export_control_vector(LinearSteerer(vector, layer + shift), path)
        llm.steering.set_control_vector(path)
        distance[shift] = np.abs(log_softmax(last_logits(llm, ids)) - log_softmax(hf)).mean()
    assert distance[0] < 0.5 * min(distance[-1], distance[1]), distance


# --- an export never destroys a file ---------------------------------------------------------------


def test_export_replaces_the_output_whole_never_in_place(tmp_path):
    """The old output's inode is never written: a second name for it (a hard link) keeps the old
    bytes, the new file appears whole under the output's name, and no partial file is left."""
    out = tmp_path / "s.gguf"
    export(random_inn_steerer(16, mlp_hidden=8, layer=3), out)
    old_bytes = out.read_bytes()
    (tmp_path / "old.gguf").hardlink_to(out)
    export(random_inn_steerer(16, mlp_hidden=8, layer=5, seed=1), out)
    assert (tmp_path / "old.gguf").read_bytes() == old_bytes
    assert fields(gguf.GGUFReader(out))["innsteer.layer"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf", "s.gguf"]


def test_failed_export_leaves_the_existing_output_untouched(tmp_path):
    out = tmp_path / "s.gguf"
    export(random_inn_steerer(16, mlp_hidden=8, layer=3), out)
    before = out.read_bytes()
    for name, value, problem in (
        ("layer", 2**31, "does not fit"),  # the GGUF field is int32
        ("alpha", 1e39, "not a finite float32"),  # finite as a double, inf as the float32 field
    ):
        steerer = random_inn_steerer(16, mlp_hidden=8)
        setattr(steerer, name, value)
        with pytest.raises(ConfigError, match=problem):
            export(steerer, out)
        assert out.read_bytes() == before
    infinite = LinearSteerer(torch.ones(16), 3, method="caa")
    infinite.vector.fill_(float("inf"))
    with pytest.raises(ConfigError, match="NaN, Inf"):
        export(infinite, out, format="controlvector")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]


def test_export_refuses_to_replace_its_own_input(tmp_path):
    source = tmp_path / "inn.safetensors"
    random_inn_steerer(16, mlp_hidden=8).save(source)
    content = source.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(source)
    (tmp_path / "hard.safetensors").hardlink_to(source)
    for output in (source, tmp_path / "link.safetensors", tmp_path / "hard.safetensors", tmp_path / "." / source.name):
        with pytest.raises(ConfigError, match="is the input steer file"):
            export(source, output)
        assert source.read_bytes() == content


def test_export_output_must_be_a_file_in_an_existing_directory(tmp_path):
    steerer = random_inn_steerer(16, mlp_hidden=8)
    with pytest.raises(ConfigError, match="is a directory"):
        export(steerer, tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        export(steerer, tmp_path / "missing" / "s.gguf")


def test_export_writes_through_a_symlink_with_the_usual_permissions(tmp_path):
    target = tmp_path / "real.gguf"
    target.write_bytes(b"old")
    (tmp_path / "link.gguf").symlink_to(target)
    old_umask = os.umask(0o027)
    try:
        export(random_inn_steerer(16, mlp_hidden=8, layer=6), tmp_path / "link.gguf")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "link.gguf").is_symlink()
    assert fields(gguf.GGUFReader(target))["innsteer.layer"] == 6
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0o666 less the umask, as any new file


KILL_MID_WRITE = """
import os, signal, sys
import gguf
from innsteer.llama.export import export

def killed(self, *args, **kwargs):  # the header and metadata are out; die before the tensors
    os.kill(os.getpid(), signal.SIGKILL)

gguf.GGUFWriter.write_tensors_to_file = killed
export(sys.argv[1], sys.argv[2])
"""


def test_an_export_killed_mid_write_leaves_the_old_file(tmp_path):
    """SIGKILL while the GGUF is being written: the old output is intact, one predictable partial
    file is left, and the next export replaces it."""
    source, out = tmp_path / "inn.safetensors", tmp_path / "s.gguf"
    random_inn_steerer(16, mlp_hidden=8, layer=2).save(source)
    export(random_inn_steerer(16, mlp_hidden=8, layer=7), out)
    before = out.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(source), str(out)], env=env)
    assert run.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.gguf.partial", "inn.safetensors", "s.gguf"]
    export(source, out)
    assert fields(gguf.GGUFReader(out))["innsteer.layer"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inn.safetensors", "s.gguf"]
