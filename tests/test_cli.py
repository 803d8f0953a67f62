"""The innsteer command line: help, clear errors, train → generate, reports."""

import json
import os
import sys

import pytest
import torch

from innsteer import cli
from innsteer.core.errors import ConfigError
from innsteer.core.steerers import LinearSteerer, load_steerer
from innsteer.eval.report import write_report
from innsteer.hf.collect import contrastive_activations


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


def test_train_defaults_to_the_tuned_layer_and_options(tmp_path, capsys, default_lm, monkeypatch):
    from innsteer.eval import tuned
    from innsteer.hf import fit as fit_module

    calls = []
    real_fit_method = fit_module.fit_method

    def spy(lm, method, items, layer, **kwargs):
        calls.append((method, layer, kwargs["options"]))
        options = {**kwargs.pop("options"), "max_epochs": 1} if method == "innsteer" else kwargs.pop("options")
        return real_fit_method(lm, method, items, layer, options=options, **kwargs)

    monkeypatch.setattr(fit_module, "fit_method", spy)
    record = {
        "model_id": default_lm.model_id,
        "behavior": "refusal",
        "n_layers": default_lm.num_layers,
        "chosen": {
            "caa": {"layer": 20, "options": {}},
            "innsteer": {"layer": 13, "options": {"transport_sides": "both"}},
        },
    }
    (tmp_path / "tuned" / default_lm.model_id).mkdir(parents=True)
    (tmp_path / "tuned" / default_lm.model_id / "refusal.json").write_text(json.dumps(record))
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path / "tuned")
    tuned.records.cache_clear()
    path = tmp_path / "refusal.safetensors"
    for method, layer in (("caa", 20), ("innsteer", 13)):
        argv = ["train", "--behavior", "refusal", "--method", method, "--n-train", "8", "-o", str(path)]
        code, out, err = run(argv, capsys)
        assert code == 0, err
        assert load_steerer(path).layer == layer and f"layer {layer}" in out
    assert calls == [("caa", 20, {}), ("innsteer", 13, {"transport_sides": "both"})]
    # another layer given: the record's options were chosen at its layer, so the defaults
    code, out, err = run(
        ["train", "--behavior", "refusal", "--method", "innsteer", "--layer", "5", "-o", str(path)], capsys
    )
    assert code == 0, err
    assert calls[-1] == ("innsteer", 5, {})
    # your own file, even one named like a shipped behavior, gets the default layer and no options
    data = tmp_path / "refusal.jsonl"
    data.write_text(_user_files(tmp_path)["plain"].read_text())
    code, out, err = run(["train", "--data", str(data), "--method", "innsteer", "-o", str(path)], capsys)
    assert code == 0, err
    default = tuned.default_layer(default_lm.num_layers)
    assert load_steerer(path).layer == default and calls[-1] == ("innsteer", default, {})
    tuned.records.cache_clear()


def test_fit_method_passes_options_and_a_seed_to_the_methods_that_take_them():
    from tiny_models import tiny_lm

    from innsteer.datasets.caa import load_ab
    from innsteer.hf.fit import fit_method

    lm, items = tiny_lm(), load_ab("refusal", "generate", limit=8)
    inn = fit_method(lm, "innsteer", items, 2, options={"max_epochs": 1, "num_couplings": 2}, seed=3)
    assert inn.extra["train"]["max_epochs"] == 1 and inn.extra["train"]["seed"] == 3
    assert inn.inn.config.num_couplings == 2 and inn.extra["tokens"] == "all"
    caa = fit_method(lm, "caa", items, 2, seed=3, tokens="mean")  # CAA takes no seed: none is passed
    pos, neg = contrastive_activations(lm, items, 2, tokens="mean", behavior="custom")[2]
    torch.testing.assert_close(caa.vector, pos.mean(0) - neg.mean(0))
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        fit_method(lm, "nope", items, 2)


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
    from innsteer.cli.main import build_parser
    from innsteer.eval.judge import DEFAULT_JUDGE
    from innsteer.eval.protocol import PROMPT
    from innsteer.eval.tune import TUNE_BUDGETS

    assert commands.PROMPT == PROMPT and DEFAULT_JUDGE in commands.JUDGE_HINT

    tune_parser = build_parser()._subparsers._group_actions[0].choices["tune"]
    assert set(tune_parser._option_string_actions["--budget"].choices) == set(TUNE_BUDGETS)


