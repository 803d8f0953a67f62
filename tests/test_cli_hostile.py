"""The command line under hostile or careless use: every user error is one line and a non-zero exit,
raised before the model loads or any work starts where it can be; no traceback, no lost work.

"Before the work" is observed from outside: the CLI reports the loaded model on stderr
("model ...: N layers"), so an error printed without that line came before the model was loaded.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from innsteer import cli
from innsteer.core.steerers import AffineSteerer, LinearSteerer, load_steerer
from innsteer.llama.export import export

ROOT = Path(__file__).resolve().parents[1]
LOADED = re.compile(r"^model .*: \d+ layers", re.M)


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_process(argv, **kwargs) -> subprocess.CompletedProcess:
    """``python -m innsteer.cli ARGV`` (argv may hold bytes: undecodable file names and prompts)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "innsteer.cli", *argv], env=env, capture_output=True, **kwargs)


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("innsteer: error: "), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture
def caa_file(tmp_path):
    path = tmp_path / "caa.safetensors"
    LinearSteerer(torch.randn(576, generator=torch.Generator().manual_seed(0)) * 4, 10, method="caa").save(path)
    return path


# --- options refused while parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--n-train", "0", "-o", "x"], "--n-train: must be at least 1, got 0"),  # was: 0 meant "all"
        (["eval", "--n-test", "-3"], "--n-test: must be at least 1"),  # was: all items but the last 3
        (["eval", "--n-open", "0"], "--n-open: must be at least 1"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
        (["generate", "hi", "--max-new-tokens", "-5"], "--max-new-tokens: must be at least 1"),
        (["eval", "--alphas", ""], "--alphas: expected at least one alpha"),  # was: an empty sweep
        (["eval", "--alphas", ","], "--alphas: expected at least one alpha"),
        (["eval", "--alphas", "1,nan"], "--alphas: expected comma-separated finite numbers"),
        (["eval", "--alphas", "1,2,1"], "alpha 1.0 is listed more than once"),
        (["train", "--alpha", "nan", "-o", "x"], "--alpha: expected a finite number"),  # was: a file with a NaN alpha
        (["train", "--alpha", "1e39", "-o", "x"], "within float32's range"),  # finite as a double only
        (["generate", "hi", "--alpha", "-inf"], "--alpha: expected a finite number"),
        (["generate", "hi", "--control-strength", "inf"], "--control-strength: expected a finite number"),
        (["collect", "--layers", "3,3"], "layer 3 is listed more than once"),
        (["collect", "--layers", ""], "--layers: expected at least one layer"),  # was: --layer, silently
        (["demo", "--methods", "caa,caa"], "method caa is listed more than once"),
        (["eval", "--methods", ","], "--methods: expected at least one method"),  # was: "unknown method(s) []"
        (["demo", "--seeds", "0,0"], "seed 0 is listed more than once"),  # was: "layer 0 is listed ..."
        (["demo", "--seeds", ""], "--seeds: expected at least one seed"),
        (["demo", "--seeds", "-1"], "seeds must be in 0..4294967295, got -1"),  # was: a full demo run
        (["demo", "--seeds", "4294967296"], "seeds must be in 0..4294967295"),
        (["serve", "smollm2", "--port", "99999"], "--port: must be at most 65535"),  # was: OverflowError traceback
        (["generate", "caf\udce9"], "is not valid UTF-8 text"),  # argv bytes b"caf\xe9" (Latin-1)
    ],
)
def test_bad_option_values_are_refused_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        # was: the whole demo ran, then its comparison table failed on the missing method
        (["demo", "--methods", "caa"], "the demo compares INNSteer with CAA; add innsteer"),
        (["demo", "--methods", "innsteer,pca"], "add caa"),
        (["demo", "--alphas", "0,1"], "--alphas: the demo sweeps magnitudes"),  # was: a curve of alpha 0 points
    ],
)
def test_demo_settings_that_cannot_make_its_comparison_are_refused_before_the_model_loads(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, message)
    assert not LOADED.search(err)


def test_negative_values_are_read_as_values_not_options(tmp_path, capsys):
    """argparse takes '-1,2' after an option for an unknown option; the CLI attaches it. The run then
    stops at the next check (an --out that is a file), which shows the alphas and layer parsed."""
    afile = tmp_path / "file"
    afile.write_text("")
    for argv in (
        ["eval", "--alphas", "-2,-1", "--layer", "-1", "--out", str(afile)],
        ["demo", "--alphas", "-1e3", "--out", str(afile)],
    ):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, "exists and is not a directory")


