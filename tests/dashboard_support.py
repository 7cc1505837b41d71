"""The dashboard's pages on SQLite and on PostgreSQL, for the integration tests of its
actions and its overview: a test module takes the fixtures by importing them
(``from tests.dashboard_support import backend as backend``). They are not in a
conftest because other integration tests have a ``backend`` or a ``client`` of their
own, and a test asking for one there must not get the dashboard's by accident."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from tests.conftest import Configure
from tests.unit.test_dashboard import PASSWORD, USER
from webhooks import create_app


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def backend(request: pytest.FixtureRequest, configure: Configure) -> str:
    """The database of the test ("sqlite" or "postgres"), with the dashboard's login set."""
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    configure(dashboard_user=USER, dashboard_password=PASSWORD)
    return str(request.param)


@pytest.fixture
def client(backend: str) -> FlaskClient:
    app = create_app()
    app.testing = True
    return app.test_client()
