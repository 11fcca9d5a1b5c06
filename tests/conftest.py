import pytest
from sites import make_site


@pytest.fixture
def two_sites():
    return {"site-1": make_site(8, seed=1), "site-2": make_site(8, seed=2, invert=True)}
