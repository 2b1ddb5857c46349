"""Core authorizes every change from the database, on SQLite and PostgreSQL.

The `Actor` a caller hands in is a claim. Before, core believed it: a deactivated admin, or a USER's id carrying
the ADMIN role, could do everything, audited under that name, and an unknown id failed late ("changed by
someone else" from a foreign key). Now each mutating service reads the account in the transaction of the change
(exists, active, role) and refuses with PermissionDenied before writing anything; audit rows and versions name
the account as stored. Each refusal below is followed by the same call by a real admin succeeding, so a call
that failed for any other reason could not pass as "refused".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import exc, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from common.errors import PermissionDenied
from core import audit, price_store, transfer, users
from core import settings_service as svc
from core.authz import AuthorizedActor, authorize
from core.security import Actor, ActorKind, Role
from db.engine import make_engine, session_factory, transaction
from db.models import AuditLog, GlobalSettingsVersion, PriceVersion, ProviderSettingsVersion, User
from tests.dbfixtures import *  # noqa: F403

PASSWORD = "a long enough password"
SYSTEM = Actor.system("seed")


@dataclass(frozen=True)
class World:
    factory: sessionmaker[Session]
    root: Actor
    """The one active admin, signed in."""
    hero: users.UserView
    uma: users.UserView
    """A USER."""
    retired: users.UserView
    """An ADMIN whose account was deactivated."""
    unknown_id: int

    def bad_actors(self) -> dict[str, Actor]:
        return {
            "a deactivated admin": self.retired.actor(),
            "a USER's id claiming ADMIN": Actor(self.uma.id, "uma", Role.ADMIN),
            "an unknown id claiming ADMIN": Actor(self.unknown_id, "ghost", Role.ADMIN),
            "no id at all, claiming ADMIN": Actor(None, "ada", Role.ADMIN),
        }


def _fal_price(usd: str) -> dict[str, Any]:
    return {
        "provider": "fal-qwen",
        "unit": "megapixel",
        "usd_per_unit": usd,
        "source": "https://fal.ai/models/fal-ai/qwen-image",
        "effective_date": "2026-01-01",
    }


@pytest.fixture
def world(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> World:
    factory = db_session_factory
    root = users.create_first_admin(factory, "root", PASSWORD)
    with transaction(factory) as session:
        hero = users.create_user(session, SYSTEM, "hera", PASSWORD, Role.HERO)
        uma = users.create_user(session, SYSTEM, "uma", PASSWORD, Role.USER)
        retired = users.create_user(session, SYSTEM, "retired", PASSWORD, Role.ADMIN)
        users.deactivate(session, SYSTEM, retired.id)
        svc.save_provider_settings(session, SYSTEM, "sandbox", {"is_default": True, "priority": 10})
        svc.save_provider_settings(session, SYSTEM, "sandbox", {"is_default": True, "priority": 20})
        svc.save_provider_settings(session, SYSTEM, "qwen", {})
        svc.save_global_settings(session, SYSTEM, {"num_images": 2})
        svc.save_global_settings(session, SYSTEM, {"num_images": 3})
        price_store.add_price_version(session, SYSTEM, _fal_price("0.02"))
        unknown_id = (session.scalar(select(func.max(User.id))) or 0) + 1000
    return World(factory, root.actor(), hero, uma, retired, unknown_id)


def _import_file(world: World) -> str:
    with world.factory() as session:
        doc = transfer.export_document(session, SYSTEM)
    doc["providers"]["qwen"]["priority"] = 77
    doc["global_settings"]["num_images"] = 4
    return json.dumps(doc)


Call = Callable[[Session, Actor, World], object]
MUTATING: dict[str, Call] = {
    "users.create_user": lambda s, a, w: users.create_user(s, a, "newcomer", PASSWORD),
    "users.set_role (promote)": lambda s, a, w: users.set_role(s, a, w.uma.id, Role.ADMIN),
    "users.set_role (demote)": lambda s, a, w: users.set_role(s, a, w.hero.id, Role.USER),
    "users.set_active (reactivate)": lambda s, a, w: users.set_active(s, a, w.retired.id, True),
    "users.deactivate": lambda s, a, w: users.deactivate(s, a, w.hero.id),
    "users.reset_password": lambda s, a, w: users.reset_password(s, a, w.hero.id, "taken over, ha ha"),
    "settings.save_provider_settings": lambda s, a, w: svc.save_provider_settings(s, a, "qwen", {"priority": 1}),
    "settings.update_provider_settings": lambda s, a, w: svc.update_provider_settings(s, a, "qwen", {"priority": 2}),
    "settings.set_provider_active": lambda s, a, w: svc.set_provider_active(s, a, "qwen", False),
    "settings.set_default_provider": lambda s, a, w: svc.set_default_provider(s, a, "qwen"),
    "settings.delete_provider_settings": lambda s, a, w: svc.delete_provider_settings(s, a, "qwen"),
    "settings.rollback_provider_settings": lambda s, a, w: svc.rollback_provider_settings(s, a, "sandbox", 1),
    "settings.save_global_settings": lambda s, a, w: svc.save_global_settings(s, a, {"num_images": 1}),
    "settings.rollback_global_settings": lambda s, a, w: svc.rollback_global_settings(s, a, 1),
    "prices.add_price_version": lambda s, a, w: price_store.add_price_version(s, a, _fal_price("0.03")),
    "transfer.apply_import": lambda s, a, w: transfer.apply_import(s, a, _import_file(w)),
}
READING: dict[str, Call] = {
    "users.list_users": lambda s, a, w: users.list_users(s, a),
    "audit.list_entries": lambda s, a, w: audit.list_entries(s, a),
    "transfer.export_json": lambda s, a, w: transfer.export_json(s, a),
    "transfer.plan_import": lambda s, a, w: transfer.plan_import(s, a, _import_file(w)),
}


def _snapshot(factory: sessionmaker[Session]) -> dict[str, object]:
    """Everything a change could write."""
    with factory() as session:
        accounts = session.execute(
            select(User.id, User.username, User.role, User.active, User.password_hash).order_by(User.id)
        ).all()
        return {
            "users": [tuple(row) for row in accounts],
            **{
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (AuditLog, ProviderSettingsVersion, GlobalSettingsVersion, PriceVersion)
            },
        }


@pytest.mark.parametrize("name", list(MUTATING))
def test_every_mutating_service_refuses_actors_the_database_does_not_back(world: World, name: str) -> None:
    call = MUTATING[name]
    before = _snapshot(world.factory)
    for who, actor in world.bad_actors().items():
        with pytest.raises(PermissionDenied) as refused, transaction(world.factory) as session:
            call(session, actor, world)
        assert _snapshot(world.factory) == before, f"{name} by {who} wrote something"
        message = str(refused.value)
        if actor.user_id == world.unknown_id:
            assert f"user id {world.unknown_id}: there is no such account" in message
        elif actor.user_id == world.retired.id:
            assert "retired may not" in message and "deactivated" in message
        elif actor.user_id == world.uma.id:
            assert "uma (USER) may not" in message
        else:
            assert "no account is signed in" in message
    # The same call by the real admin goes through, with an audit row naming the account.
    with transaction(world.factory) as session:
        call(session, world.root, world)
    after = _snapshot(world.factory)
    assert after != before
    with world.factory() as session:
        newest = session.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(1)).one()
    assert (newest.actor_id, newest.actor_name, newest.actor_role) == (world.root.user_id, "root", "ADMIN")


@pytest.mark.parametrize("name", list(READING))
def test_staff_only_reads_refuse_them_too(world: World, name: str) -> None:
    for actor in world.bad_actors().values():
        with pytest.raises(PermissionDenied), world.factory() as session:
            READING[name](session, actor, world)
    with world.factory() as session:
        READING[name](session, world.root, world)


def test_a_deactivated_or_unknown_user_cannot_change_their_password(world: World) -> None:
    before = _snapshot(world.factory)
    for actor in (world.retired.actor(), Actor(world.unknown_id, "ghost"), Actor(None, "nobody")):
        with pytest.raises(PermissionDenied), transaction(world.factory) as session:
            users.change_own_password(session, actor, PASSWORD, "a brand new password")
    with pytest.raises(PermissionDenied, match="system account has no password"), transaction(world.factory) as s:
        users.change_own_password(s, SYSTEM, PASSWORD, "a brand new password")
    assert _snapshot(world.factory) == before
    # Any active account may, whatever role its Actor claims.
    with transaction(world.factory) as session:
        users.change_own_password(session, Actor(world.uma.id, "uma", Role.ADMIN), PASSWORD, "a brand new password")
    assert users.authenticate(world.factory, "uma", "a brand new password") is not None


def test_the_claimed_role_and_name_never_count_the_account_does(world: World) -> None:
    """A HERO whose Actor says USER and another name may still change settings; the records name the account."""
    disguised = Actor(world.hero.id, "someone-else", Role.USER)
    with transaction(world.factory) as session:
        assert svc.save_provider_settings(session, disguised, "qwen", {"priority": 42}).changed
    with world.factory() as session:
        [entry] = audit.list_entries(session, world.root, target_id="qwen", limit=1)
        assert (entry.actor_id, entry.actor_name, entry.actor_role) == (world.hero.id, "hera", "HERO")
        assert svc.get_provider_settings(session, "qwen").updated_by == "hera"
    # ...and a HERO claiming ADMIN still cannot manage users.
    with pytest.raises(PermissionDenied, match=r"hera \(HERO\) may not create users"), transaction(world.factory) as s:
        users.create_user(s, Actor(world.hero.id, "hera", Role.ADMIN), "minion", PASSWORD, Role.ADMIN)


def test_a_role_cap_only_ever_lowers_what_the_account_may_do(world: World) -> None:
    """An API token of role USER held by an admin acts as a USER in core; a cap above the account's role (a
    HERO's token claiming ADMIN) grants nothing more."""
    admin_as_user = Actor(world.root.user_id, "root", Role.ADMIN, role_cap=Role.USER)
    as_user = r"root \(USER through a token of that role\) may not create users"
    with pytest.raises(PermissionDenied, match=as_user), transaction(world.factory) as session:
        users.create_user(session, admin_as_user, "minion", PASSWORD, Role.USER)
    with pytest.raises(PermissionDenied, match="may not change qwen settings"), transaction(world.factory) as s:
        svc.save_provider_settings(s, Actor(world.root.user_id, "root", role_cap=Role.USER), "qwen", {"priority": 42})
    with pytest.raises(PermissionDenied, match=r"hera \(HERO\) may not create users"), transaction(world.factory) as s:
        users.create_user(s, Actor(world.hero.id, "hera", role_cap=Role.ADMIN), "minion", PASSWORD, Role.USER)
    capped_admin = Actor(world.root.user_id, "root", role_cap=Role.HERO)
    with transaction(world.factory) as session:
        who = authorize(session, capped_admin, Role.ADMIN, Role.HERO, action="x")
    assert who.role is Role.HERO


