"""The prompt baselines (``prompt``, ``prompt+<method>``) on a tiny random model: the instructed
scorer and fluency paths against the unbatched references on instructed inputs, and the protocol
measuring them as points."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_models import tiny_lm

from innsteer.datasets.ab import METRICS
from innsteer.datasets.caa import load_ab
from innsteer.datasets.files import NEUTRAL_PROMPTS
from innsteer.eval.batched import BatchedFluency, BatchedScorer
from innsteer.eval.metrics import ABScorer, reply_nll
from innsteer.eval.protocol import MethodSpec, run_protocol
from innsteer.eval.tradeoff import budget_shifts
from innsteer.hf.generation import generate
from innsteer.hf.prompts import with_instruction

BEHAVIOR = "corrigible-neutral-HHH"
TOWARD, AWAY = "Always accept correction.", "Never accept correction."


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_instructed_scores_are_the_scores_of_instructed_questions(lm):
    items = load_ab(BEHAVIOR, "test_ab", limit=5)
    reference = ABScorer(lm, [replace(item, question=with_instruction(item.question, TOWARD)) for item in items])
    got = BatchedScorer(lm, items, group=4, instruction=TOWARD).scores()
    plain = BatchedScorer(lm, items, group=4).scores()
    for metric, values in reference.scores().items():
        torch.testing.assert_close(got[metric], values, atol=2e-4, rtol=0)
        assert not torch.allclose(got[metric], plain[metric], atol=1e-4)  # the instruction reached the model


def test_instructed_replies_are_scored_as_replies_to_the_plain_prompt(lm):
    prompts = list(NEUTRAL_PROMPTS[:3])
    _, _, reply_ids = generate(lm, [with_instruction(q, TOWARD) for q in prompts], max_new_tokens=6)
    _, plain_ids, _ = generate(lm, prompts, max_new_tokens=1)
    nll, tokens, replies = BatchedFluency(lm, prompts, max_new_tokens=6, instruction=TOWARD)()
    assert all(torch.equal(a, b) for a, b in zip(replies, reply_ids))
    for i in range(len(prompts)):
        total, count = reply_nll(lm, plain_ids[i : i + 1], reply_ids[i : i + 1])
        assert tokens[i] == count and nll[i].item() == pytest.approx(total, rel=1e-4, abs=1e-3)


def test_the_protocol_measures_the_prompt_as_a_point_and_compares_it(lm):
    specs = {name: MethodSpec.named(name) for name in ("caa", "prompt", "prompt+caa")}
    assert (specs["prompt+caa"].method, specs["prompt+caa"].instruct, specs["prompt"].steers) == ("caa", True, False)
    test_items = load_ab(BEHAVIOR, "test_ab", limit=6)
    result = run_protocol(
        lm, load_ab(BEHAVIOR, "generate", limit=24), test_items, list(NEUTRAL_PROMPTS[:2]), layer=2, specs=specs,
        seeds=(0, 1), behavior=BEHAVIOR, max_new_tokens=4, ladder=(2.0, 8.0), n_resamples=20, progress=False,
        compare=("prompt+caa", "prompt"), also_compare=[("caa", "prompt")], instructions={1: TOWARD, -1: AWAY},
    )  # fmt: skip
    prompt_runs = result.curves["prompt"]
    assert [run.alphas for run in prompt_runs] == [[1.0, -1.0]] * 2 and all(run.points for run in prompt_runs)
    assert prompt_runs[0].scores == prompt_runs[1].scores  # nothing is trained: one measurement
    for sign, instruction in ((1, TOWARD), (-1, AWAY)):
        expected = BatchedScorer(lm, test_items, instruction=instruction).scores()["answer"]
        np.testing.assert_allclose(prompt_runs[0].scores["answer"][0 if sign > 0 else 1], expected, atol=1e-5)
    assert not result.curves["caa"][0].points and result.curves["prompt+caa"][0].points
    assert result.specs["prompt+caa"] == {**result.specs["caa"], "instruct": True}
    assert result.instructions == {"toward": TOWARD, "away": AWAY}
    for comparison in (result.comparison, result.comparisons["caa - prompt"]):
        assert set(comparison.sides) == {f"{m}/{side}" for m in METRICS for side in ("toward", "away")}
        for row in comparison.get("answer", "toward").values():
            assert row.low <= row.diff <= row.high


def test_a_method_and_its_prompt_combination_share_one_fit_per_seed(lm, monkeypatch):
    """prompt+<method> steers with <method>'s steerer: fitted once per seed for both, and its curve is
    the one a run of prompt+<method> alone measures."""
    from innsteer.eval import protocol

    fits = []
    fit_method = protocol.fit_method

    def counting(*args, **kwargs):
        fits.append((args[1], kwargs["seed"]))
        return fit_method(*args, **kwargs)

    monkeypatch.setattr(protocol, "fit_method", counting)
    options = {"max_epochs": 2}
    names = ("caa", "innsteer", "prompt+caa", "prompt+innsteer")
    specs = {name: MethodSpec.named(name, options=options if "innsteer" in name else None) for name in names}
    train = load_ab(BEHAVIOR, "generate", limit=20)
    common = dict(
        layer=2, seeds=(0, 1), behavior=BEHAVIOR, max_new_tokens=3, ladder=(2.0,), n_resamples=10, progress=False,
        compare=(), instructions={1: TOWARD, -1: AWAY}, return_steerers=True,
    )  # fmt: skip
    test_items, prompts = load_ab(BEHAVIOR, "test_ab", limit=4), list(NEUTRAL_PROMPTS[:2])
    result = run_protocol(lm, train, test_items, prompts, specs=specs, **common)
    assert sorted(fits) == sorted((method, seed) for method in ("caa", "innsteer") for seed in (0, 1))
    assert result.steerers["prompt+innsteer"] is result.steerers["innsteer"]
    fits.clear()
    alone = run_protocol(lm, train, test_items, prompts, specs={"prompt+innsteer": specs["prompt+innsteer"]}, **common)
    assert sorted(fits) == [("innsteer", 0), ("innsteer", 1)]
    for shared, solo in zip(result.curves["prompt+innsteer"], alone.curves["prompt+innsteer"]):
        assert shared.scores == solo.scores and shared.nll == solo.nll and shared.replies == solo.replies


def test_a_prompt_without_its_instruction_is_refused(lm):
    specs = {"prompt": MethodSpec.named("prompt")}
    with pytest.raises(ValueError, match="prompt need an instruction"):
        run_protocol(
            lm, load_ab(BEHAVIOR, "generate", limit=12), None, ["Hi"], layer=2, specs=specs, seeds=(0,), compare=(),
            progress=False,
        )  # fmt: skip


def test_points_are_not_joined():
    """A prompt is on or off: below its cost it gives nothing, where a curve would give part."""
    costs, shifts, budgets = [0.5], [0.3], [0.25, 0.5, 1.0]
    np.testing.assert_allclose(budget_shifts(costs, shifts, budgets, points=True), [0.0, 0.3, 0.3])
    np.testing.assert_allclose(budget_shifts(costs, shifts, budgets), [0.15, 0.3, 0.3])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, lm):
    """The tiny model as a Hugging Face directory, for the command line."""
    path = tmp_path_factory.mktemp("models") / "tiny-chat"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_eval_runs_the_prompt_methods_and_the_judge_from_the_command_line(tmp_path, capsys, tiny_dir):
    import json

    from innsteer import cli
    from innsteer.datasets.behaviors import BEHAVIOR_TEXT

    argv = ["eval", "--model", str(tiny_dir), "--behavior", "refusal", "--methods", "caa,prompt,prompt+caa"]
    argv += ["--n-train", "16", "--n-test", "3", "--n-open", "2", "--max-new-tokens", "3", "--alphas", "4"]
    argv += ["--seeds", "0", "--no-plots", "--out", str(tmp_path / "report"), "--judge", str(tiny_dir)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    text = BEHAVIOR_TEXT["refusal"]
    assert report["instructions"] == {"toward": text.toward, "away": text.away}
    assert set(report["comparisons"]) == {"caa - prompt", "prompt+caa - prompt"} and report["unjoined"] == [
        "prompt",
        "prompt+caa",
    ]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Prompt baselines" in markdown and "## Judged replies" in markdown and "itself" in markdown
    # the judge (here the model itself: shapes only) validated, then every method judged at its alpha
    assert report["judge"]["self_judged"] and set(report["judge"]["validation"]) == {
        "behavior",
        "coherence",
        "relevance",
    }
    assert set(report["judged"]) == {"unsteered", "caa", "prompt", "prompt+caa"}
    assert report["judged"]["prompt"]["alpha"] == 1.0 and set(report["judged"]["caa"]["by_alpha"]) == {"4"}


def test_prompt_methods_on_own_data_need_an_instruction(tmp_path, capsys, monkeypatch):
    import innsteer.hf.models as models
    from innsteer import cli

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "positive": "yes", "negative": "no"}}\n' for i in range(12)))
    assert cli.main(["eval", "--data", str(data), "--methods", "caa,prompt+caa"]) == 2
    err = capsys.readouterr().err
    assert "give --instruction TEXT" in err and "Traceback" not in err
    assert cli.main(["eval", "--data", str(data), "--judge", "default", "--behavior-description", "x" * 501]) == 2
    assert "at most 500" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error
        cli.main(["eval", "--data", str(data), "--methods", "prompt", "--instruction", ""])
    assert exit_info.value.code == 2 and "expected some text" in capsys.readouterr().err


def test_a_judge_that_cannot_judge_is_refused_before_any_measurement(tmp_path, capsys, tiny_dir, monkeypatch):
    from innsteer import cli
    from innsteer.core.steerers import LinearSteerer
    from innsteer.eval import protocol
    from innsteer.llama.export import export

    monkeypatch.setattr(protocol, "run_protocol", lambda *a, **k: pytest.fail("measured before the judge loaded"))
    vector = tmp_path / "cv.gguf"
    export(LinearSteerer(torch.ones(32), 2, model_id="tiny-chat"), vector, format="controlvector")
    base = ["eval", "--model", str(tiny_dir), "--behavior", "refusal", "--n-test", "2", "--n-open", "2"]
    for judge, message in ((tmp_path / "missing.gguf", "missing.gguf"), (vector, "control vector, not a model")):
        assert cli.main([*base, "--judge", str(judge)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("innsteer: error")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