# --- outputs checked before the work ---------------------------------------------------------------


def unwritable_directory(tmp_path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: then /sys)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for directory in (locked, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError:
            return directory
    pytest.skip("no unwritable directory available to this user")


def test_train_output_is_checked_before_the_model_loads(tmp_path, capsys):
    """Was: the steerer was trained, then saving it failed with a traceback."""
    (tmp_path / "afile").write_text("")
    for output, message in (
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "x.safetensors", "does not exist"),
        (tmp_path / "afile" / "x.safetensors", "does not exist"),
        (unwritable_directory(tmp_path) / "x.safetensors", "cannot write in"),
    ):
        code, _, err = run(["train", "--method", "caa", "-o", str(output)], capsys)
        assert_one_line_error(code, err, message)
        assert not LOADED.search(err)


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_report_directory_is_checked_before_the_model_loads(command, tmp_path, capsys):
    """Was: `eval --out FILE` raised FileExistsError after the whole evaluation."""
    afile = tmp_path / "report.md"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        code, _, err = run([command, "--out", str(out)], capsys)
        assert_one_line_error(code, err, "exists and is not a directory")
    code, _, err = run([command, "--out", str(unwritable_directory(tmp_path) / "report")], capsys)
    assert_one_line_error(code, err, "cannot write in")
    assert afile.read_text() == "keep me"


def test_plots_without_matplotlib_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run(["eval", "--out", str(tmp_path / "report")], capsys)
    assert_one_line_error(code, err, "--no-plots")
    assert not (tmp_path / "report").exists()


def test_generate_refuses_misused_options_before_the_model_loads(tmp_path, caa_file, capsys):
    gguf_file = tmp_path / "steer.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    for argv, message in (
        (["--alpha", "3"], "--alpha sets the strength of --steer, which is missing"),  # was: ignored
        (["--steer-prompt"], "--steer-prompt needs --steer or --control-vector"),
        (["--control-vector", str(gguf_file)], "need --gguf"),  # was: ignored by the PyTorch path
        (["--control-strength", "2"], "need --gguf"),
        (["--steer", str(tmp_path / "nope.safetensors")], "no file at"),
        (["--steer", str(tmp_path)], "is a directory"),
        (["--steer", str(gguf_file)], "is a GGUF for llama.cpp"),
        (["--gguf", "smollm2", "--model", "smollm2"], "--model and --gguf both name the model"),
        (["--gguf", "smollm2", "--control-vector", str(tmp_path / "cv.gguf")], "no file at"),
    ):
        code, _, err = run(["generate", "Hello", *argv], capsys)
        assert_one_line_error(code, err, message)
        assert not LOADED.search(err)


def test_undecodable_paths_print_without_crashing(tmp_path):
    """A file name from undecodable argv bytes (here b'\\xff') holds a lone surrogate in Python;
    printing it once crashed the command after its work was done (UnicodeEncodeError)."""
    source = tmp_path / "caa.safetensors"
    LinearSteerer(torch.ones(16), 3, method="caa").save(source)
    output = os.fsencode(tmp_path) + b"/\xff.gguf"
    result = run_process(["export", str(source), "-o", output, "--format", "controlvector"])
    assert result.returncode == 0, result.stderr
    assert b"wrote " in result.stdout and b"Traceback" not in result.stderr
    assert os.path.isfile(output)


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`innsteer ... | head -0`: no 'Exception ignored ... BrokenPipeError' at exit."""
    source = tmp_path / "caa.safetensors"
    LinearSteerer(torch.ones(16), 3, method="caa").save(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "innsteer.cli", "export", str(source), "-o", str(tmp_path / "cv.gguf")]
    process = subprocess.Popen(
        [*argv, "--format", "controlvector"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before the command prints
    err = process.stderr.read()
    assert process.wait() == 1 and err == b"", err
    assert (tmp_path / "cv.gguf").is_file()


@pytest.mark.parametrize(
    "failure, code, message",
    [(KeyboardInterrupt(), 130, "innsteer: interrupted"), (OSError(28, "No space left on device"), 1, "No space left")],
)
def test_an_export_stopped_mid_write_keeps_the_old_file(failure, code, message, tmp_path, capsys, monkeypatch):
    """Ctrl-C or a full disk while the GGUF is written: one line, the old output as it was, no partial file."""
    import gguf

    source, out = tmp_path / "caa.safetensors", tmp_path / "cv.gguf"
    LinearSteerer(torch.ones(16), 3, method="caa").save(source)
    out.write_bytes(b"the previous export")

    def stopped(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", stopped)
    assert cli.main(["export", str(source), "-o", str(out), "--format", "controlvector"]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caa.safetensors", "cv.gguf"]


def test_a_gguf_that_is_no_model_is_one_line(tmp_path, capsys):
    """Was: a ValueError traceback from transformers' GGUF loader."""
    steer = tmp_path / "steer.gguf"
    export(LinearSteerer(torch.ones(16), 3, method="caa"), steer, format="controlvector")
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    for model in (steer, tmp_path / "junk.gguf"):
        code, _, err = run(["generate", "Hello", "--model", str(model)], capsys)
        assert_one_line_error(code, err, "cannot load a causal LM", str(model))


