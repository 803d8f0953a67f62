"""Hostile inputs to the library and the CLI: steer files whose header claims tensors it should not
have, data files nested deep or holding lone surrogates or huge texts, and parameters of the wrong
type. Each is one clear error naming the problem, raised before the expensive work."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from test_cli_hostile import assert_one_line_error, run
from test_models_collect import _tiny

import innsteer
from innsteer import ConfigError, SteerFileError
from innsteer.core.hooks import check_layer
from innsteer.core.steerers import LinearSteerer, load_steerer
from innsteer.core.steerers import base as steerers_base
from innsteer.datasets.ab import MAX_TEXT_CHARS, DataError
from innsteer.datasets.files import load_items, load_prompts
from innsteer.datasets.source import from_files
from innsteer.hf.fit import pairs_to_items


def _with_extra_tensor(source, target, n_bytes: int) -> None:
    """``source``'s safetensors file plus a float32 tensor 'extra' of ``n_bytes``, its data left as a
    sparse hole (the header says it is there; the disk holds nothing)."""
    raw = open(source, "rb").read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    header["extra"] = {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [len(data), len(data) + n_bytes]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(target, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded + data)
        handle.truncate(8 + len(encoded) + len(data) + n_bytes)


def test_a_steer_file_is_refused_from_its_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Was: a 2 GiB extra tensor was read whole (5.9 GB peak RSS) before 'unexpected tensor'."""
    LinearSteerer(torch.ones(16), 3, model_id="m").save(tmp_path / "caa.safetensors")
    _with_extra_tensor(tmp_path / "caa.safetensors", tmp_path / "big.safetensors", 2 * 2**30)
    read = []
    real_load_file = steerers_base.load_file
    monkeypatch.setattr(steerers_base, "load_file", lambda path: read.append(path) or real_load_file(path))
    with pytest.raises(SteerFileError, match=r"unexpected \['extra'\]"):
        load_steerer(tmp_path / "big.safetensors")
    assert read == []  # refused from the header alone
    assert torch.equal(load_steerer(tmp_path / "caa.safetensors").vector, torch.ones(16))  # a good file still loads


