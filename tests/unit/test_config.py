from pathlib import Path

import pytest

from agegender.config import ConfigError, Params, load_params
from tests.conftest import PROJECT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.source == "demo"
    assert params.validate_.age_buckets[0] == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("validate: {min_sid: 3}", "unknown key 'validate.min_sid' (allowed here: min_side,"),
        ("surprise: 1", "unknown key 'surprise' (allowed here: data, validate"),
        ("data: {demo: {cnt: 3}}", "unknown key 'data.demo.cnt' (allowed here: count, image_size, seed)"),
        ("validate: {min_side: abc}", "'validate.min_side': Input should be a valid integer"),
        ("validate: {max_bad_fraction: 2}", "'validate.max_bad_fraction': Input should be less than or equal to 1"),
        ("validate: {gender_share: [0.9, 0.1]}", "gender_share must be [low, high] with low <= high"),
        ("validate: {age_buckets: [0, 30, 20]}", "age_buckets must be at least two strictly increasing edges"),
        ("data: {demo: {count: 0}}", "'data.demo.count': Input should be greater than or equal to 10"),
        ("data: {ingest: {read_timeout: 0}}", "'data.ingest.read_timeout': Input should be greater than 0"),
        (
            "data: {ingest: {timeout: 5}}",
            "unknown key 'data.ingest.timeout' (allowed here: connect_timeout, read_timeout)",
        ),
        ("[1, 2]", "expected a mapping of sections"),
        (
            "candidates: [{name: a, train: {widht: 3}}]",
            "candidates.0 (a).train: unknown key 'widht' (allowed here: backbone,",
        ),
        (
            "candidates: [{name: a, train: {width: 0}}]",
            "candidates.0 (a).train: 'width': Input should be greater than or equal to 4",
        ),
        ("candidates: [{name: a}, {name: a}]", "candidate names must be unique"),
        ("train: {epochs: 5, low_res: {size: 40, epochs: 5}}", "low_res.epochs (5) must be fewer than epochs (5)"),
        (
            "train: {backbone: vgg16, low_res: {size: 40, epochs: 2}}",
            "low_res needs the compact backbone; vgg16 is built for one crop size",
        ),
        (
            "candidates: [{name: a, train: {low_res: {size: 64, epochs: 2}}}]",
            "candidate a: train.low_res.size (64) must be smaller than preprocess.image_size (64)",
        ),
        ("candidates: []", "'candidates': List should have at least 1 item"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, text))
    assert expected in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_candidate_overrides_merge_into_train(tmp_path):
    params = load_params(write(tmp_path, "candidates: [{name: a, train: {width: 48, augment: {flip: false}}}]"))
    merged = params.candidate_train(params.candidates[0])
    assert merged.width == 48 and merged.augment.flip is False
    assert merged.augment.zoom == params.train.augment.zoom


def test_where_the_stack_runs_is_not_a_model_setting():
    from agegender.registry import hash_params

    here = Params()
    elsewhere = Params.model_validate({"stack": {"host": "10.0.0.5"}})
    assert "stack" not in here.model_settings() and "train" in here.model_settings()
    assert hash_params(here) == hash_params(elsewhere)
    assert hash_params(here) != hash_params(Params.model_validate({"train": {"epochs": 3}}))