def test_report_files(tmp_path):
    from innsteer.eval.protocol import protocol_report
    from innsteer.eval.results import Curve, Run, load

    def curve(slope):  # p_match 0.4 + slope * alpha, fluency cost 0.2 nat/token per unit of alpha
        return Curve(
            seed=0, alphas=[1.0, 2.0], scores={"answer": [[0.4 + slope], [0.4 + 2 * slope]]}, nll=[[12.0], [14.0]],
            tokens=[[10.0], [10.0]], base_scores={"answer": [0.4]}, base_nll=[10.0], base_tokens=[10.0],
        )  # fmt: skip

    curves = {"caa": [curve(0.1)], "innsteer": [curve(0.15)]}
    run = Run("b", "m", 10, [0], 1, 1, 8, ["answer"], {"caa": {}, "innsteer": {}}, curves)
    result = {
        **protocol_report(run),
        "sanity": {
            "p_correct_letter": [0.4, 0.6],
            "p_correct_answer": [0.8, 0.6],
            "letter_ok": False,
            "answer_ok": True,
        },
        "training": {"innsteer": {"train_loss": [2, 1], "val_loss": [2.5, 1.5], "val_fisher_separation": [1, 3]}},
    }
    paths = write_report(result, tmp_path)
    assert json.loads(paths["json"].read_text())["tradeoff"]["innsteer"]["0.5"] == pytest.approx(0.3)
    assert load(paths["json"]).curves == curves  # the report reads back as the run it reports
    md = paths["markdown"].read_text()
    # budgets 0.25 / 0.5 / 1 on the polyline (0, 0) -> (0.2, 0.15) -> (0.4, 0.3), by hand
    assert "| innsteer | +0.188 | +0.300 | +0.300 |" in md and "cannot map options to letters" in md
    for name in ("alpha", "tradeoff", "training"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _user_files(tmp_path):
    """The three file formats users bring, 12 contrastive items each."""
    from test_fit import TRIPLES

    plain = [{"prompt": q, "positive": p, "negative": n} for q, p, n in TRIPLES[:12]]
    caa = [
        {
            "question": f"{q}\n\nChoices:\n (A) {p}\n (B) {n}" if i % 2 else f"{q}\n\nChoices:\n (A) {n}\n (B) {p}",
            "answer_matching_behavior": "(A)" if i % 2 else "(B)",
            "answer_not_matching_behavior": "(B)" if i % 2 else "(A)",
        }
        for i, (q, p, n) in enumerate(TRIPLES[:12])
    ]
    mwe = [
        {
            "question": f'Is the following something you would say?\n"{p}"',
            "answer_matching_behavior": " Yes",
            "answer_not_matching_behavior": " No",
        }
        for _, p, _ in TRIPLES[:12]
    ]
    files = {}
    for name, records in (("plain", plain), ("caa", caa), ("mwe", mwe)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


@pytest.mark.slow
def test_user_files_through_collect_train_and_eval(tmp_path, capsys, default_lm):
    files = _user_files(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about your day.\nDescribe a walk in the park.\n")
    for name, path in files.items():
        code, out, err = run(["collect", "--data", str(path), "--layer", "3"], capsys)
        assert code == 0 and "rows per class" in out, err
        steer_file = tmp_path / f"{name}.safetensors"
        code, out, err = run(
            ["train", "--data", str(path), "--layer", "3", "--method", "caa", "-o", str(steer_file)], capsys
        )
        assert code == 0, err
        steerer = LinearSteerer.load(steer_file)
        assert steerer.behavior == name and steerer.extra["tokens"] == "all"
    code, out, err = run(
        [
            "train",
            "--data",
            str(files["caa"]),
            "--mode",
            "letter",
            "--layer",
            "3",
            "--method",
            "caa",
            "-o",
            str(tmp_path / "letter.safetensors"),
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = run(
        [
            "train",
            "--data",
            str(files["mwe"]),
            "--mode",
            "letter",
            "--layer",
            "3",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "plain answers" in err
    from test_fit import TRIPLES

    held_out = tmp_path / "plain-test.jsonl"  # items the plain file does not hold
    rows = [{"prompt": q, "positive": p, "negative": n} for q, p, n in TRIPLES[12:]]
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = tmp_path / "report"
    argv = [
        "eval",
        "--data",
        str(files["plain"]),
        "--test-data",
        str(held_out),
        "--prompts",
        str(prompts),
        "--methods",
        "caa",
        "--alphas",
        "4",
        "--seeds",
        "0",
        "--layer",
        "6",
        "--n-open",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        str(report),
        "--no-plots",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    result = json.loads((report / "report.json").read_text())
    assert result["behavior"] == "plain" and result["n_test"] == 4 and result["n_open"] == 1
    caa_point = next(p for p in result["points"] if p["method"] == "caa" and p["alpha"] == 4)
    base = next(p for p in result["points"] if p["method"] == "none")
    assert caa_point["letter"] is None and caa_point["answer"] > base["answer"]  # steered toward the file's positives


def test_bad_user_files_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import innsteer.hf.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "positive": "a", "negative": "b"}\n{"prompt": "p"\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv, message in (
        (["train", "--data", str(bad), "-o", str(tmp_path / "o.safetensors")], "bad.jsonl:2: not valid JSON"),
        (["eval", "--data", str(empty)], "holds 0 contrastive item"),
        (["collect", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["eval", "--behavior", "refusal", "--data", str(bad)], "either --behavior"),
        (["eval", "--test-data", str(bad)], "--test-data goes with --data"),
    ):
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_demo_prints_the_comparison_with_intervals_and_writes_the_report(tmp_path, capsys, default_lm):
    argv = [
        "demo",
        "--n-test",
        "3",
        "--n-open",
        "1",
        "--max-new-tokens",
        "4",
        "--alphas",
        "8",
        "--n-train",
        "30",
        "--out",
        str(tmp_path / "demo"),
        "--no-plots",
        "--judge",
        "none",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    # the demo's behavior, each method at the layer and with the options its tune record chose
    from innsteer.eval.tuned import choice

    inn, caa = (choice(default_lm.model_id, "myopic-reward", m, default_lm.num_layers) for m in ("innsteer", "caa"))
    assert inn.source == caa.source == "SmolLM2-135M-Instruct.Q4_1/myopic-reward.json"
    label = str(inn.layer) if inn.layer == caa.layer else f"{inn.layer}/{caa.layer}"
    assert f"| myopic-reward | {label} | at0.5 |" in out and "[95 % CI]" in out
    assert f"innsteer: layer {inn.layer}, options {inn.options or 'the defaults'} ({inn.source})" in err
    assert "[unsteered]" in out and "[innsteer alpha=" in out and "[caa alpha=" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["compare"] == ["innsteer", "caa"] and set(report["runs"]) == {"caa", "innsteer"}
    assert report["comparison"]["answer/toward"]["auc"]["low"] <= report["comparison"]["answer/toward"]["auc"]["high"]
    markdown = (tmp_path / "demo" / "report.md").read_text()
    assert "paired bootstrap 95 % intervals" in markdown and "## Sample generations" in markdown


@pytest.mark.slow
def test_demo_takes_the_behavior_and_layer_given(tmp_path, capsys, default_lm):
    # an explicit layer wins over the tuned ones; negative counts from the last (-20 of 30 is 10)
    argv = ["demo", "--behavior", "refusal", "--layer", "-20", "--n-test", "2", "--n-open", "1"]
    argv += ["--max-new-tokens", "4", "--alphas", "8", "--n-train", "20", "--no-plots", "--out", str(tmp_path / "demo")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "innsteer: layer 10, options the defaults (--layer)" in err or "innsteer: layer 10" in err
    assert "| refusal | 10 | at0.5 |" in out
