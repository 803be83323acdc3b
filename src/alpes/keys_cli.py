"""`alpes keys`: the first keys, from the command line, before anyone can call the API.

Written straight into marketing's database (migrated first) with their `ClaveApiEmitida` /
`ClaveApiRevocada` in its outbox, in one transaction, as `POST /claves` would: marketing's relay
publishes them when it runs, and every other service learns them from marketing.eventos. Whoever
can run this can read marketing's database anyway; the actor recorded is `cli`.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import typer

from .kernel.access import ALL_SCOPES, OPERATOR, ROLES, Principal
from .kernel.errors import DomainError
from .kernel.messages import utcnow
from .settings import Settings

keys_app = typer.Typer(help="API keys: create the first ones, list, revoke.", no_args_is_help=True)
CLI = Principal("cli", OPERATOR)


@contextmanager
def _marketing(data_dir: Path | None):
    """(session, emit) on marketing's database, committed on exit; a domain refusal exits 1."""
    from .kernel.codec import SchemaRegistry
    from .kernel.db import Database, migrate
    from .kernel.outbox import Outbox
    from .marketing import tables

    settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    url = settings.db_url("marketing")
    migrate(url, "alpes.marketing:migrations")
    db = Database(url)
    outbox = Outbox(tables.outbox, SchemaRegistry.from_directory())
    try:
        with db.transaction() as session:
            yield session, lambda events: outbox.add(session, events, CLI)
    except DomainError as error:
        typer.echo(f"refused: {error.field}: {error.reason}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()


@keys_app.command("create")
def create(role: str = typer.Option(..., "--role", help=f"one of {', '.join(ROLES)}"),
           advertiser: str = typer.Option(None, "--advertiser", help="the advertiser id (role advertiser)"),
           affiliate: str = typer.Option(None, "--affiliate", help="the affiliate id (role affiliate)"),
           name: str = typer.Option(None, "--name", help="what the key is for"),
           expires_days: int = typer.Option(None, "--expires-days", min=1, max=3650),
           scope: list[str] = typer.Option(None, "--scope", help=f"repeatable; default all the role may have "
                                                                 f"({', '.join(ALL_SCOPES)})"),
           data_dir: Path = typer.Option(None)) -> None:
    """Create a key and print it once: only its SHA-256 is kept."""
    from .marketing import keys

    if role not in ROLES:
        raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}")
    now = utcnow()
    with _marketing(data_dir) as (session, emit):
        new, events = keys.issue_key(session, CLI, rol=role, anunciante_id=advertiser, afiliado_id=affiliate,
                                     scopes=scope or None, nombre=name,
                                     expira_en=now + timedelta(days=expires_days) if expires_days else None, now=now)
        emit(events)
    typer.echo(new.key)
    typer.echo(f"key id {new.key_id} ({role}); shown once: store it now. Every service accepts it once "
               "marketing has published it (within seconds of marketing running).", err=True)


@keys_app.command("list")
def list_keys(data_dir: Path = typer.Option(None)) -> None:
    """Every key, without secrets."""
    from .marketing import keys

    with _marketing(data_dir) as (session, _emit):
        for row in keys.list_keys(session, CLI):
            state = "revoked" if row["revocada_en"] else "active"
            owner = row["anunciante_id"] or row["afiliado_id"] or "-"
            typer.echo(f"{row['key_id']}  {row['rol']:<10}  {owner:<36}  {state:<7}  {row['nombre'] or ''}")


@keys_app.command("revoke")
def revoke(key_id: str = typer.Argument(...), data_dir: Path = typer.Option(None)) -> None:
    """Revoke a key everywhere (each service refuses it once it learns of it)."""
    from .marketing import keys

    with _marketing(data_dir) as (session, emit):
        emit(keys.revoke_key(session, CLI, key_id, utcnow()))
    typer.echo(f"revoked {key_id}")