def test_the_system_actor_is_an_explicit_privilege_audited_as_such(world: World) -> None:
    cli = Actor.system("cli:operator")
    assert cli.kind is ActorKind.SYSTEM and cli.is_system and cli.role is None
    with transaction(world.factory) as session:
        users.set_role(session, cli, world.uma.id, Role.HERO)
    with world.factory() as session:
        [entry] = audit.list_entries(session, world.root, action="user.set_role")
    assert (entry.actor_id, entry.actor_name, entry.actor_role) == (None, "cli:operator", "SYSTEM")
    with pytest.raises(ValueError, match="no user id"):
        Actor(user_id=1, username="sneaky", kind=ActorKind.SYSTEM)


def test_only_authorize_makes_an_authorized_actor(world: World) -> None:
    with pytest.raises(TypeError, match=r"only from core\.authz\.authorize"):
        AuthorizedActor(world.uma.id, "uma", Role.ADMIN)
    with world.factory() as session:
        who = authorize(session, world.uma.actor(), *Role, action="look", lock=False)
    assert (who.user_id, who.username, who.role, who.role_label) == (world.uma.id, "uma", Role.USER, "USER")


def _blocked(url: str, change: Callable[[Session], object]) -> bool:
    """Whether `change` has to wait for a lock (given up after 200 ms instead of the usual 10 s)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with transaction(session_factory(engine)) as session:
            if engine.dialect.name == "sqlite":
                session.execute(text("PRAGMA busy_timeout = 200"))
            else:
                session.execute(text("SET LOCAL lock_timeout = '200ms'"))
            change(session)
    except exc.OperationalError as error:
        if "locked" in str(error) or "lock timeout" in str(error):
            return True
        raise
    finally:
        engine.dispose()
    return False


def test_an_authorized_change_holds_the_account_until_it_commits(world: World, db_url: str) -> None:
    """Authorization and change are one transaction: a deactivation cannot slip in between. It waits, and once
    the change has committed it goes through (and the next change by that account is refused)."""
    hera = world.hero.actor()
    session = world.factory()
    try:
        authorize(session, hera, Role.ADMIN, Role.HERO, action="change settings")
        svc.save_provider_settings(session, hera, "qwen", {"priority": 5})
        assert _blocked(db_url, lambda s: users.deactivate(s, world.root, world.hero.id))
        session.commit()
    finally:
        session.close()
    assert not _blocked(db_url, lambda s: users.deactivate(s, world.root, world.hero.id))
    with pytest.raises(PermissionDenied, match="deactivated"), transaction(world.factory) as s:
        svc.save_provider_settings(s, hera, "qwen", {"priority": 6})
