"""API bearer tokens (worker/tokens.py and `variflow tokens`): issued once, stored as
a hash, found by their secret while live, revoked by name — on both backends."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from worker import tokens
from worker.cli import cli
from worker.errors import InvalidInput
from worker.models import ApiToken
from worker.runtime import session_scope


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    return str(request.param)


@pytest.mark.usefixtures("backend")
def test_a_token_is_found_by_its_secret_until_it_is_revoked() -> None:
    with session_scope() as session:
        info, secret = tokens.issue(session, "shop-backend", "shop")
    assert (info.name, info.tenant, info.admin) == ("shop-backend", "shop", False)
    assert secret.startswith("vf_") and len(secret) > 40
    with session_scope() as session:
        stored = session.scalars(select(ApiToken)).one()
        assert stored.secret_hash == tokens.secret_hash(secret)
        assert secret not in repr(stored.__dict__)  # only the hash is kept
        assert tokens.authenticate(session, secret) == info
        for wrong in (None, "", secret[:-1] + "x", secret[3:], "vf_" + "a" * 200):
            assert tokens.authenticate(session, wrong) is None
    with session_scope() as session:
        assert tokens.revoke(session, "shop-backend").revoked_at is not None
    with session_scope() as session:
        assert tokens.authenticate(session, secret) is None
        again = tokens.revoke(session, "shop-backend")  # revoking twice changes nothing
        assert tokens.listed(session) == [again]


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("name", "tenant", "field"),
    [("", None, "name"), ("has space", None, "name"), ("x" * 65, None, "name"),
     ("ok", "-lead", "tenant"), ("ok", "t\x00", "tenant")],
)  # fmt: skip
def test_a_bad_name_or_tenant_is_refused_and_nothing_is_stored(
    name: str, tenant: str | None, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught, session_scope() as session:
        tokens.issue(session, name, tenant)
    assert caught.value.field == field
    with session_scope() as session:
        assert session.scalars(select(ApiToken)).all() == []


@pytest.mark.usefixtures("backend")
def test_the_cli_prints_the_secret_once_and_lists_no_secret() -> None:
    runner = CliRunner()
    created = runner.invoke(cli, ["tokens", "create", "ops", "--admin"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    with session_scope() as session:
        info = tokens.authenticate(session, secret)
    assert info is not None and (info.tenant, info.admin) == ("ops", True)

    duplicate = runner.invoke(cli, ["tokens", "create", "ops"])
    assert duplicate.exit_code == 2 and "exists" in duplicate.output

    listed = runner.invoke(cli, ["tokens", "list"])
    assert listed.exit_code == 0 and listed.stdout.startswith("ops\tops\tadmin\t")
    assert secret not in listed.output

    revoked = runner.invoke(cli, ["tokens", "revoke", "ops"])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert "revoked" in runner.invoke(cli, ["tokens", "list"]).stdout
    unknown = runner.invoke(cli, ["tokens", "revoke", "nobody"])
    assert unknown.exit_code == 2 and "no token named 'nobody'" in unknown.output