# --- with the model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_negative_layer_means_from_the_last(tmp_path, capsys, default_lm):
    """Was: activations were collected, then KeyError: -1. The file holds the absolute layer."""
    out = tmp_path / "last.safetensors"
    code, _, err = run(["train", "--method", "caa", "--layer", "-1", "--n-train", "4", "-o", str(out)], capsys)
    assert code == 0, err
    assert load_steerer(out).layer == default_lm.num_layers - 1
    code, _, err = run(["collect", "--layers", "-1," + str(default_lm.num_layers - 1)], capsys)
    assert_one_line_error(code, err.splitlines()[-1], f"names layer {default_lm.num_layers - 1} more than once")
    code, _, err = run(["collect", "--layers", "3,-31"], capsys)
    assert_one_line_error(code, err.splitlines()[-1], "layer -31 is out of range")


@pytest.mark.slow
def test_replies_longer_than_the_context_are_refused_before_generating(capsys, default_lm):
    context = default_lm.model.config.max_position_embeddings
    code, out, err = run(["generate", "Hello", "--max-new-tokens", str(context)], capsys)
    assert_one_line_error(code, err.splitlines()[-1], f"does not fit the model's context of {context} tokens")
    assert out == ""
    # eval's and demo's replies follow their open-ended prompts, which take room too
    for command in ("eval", "demo"):
        code, out, err = run([command, "--max-new-tokens", str(context - 5), "--no-plots"], capsys)
        assert_one_line_error(code, err.splitlines()[-1], "open-ended prompt 1", f"context of {context} tokens")
        assert out == ""


@pytest.mark.slow
def test_a_steer_file_for_a_layer_the_model_lacks_is_refused_before_generating(
    tmp_path, capsys, monkeypatch, default_lm
):
    from innsteer.eval import metrics

    replies = []  # the real generate, watched: was the unsteered reply made before the refusal?
    real_generate = metrics.generate

    def watched(*args, **kwargs):
        replies.append(args[1])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(metrics, "generate", watched)
    path = tmp_path / "deep.safetensors"
    LinearSteerer(torch.ones(default_lm.hidden_size), default_lm.num_layers + 20, method="caa").save(path)
    code, out, err = run(["generate", "Hello", "--steer", str(path), "--max-new-tokens", "8"], capsys)
    assert_one_line_error(code, err.splitlines()[-1], f"layer {default_lm.num_layers + 20} is out of range")
    assert replies == [] and out == ""


@pytest.mark.slow
def test_generate_accepts_an_empty_prompt(capsys, default_lm):
    code, out, _ = run(["generate", "", "--max-new-tokens", "3"], capsys)
    assert code == 0 and "[unsteered]" in out


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_no_output_file(tmp_path):
    """SIGINT while training: 'innsteer: interrupted', exit 130, no traceback, no steer file."""
    out = tmp_path / "inn.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "innsteer.cli", "train", "--method", "innsteer", "-o", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job inherits SIGINT ignored, and Python then installs no handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in process.stderr:  # interrupt once the model is loaded: collecting or training follows
        seen.append(line)
        if LOADED.search(line):
            process.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + process.stderr.read()
    assert process.wait() == 130, err
    assert err.rstrip().endswith("innsteer: interrupted") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_scoring_uses_the_supported_cache_argument(default_lm):
    """transformers 5.24+ warns on every forward given `past_key_values` (removed in 5.40)."""
    from innsteer.datasets.caa import load_ab
    from innsteer.eval.metrics import ABScorer

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ABScorer(default_lm, load_ab("corrigible-neutral-HHH", "test_ab", limit=1)).scores()


# --- generate --gguf with a .safetensors steerer ------------------------------------------------------


