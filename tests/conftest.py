"""Fixtures shared by the test modules. The repository root is on sys.path through pytest's ``pythonpath``
(pyproject.toml), so tests import the offline model/data zoo as ``from examples import fixtures``."""
import pytest

from examples import fixtures


@pytest.fixture(scope="session")
def digits():
    """The digits split (x_train/y_train/x_test/y_test) the digits ViT was trained and is evaluated on."""
    return fixtures.digits_data()
