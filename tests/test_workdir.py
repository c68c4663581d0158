"""The files of a training workdir (deepmil_jax.workdir): a run with other settings is refused,
and a config.json that cannot be read is one clear error."""

import dataclasses
import json

import pytest
from conftest import SMALL

from deepmil_jax import checkpoints, train
from deepmil_jax.errors import ConfigError


def test_resuming_with_other_settings_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_json()))
    (tmp_path / "results.json").write_text(json.dumps({"config": SMALL.to_json()}))
    other = dataclasses.replace(SMALL, scheme="sparse", k=3)
    with pytest.raises(ConfigError, match="--scheme: 'label_assign' -> 'sparse'"):
        train.train_and_evaluate(other, tmp_path)


@pytest.mark.parametrize(
    "text, why", [("{not json", "cannot be read"), ('{"scheme": "sparse", "extra": 1}', "extra")]
)
def test_a_broken_config_json_is_one_clear_error(tmp_path, text, why):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=why):
        checkpoints.load_trained(tmp_path)