@pytest.mark.llama
@pytest.mark.slow
def test_generate_gguf_runs_a_linear_steer_file_as_its_control_vector(tmp_path, caa_file, capsys):
    """Was: TypeError. A CAA file runs as the llama.cpp control vector `innsteer export --format
    controlvector` writes, at the file's alpha: the same replies as passing that vector yourself."""
    pytest.importorskip("llama_cpp")
    vector = tmp_path / "cv.gguf"
    assert cli.main(["export", str(caa_file), "-o", str(vector), "--format", "controlvector"]) == 0
    prompt = ["Name a fruit.", "--max-new-tokens", "8", "--gguf", "smollm2"]
    code, by_hand, _ = run(["generate", *prompt, "--control-vector", str(vector), "--control-strength", "3"], capsys)
    assert code == 0
    code, from_file, err = run(["generate", *prompt, "--steer", str(caa_file), "--alpha", "3"], capsys)
    assert code == 0 and "steers the prompt too" in err
    steered = [line.split("] ", 1)[1] for line in by_hand.splitlines() if line.startswith("[control vector x3]")]
    assert steered and [line for line in from_file.splitlines() if "(control vector)" in line] == [
        f"[caa alpha=3 (control vector)] {steered[0]}"
    ]
    unsteered = [line for line in by_hand.splitlines() if line.startswith("[unsteered]")]
    assert unsteered and unsteered[0] != f"[unsteered] {steered[0]}"

    code, _, err = run(["generate", *prompt, "--steer", str(caa_file), "--control-vector", str(vector)], capsys)
    assert_one_line_error(code, err, "cannot be combined with --control-vector")
    affine = tmp_path / "act.safetensors"
    AffineSteerer(torch.ones(576), torch.zeros(576), 10).save(affine)
    code, _, err = run(["generate", *prompt, "--steer", str(affine)], capsys)
    assert_one_line_error(code, err, "not additive", "cannot run in llama.cpp")
    other = tmp_path / "other.safetensors"
    LinearSteerer(torch.ones(576), 10, model_id="another-model").save(other)
    code, _, err = run(["generate", *prompt, "--steer", str(other)], capsys)
    assert_one_line_error(code, err, "another-model")


@pytest.mark.llama
@pytest.mark.slow
def test_generate_gguf_reports_what_llama_cpp_refuses_in_one_line(tmp_path, capsys):
    """Was: ValueError tracebacks from llama.cpp and the hook, some after the unsteered replies."""
    pytest.importorskip("llama_cpp")
    from llama_helpers import SMOLLM_LAYERS, random_inn_steerer

    last = tmp_path / "last.safetensors"
    random_inn_steerer(layer=SMOLLM_LAYERS - 1).save(last)  # its output holds only the output rows
    vector = tmp_path / "cv.gguf"
    export(LinearSteerer(torch.ones(576), SMOLLM_LAYERS + 5), vector, format="controlvector")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(12))
    for argv, message in (
        (["--gguf", "smollm2", "--steer", str(last)], f"cannot steer layer {SMOLLM_LAYERS - 1}"),
        (["--gguf", "smollm2", "--control-vector", str(vector)], "cannot be steered by a control vector"),
        (["--gguf", str(tmp_path / "junk.gguf")], "not a readable GGUF file"),
        (["--gguf", str(vector)], "is a llama.cpp control vector, not a model"),
    ):
        code, out, err = run(["generate", "Hello", "--max-new-tokens", "4", *argv], capsys)
        assert_one_line_error(code, err, message)
        assert out == ""


# --- the package's promises about its environment --------------------------------------------------------


def test_transformers_requirement_holds_the_tested_version_and_stops_before_5_40():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    requirement = Requirement(re.search(r'"(transformers[^"]*)"', text).group(1))
    assert version("transformers") in requirement.specifier
    assert "5.40.0" not in requirement.specifier and "5.23.0" not in requirement.specifier  # `cache=` came in 5.24


def test_documents_cite_no_file_outside_the_repository():
    """No machine path such as /work/shared/notes/x.md (an endpoint like /v1/models is no file)."""
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    roots = "home|root|Users|work|workspace|scratch|mnt|media|data|srv|opt"
    machine_path = re.compile(rf"(?<![\w.~/-])/(?:{roots})/\S+")
    cited = {name: machine_path.findall((ROOT / name).read_text()) for name in tracked if (ROOT / name).is_file()}
    assert {name: paths for name, paths in cited.items() if paths} == {}
