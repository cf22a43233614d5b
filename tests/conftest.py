"""Shared fixtures: one tiny random pipeline per variant per test session."""

from __future__ import annotations

import pytest

from fusedit.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_edit_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "edit", "edit")


@pytest.fixture(scope="session")
def tiny_edit_plus_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "edit-plus", "edit-plus")


@pytest.fixture(scope="session")
def tiny_edit_2511_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "edit-2511", "edit-2511")


@pytest.fixture(scope="session")
def tiny_t2i_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "t2i", "t2i")


@pytest.fixture(scope="session")
def tiny_qwen21_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen21", "2.1")