def test_inn_steer_files_are_checked_from_the_header_too(tmp_path, monkeypatch):
    from flows import random_inn

    steerer = innsteer.INNSteerer(random_inn(16), torch.randn(16), 5, alpha=1.0, model_id="m")
    steerer.save(tmp_path / "inn.safetensors")
    _with_extra_tensor(tmp_path / "inn.safetensors", tmp_path / "big.safetensors", 2**20)
    monkeypatch.setattr(steerers_base, "load_file", lambda path: pytest.fail("tensor data read"))
    with pytest.raises(SteerFileError, match=r"the INN config .*unexpected \['extra'\]"):
        load_steerer(tmp_path / "big.safetensors")


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_data_files_nested_too_deep_are_one_line_errors(tmp_path):
    """Was: a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    lines = '{"prompt": "p", "positive": "y", "negative": "n"}\n{"prompt": ' + deep + "}\n"
    for name, text, where in (("deep.json", deep, "deep.json:"), ("deep.jsonl", lines, "deep.jsonl:2")):
        path = _write(tmp_path / name, text)
        for load in (load_items, load_prompts):
            with pytest.raises(DataError, match=f"{where}.*nested too deeply") as caught:
                load(path)
            assert "\n" not in str(caught.value)


def test_lone_surrogates_are_named_with_their_record(tmp_path):
    """Was: a UnicodeEncodeError traceback from the tokenizer (valid JSON can hold "\\ud800")."""
    good = json.dumps({"prompt": "Hi", "positive": "Yes.", "negative": "No."})
    bad = '{"prompt": "Hi", "positive": "Yes \\ud800", "negative": "No."}'
    path = _write(tmp_path / "items.jsonl", f"{good}\n{bad}\n")
    with pytest.raises(DataError, match=r"items.jsonl:2: option \(A\) holds '\\ud800' .*lone surrogate"):
        load_items(path)
    prompts = _write(tmp_path / "prompts.json", '["Fine.", "Bad \\udfff"]')
    with pytest.raises(DataError, match=r"prompts.json: record 2: the prompt holds '\\udfff'"):
        load_prompts(prompts)
    with pytest.raises(ConfigError, match=r"pair 1: .*lone surrogate"):
        pairs_to_items([("a", "b"), ("ok \ud800", "no")])


def test_texts_longer_than_the_bound_are_refused_naming_record_and_limit(tmp_path):
    """Was: one 100 000-character question among 7 items drove RSS past 8 GB."""
    records = [{"prompt": f"q{i}", "positive": "Yes.", "negative": "No."} for i in range(7)]
    records[4]["prompt"] = "why " * 25_000
    path = _write(tmp_path / "items.json", json.dumps(records))
    with pytest.raises(
        DataError, match=f"record 5: the question is 100000 characters long, more than the {MAX_TEXT_CHARS}"
    ):
        load_items(path)
    records[4]["prompt"] = "why " * (MAX_TEXT_CHARS // 4)  # at the bound: taken
    assert len(load_items(_write(tmp_path / "ok.json", json.dumps(records)))) == 7


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    deep = _write(tmp_path / "deep.json", "[" * 50_000 + "]" * 50_000)
    surrogate = _write(tmp_path / "s.jsonl", '{"prompt": "a", "positive": "b\\ud800", "negative": "c"}\n' * 3)
    for path, words in ((deep, "nested too deeply"), (surrogate, "lone surrogate")):
        code, _, err = run(
            ["train", "--data", str(path), "--method", "caa", "-o", str(tmp_path / "o.safetensors")], capsys
        )
        assert_one_line_error(code, err.splitlines()[-1] if err else err, str(path), words)


def test_repeated_items_never_reach_both_training_and_test(tmp_path, capsys):
    rows = [{"prompt": f"Q {i}?", "positive": f"Yes {i}", "negative": f"No {i}"} for i in range(30)]
    data = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows + rows[:5]))  # 5 repeats
    test = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows[25:] + rows[25:27]))
    source = from_files(str(data))
    assert len(source.train) + len(source.test) == 30 and source.notes == (f"{data}: 5 repeated item(s) left out",)
    assert not {i.question for i in source.train} & {i.question for i in source.test}
    source = from_files(str(data), str(test))
    assert [i.question for i in source.test] == [f"Q {i}?" for i in range(25, 30)]
    assert [i.question for i in source.train] == [f"Q {i}?" for i in range(25)]
    assert len(source.notes) == 3 and "5 item(s) of" in source.notes[2] and "left out of training" in source.notes[2]
    with pytest.raises(DataError, match="leaves 0 item.s. to train on: 30 of its items are also in"):
        from_files(str(data), str(data))  # the same file for both: nothing left to train on
    # the command says so on stderr, before its model loads (here a model that does not exist)
    code, _, err = run(["tune", "--data", str(data), "--test-data", str(test), "--model", str(tmp_path / "none"),
                        "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and err.splitlines()[:3] == [f"innsteer: note: {note}" for note in source.notes]


@pytest.mark.parametrize("layer", [3.0, "3", None, True, 1.5])
def test_layer_must_be_an_integer(layer):
    """Was: confusing TypeErrors, and layer=True taken as layer 1."""
    with pytest.raises(ConfigError, match=f"layer must be an integer .*got {layer!r}"):
        check_layer(_tiny("llama"), layer)


def test_fit_names_a_layer_of_the_wrong_type_before_any_model_work():
    import numpy as np

    from innsteer.hf.models import LoadedModel

    model = _tiny("llama")
    with pytest.raises(ConfigError, match="layer must be an integer"):
        innsteer.fit(LoadedModel(model, None, "tiny"), None, [("a", "b"), ("c", "d")], layer=True)
    assert check_layer(model, np.int64(2)) == 2  # integers of any kind still work
