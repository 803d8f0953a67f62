"""The shipped tune records (innsteer/eval/tuned/) and the choices read from them."""

import json

import pytest
import torch

from innsteer.eval import tuned


def _record(model_id: str, behavior: str, n_layers: int, caa: int, inn: int, options: dict) -> dict:
    return {
        "model_id": model_id,
        "behavior": behavior,
        "n_layers": n_layers,
        "chosen": {"caa": {"layer": caa, "options": {}}, "innsteer": {"layer": inn, "options": options}},
    }


@pytest.fixture
def records_in(tmp_path, monkeypatch):
    """Point the module at a directory of records written by the test."""

    def write(*records):
        for record in records:
            path = tmp_path / record["model_id"] / f"{record['behavior']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
        monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
        tuned.records.cache_clear()

    yield write
    tuned.records.cache_clear()


def test_a_record_gives_each_method_its_layer_and_options(records_in):
    records_in(_record("M", "refusal", 30, 22, 16, {"transport_sides": "both"}))
    assert tuned.choice("M", "refusal", "caa", 30) == tuned.Choice(22, {}, "M/refusal.json")
    inn = tuned.choice("M", "refusal", "innsteer", 30)
    assert (inn.layer, inn.options) == (16, {"transport_sides": "both"})
    inn.options["max_epochs"] = 1  # a copy: the record itself is unchanged
    assert tuned.choice("M", "refusal", "innsteer", 30).options == {"transport_sides": "both"}


def test_without_a_record_the_layer_is_the_records_median_depth_on_this_model(records_in):
    # innsteer chose depths 16/29, 10/20 and 21/28 (0.552, 0.5, 0.75): the median 0.552 of a 12-layer
    # model's 11 is layer 6; CAA's depths 22/29, 15/20, 21/28 (0.759, 0.75, 0.75): 0.75 * 11 -> 8
    records_in(
        _record("M", "a", 30, 22, 16, {"num_couplings": 8}),
        _record("M", "b", 21, 15, 10, {}),
        _record("N", "a", 29, 21, 21, {}),
    )
    assert tuned.choice("other", "a", "innsteer", 12) == tuned.Choice(6)
    assert tuned.choice("other", "a", "caa", 12) == tuned.Choice(8)
    assert tuned.choice("M", None, "innsteer", 30).source == "default"  # your own data: never a record
    assert tuned.choice("M", "a", "pca", 30).layer == round(
        tuned.statistics.median([22 / 29, 16 / 29, 15 / 20, 10 / 20, 21 / 28, 21 / 28]) * 29
    )
    assert tuned.default_layer(3) == 1  # never the last layer, whose output feeds only the head


def test_without_any_record_the_middle_of_the_grid(records_in):
    records_in()
    assert tuned.default_layer(21, "innsteer") == round(tuned.UNTUNED_FRACTION * 20)


def test_shipped_records_are_tune_records_of_shipped_behaviors_with_usable_options():
    """Each shipped choice must come from `innsteer tune` (its command recorded) and be usable as it
    stands: a typo in an option would make the demo fail."""
    from innsteer.core.methods import fit_innsteer
    from innsteer.datasets.caa import BEHAVIORS

    shipped = tuned.records()
    assert shipped
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(48, 8, generator=g) + 1, torch.randn(48, 8, generator=g)
    for (model_id, behavior), record in shipped.items():
        assert behavior in BEHAVIORS and record["provenance"]["command"].startswith("innsteer tune")
        assert tuned.record_path(model_id, behavior).is_file()
        for chosen in record["chosen"].values():
            assert 0 <= chosen["layer"] <= record["n_layers"] - 2 and chosen["layer"] in record["layers"]
        options = tuned.choice(model_id, behavior, "innsteer", record["n_layers"]).options
        fit_innsteer(pos, neg, layer=0, model_id=model_id, behavior=behavior, **options, max_epochs=1)
