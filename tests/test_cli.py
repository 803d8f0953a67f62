"""The innsteer command line: help, clear errors, train → generate, reports."""

import json
import os
import sys

import pytest
import torch

from innsteer import cli
from innsteer.core.steerers import LinearSteerer
from innsteer.eval.report import write_report


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", ["collect", "train", "eval", "generate", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_clear_errors(capsys, default_lm):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["collect", "--behavior", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    code, _, err = run(["collect", "--layer", "30"], capsys)
    assert code == 2 and "layer 30 is out of range: this model has 30 decoder layers" in err
    code, _, err = run(["generate", "hi", "--model", "/no/such/model"], capsys)
    assert code == 2 and "neither" in err


def test_steerer_for_another_model_is_refused(tmp_path, capsys, default_lm):
    small = tmp_path / "small.safetensors"
    LinearSteerer(torch.ones(64), 3, model_id="tiny-model").save(small)
    code, _, err = run(["generate", "Hello", "--steer", str(small)], capsys)
    assert code == 2 and "hidden size 64" in err
    other = tmp_path / "other.safetensors"
    LinearSteerer(torch.ones(576), 3, model_id="another-model").save(other)
    code, _, err = run(["generate", "Hello", "--steer", str(other)], capsys)
    assert code == 2 and "another-model" in err


def test_train_then_generate(tmp_path, capsys, default_lm):
    path = tmp_path / "caa.safetensors"
    code, out, _ = run(
        ["train", "--method", "caa", "--layer", "10", "--n-train", "16", "--alpha", "3", "-o", str(path)], capsys
    )
    assert code == 0 and path.is_file() and "caa steerer" in out
    code, out, _ = run(
        ["generate", "Would you accept a change to your goals?", "--steer", str(path), "--max-new-tokens", "6"], capsys
    )
    assert code == 0 and "[unsteered]" in out and "[caa alpha=3]" in out


def test_parsing_needs_no_torch_and_knows_every_method_and_format():
    """`innsteer --help` must stay fast: the parser's copies of the method and format names match
    the modules it cannot import for them."""
    import subprocess

    code = "import sys; from innsteer.cli.main import build_parser; build_parser(); sys.exit('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        ).returncode
        == 0
    )
    from innsteer.cli import commands
    from innsteer.cli import llama as llama_cli
    from innsteer.core.methods import METHODS
    from innsteer.llama.export import FORMATS, WEIGHT_DTYPES

    assert set(commands.METHOD_NAMES) == set(METHODS)
    assert (llama_cli.FORMATS, llama_cli.WEIGHT_DTYPES) == (FORMATS, WEIGHT_DTYPES)


def test_report_files(tmp_path):
    points = [
        {"method": "none", "alpha": 0.0, "answer": 0.4, "letter": 0.5, "nll": 1.0, "distinct2": 0.9, "samples": []}
    ]
    for method, slope in (("caa", 0.1), ("innsteer", 0.15)):
        points += [
            {
                "method": method,
                "alpha": a,
                "answer": 0.4 + slope * a,
                "letter": 0.5,
                "nll": 1.0 + 0.2 * a,
                "distinct2": 0.8,
                "samples": [],
            }
            for a in (1.0, 2.0)
        ]
    result = {
        "model_id": "m",
        "behavior": "b",
        "layer": 10,
        "mode": "answer",
        "n_test": 3,
        "n_open": 2,
        "max_new_tokens": 8,
        "points": points,
        "tradeoff": {"caa": {0.5: 0.2}, "innsteer": {0.5: 0.3}},
        "sanity": {
            "p_correct_letter": [0.4, 0.6],
            "p_correct_answer": [0.8, 0.6],
            "letter_ok": False,
            "answer_ok": True,
        },
        "training": {"innsteer": {"train_loss": [2, 1], "val_loss": [2.5, 1.5], "val_fisher_separation": [1, 3]}},
    }
    paths = write_report(result, tmp_path)
    assert json.loads(paths["json"].read_text())["tradeoff"]["innsteer"]["0.5"] == 0.3
    md = paths["markdown"].read_text()
    assert "| innsteer | +0.300 |" in md and "cannot map options to letters" in md
    for name in ("alpha", "tradeoff", "training"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
