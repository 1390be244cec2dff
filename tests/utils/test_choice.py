"""The one check of a choice setting (src/utils/config.py), used by every stage, op and model."""

from __future__ import annotations

import re

import pytest

from src.utils.config import check_choice, warm_start_stage


def test_check_choice_returns_the_value_and_names_setting_choices_and_value() -> None:
    assert check_choice("loss_at", "input", ("labels", "input")) == "input"
    with pytest.raises(ValueError, match=re.escape("loss_at must be one of labels | input, got 'logits'")):
        check_choice("loss_at", "logits", ("labels", "input"))


def test_check_choice_raises_the_given_error_type() -> None:
    class ConfigError(Exception):
        pass

    with pytest.raises(ConfigError, match=re.escape("module.update must be one of a | b, got 3")):
        check_choice("module.update", 3, ("a", "b"), ConfigError)


def test_warm_start_maps_choices_to_stages() -> None:
    assert warm_start_stage("none") is None
    assert warm_start_stage("classifier") == "classification"
    with pytest.raises(ValueError, match=re.escape(
            "conta.warm_start must be one of none | classifier | segmentation_backbone, got 'backbone'")):
        warm_start_stage("backbone")
