"""The `alpes` command."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import typer

from .contract import SERVICES, SUBSCRIPTIONS, TOPICS
from .keys_cli import keys_app
from .settings import Settings

app = typer.Typer(help="AlpesPartner: event-driven partner marketing platform.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit log tools.")
app.add_typer(audit_app, name="audit")
replay_app = typer.Typer(help="Rebuild a service's projections from its event store.")
app.add_typer(replay_app, name="replay")
app.add_typer(keys_app, name="keys")


def _settings(data_dir: Path | None) -> Settings:
    settings = Settings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    return settings


def _instances(value: str | None) -> dict[str, int]:
    """`marketing=2,conversiones=2` -> {"marketing_instances": 2, ...}."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        name, _, count = item.partition("=")
        if name not in SERVICES or not count.isdigit() or not 1 <= int(count) <= 9:
            raise typer.BadParameter(f"{item!r}: expected <service>=<1-9>, service one of {', '.join(SERVICES)}")
        counts[f"{name}_instances"] = int(count)
    return counts


@app.command()
def up(data_dir: Path = typer.Option(None, help="Data directory (default ./.alpes or ALPES_DATA_DIR)"),
       instances: str = typer.Option(None, help="processes per service, e.g. marketing=2,conversiones=2 "
                                                 "(or ALPES_<SERVICE>_INSTANCES); default 1 each"),
       broker: str = typer.Option("embedded", help="embedded: pulsar-lite (or the cluster ALPES_BROKER_URL "
                                                   "names); pulsar: a real Apache Pulsar standalone, run here "
                                                   "(needs Java 17 and, once, Maven)")) -> None:
    """Start the broker (embedded unless ALPES_BROKER_URL names one) and the four services; Ctrl-C stops them all."""
    from .pulsar_standalone import StandaloneError
    from .supervisor import Supervisor

    if broker not in ("embedded", "pulsar"):
        raise typer.BadParameter(f"{broker!r}: embedded or pulsar", param_hint="--broker")
    settings = _settings(data_dir)
    settings = settings.model_copy(update=_instances(instances))
    try:
        code = Supervisor(settings, broker=broker).run()
    except StandaloneError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error
    raise typer.Exit(code)


@app.command()
def service(name: str = typer.Argument(..., help=f"one of {', '.join(SERVICES)}"),
            data_dir: Path = typer.Option(None)) -> None:
    """Run one service in this process (what `alpes up` starts four times)."""
    if name not in SERVICES:
        raise typer.BadParameter(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
    import uvicorn

    from .logs import configure_logging

    configure_logging()
    settings = _settings(data_dir)
    build = import_module(f"alpes.{name}.service").build
    fastapi_app, _runtime = build(settings)
    # proxy_headers=False: uvicorn would believe X-Forwarded-For from 127.0.0.1 (every local caller);
    # the app believes it only from ALPES_TRUSTED_PROXIES (kernel.http.ProxyHeaders).
    uvicorn.run(fastapi_app, host=settings.host, port=settings.port(name), log_level="warning",
                timeout_graceful_shutdown=10, proxy_headers=False)


@app.command()
def consola() -> None:
    """Run the web console alone (what `alpes up` starts beside the services): port ALPES_CONSOLA_PORT
    (8000), the services on ALPES_HOST (or ALPES_CONSOLA_SERVICES_HOST) and their ports."""
    import uvicorn

    from .consola.app import build
    from .logs import configure_logging

    configure_logging()
    settings = Settings()
    # proxy_headers=False for the reason given in `service`: the app believes only ALPES_TRUSTED_PROXIES.
    uvicorn.run(build(settings), host=settings.host, port=settings.consola_port, log_level="warning",
                timeout_graceful_shutdown=5, proxy_headers=False)


@app.command()
def provision(data_dir: Path = typer.Option(None)) -> None:
    """Create topics (with their partition counts) and subscriptions on the configured broker; on
    Apache Pulsar also the dead-letter topics, retention, backlog quota and (with ALPES_PULSAR_TOKEN,
    the super-user's) the services' permissions, all verified by reading them back. Idempotent."""
    settings = _settings(data_dir)
    subs = [(s.topic, s.name) for s in SUBSCRIPTIONS]
    if settings.embedded_broker:
        from .kernel.embedded_broker import provision_embedded

        made = provision_embedded(settings.data_dir.resolve() / "broker", TOPICS, subs,
                                  settings.pulsar_tenant, settings.pulsar_namespace)
        typer.echo("provisioned" if made else "already provisioned")
    else:
        from .kernel.pulsar_admin import ProvisioningError
        from .provisioning import provision_pulsar

        if not settings.pulsar_admin_url:
            raise typer.BadParameter("ALPES_PULSAR_ADMIN_URL is needed to provision a real Pulsar cluster")
        # With ALPES_PULSAR_TOKEN (the super-user's) the roles' permissions are provisioned too.
        try:
            report = provision_pulsar(settings, settings.pulsar_admin_url, settings.pulsar_token)
        except ProvisioningError as error:
            typer.echo(f"provisioning failed: {error}", err=True)
            raise typer.Exit(1) from error
        typer.echo(report.summary())


@audit_app.command("verify")
def audit_verify(data_dir: Path = typer.Option(None)) -> None:
    """Walk the audit hash chain; exit 1 and name the first broken link if there is one."""
    from .auditoria.handlers import verify_audit_chain
    from .kernel.db import Database

    db = Database(_settings(data_dir).db_url("auditoria"))
    with db.transaction() as session:
        count, broken = verify_audit_chain(session)
    db.dispose()
    if broken:
        typer.echo(f"BROKEN at record {broken.seq}: {broken.problem} ({count} records before it verified)")
        raise typer.Exit(1)
    typer.echo(f"ok: {count} records, chain intact")


@replay_app.command("conversiones")
def replay_conversiones(data_dir: Path = typer.Option(None)) -> None:
    """Delete and rebuild every conversiones projection from its event store (service stopped)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from sqlalchemy.engine import make_url

    from .conversiones.projections import rebuild_projections
    from .kernel.codec import SchemaRegistry
    from .kernel.db import Database, migrate

    url = _settings(data_dir).db_url("conversiones")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        # A mistyped --data-dir would otherwise create an empty database and "replay" nothing.
        typer.echo(f"no conversiones database at {parsed.database}", err=True)
        raise typer.Exit(1)
    migrate(url, "alpes.conversiones:migrations")  # the projection tables of this version must exist
    db = Database(url)
    try:
        with Progress(TextColumn("replaying conversiones"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task("replay", total=None)
            summary = rebuild_projections(db, SchemaRegistry.from_directory(),
                                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    finally:
        db.dispose()
    typer.echo(f"replayed {summary.events} events of {summary.streams} streams in {summary.seconds:.2f} s")


@app.command()
def hold(name: str = typer.Argument(..., help=f"one of {', '.join(SERVICES)}"),
         seconds: float = typer.Option(30.0, min=0.0, help="how long it stays down once stopped"),
         data_dir: Path = typer.Option(None)) -> None:
    """Stop one service of a running `alpes up` cleanly and keep it down for SECONDS (an outage
    drill: the others keep working, its messages wait in the broker)."""
    from .supervisor import hold_service

    if name not in SERVICES:
        raise typer.BadParameter(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
    settings = _settings(data_dir)
    if not (settings.data_dir / "state.json").exists():
        typer.echo(f"no running `alpes up` on {settings.data_dir.resolve()}", err=True)
        raise typer.Exit(1)
    hold_service(settings.data_dir, name, seconds)
    typer.echo(f"{name} will be stopped and kept down for {seconds:g}s")


@app.command()
def bench(conversions: int = typer.Option(2000, help="conversions to push end to end (0: skip that run)"),
          rate: int = typer.Option(0, help="end-to-end postbacks per second (0: as fast as possible)"),
          raw_messages: int = typer.Option(20000, help="messages for the raw broker measurement"),
          postback_rate: float = typer.Option(500, help="postbacks per second offered at a constant rate"),
          postback_seconds: float = typer.Option(30, help="how long to offer them (0: skip)"),
          click_rate: float = typer.Option(1000, help="tracking-link clicks per second offered at a constant rate"),
          click_seconds: float = typer.Option(30, help="how long to offer them (0: skip)"),
          replay_events: int = typer.Option(1_000_000, min=0, help="events of conversiones' event store to write, "
                                                                   "then rebuild with `alpes replay` (0: skip)"),
          database: str = typer.Option("sqlite", help="sqlite, mariadb (one scratch database per service), or "
                                                      "both (figures under the keys sqlite and mariadb)"),
          mariadb_url: str = typer.Option(None, help="MariaDB server for --database mariadb/both, a user that may "
                                                     "create databases (default ALPES_TEST_MARIADB_URL or "
                                                     "mysql+pymysql://alpes:alpes@127.0.0.1:3306)"),
          data_dir: Path = typer.Option(None, help="scratch data directory (default: a temporary one)")) -> None:
    """Measure raw broker throughput, end-to-end conversion rate/latency, postbacks and clicks at a
    constant rate (open loop), and the replay of conversiones' projections; prints JSON."""
    from .bench import DATABASES, run_bench

    if database not in DATABASES:
        raise typer.BadParameter(f"{database!r}: one of {', '.join(DATABASES)}", param_hint="--database")
    typer.echo(run_bench(conversions=conversions, rate=rate, raw_messages=raw_messages, data_dir=data_dir,
                         postback_rate=postback_rate, postback_seconds=postback_seconds,
                         click_rate=click_rate, click_seconds=click_seconds, replay_events=replay_events,
                         database=database, mariadb_url=mariadb_url))


@app.command()
def demo(url_base: str = typer.Option("http://127.0.0.1", help="scheme and host of the running services"),
         conversions: int = typer.Option(200, min=0, help="clicks and postbacks to send"),
         timeout: float = typer.Option(120.0, help="seconds to wait for each asynchronous step")) -> None:
    """Load a demo scenario into a running platform (ports from ALPES_<SERVICE>_PORT and
    ALPES_CONSOLA_PORT); print where to look, in the JSON APIs and in the web console per role."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .demo import DemoError, run_demo

    settings = Settings()
    ports = {name: settings.port(name) for name in SERVICES}
    try:
        with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as bar:
            tasks: dict[str, int] = {}

            def progress(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(step, total=total)
                bar.update(tasks[step], completed=done, total=total)
            result = run_demo(url_base, ports, conversions, progress=progress, timeout=timeout,
                              console_port=settings.consola_port)
    except DemoError as error:
        typer.echo(f"demo failed: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"campaign {result.campana_id}: {len(result.afiliados)} affiliates, {result.clicks} clicks, "
               f"{len(result.conversions)} conversions, {result.pagos} payouts")
    if result.seconds:
        typer.echo("seconds from the first click: " + ", ".join(f"{what} {s}" for what, s in result.seconds.items()))
    for what, link in result.urls.items():
        typer.echo(f"  {what:<16} {link}")
    typer.echo("In the web console:")
    for role, (link, how) in result.console.items():
        typer.echo(f"  {role:<16} {link}\n  {'':<16} ({how})")


@app.command()
def manifests(directory: Path = typer.Argument(Path("deploy/k8s"), help="the generated Kubernetes manifests"),
              check: bool = typer.Option(False, "--check", help="show the differences and exit 1 instead of writing")
              ) -> None:
    """Generate deploy/k8s (Kubernetes + KEDA) from the contract, or --check that it is in step."""
    from . import manifests as generator

    if check:
        problems = generator.check(directory)
        for problem in problems:
            typer.echo(problem)
        if problems:
            typer.echo(f"{directory} differs from the contract: run `alpes manifests {directory}`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{directory}: in step with the contract")
        return
    for path in generator.write(directory):
        typer.echo(path)


@app.command()
def asyncapi(output: Path = typer.Option(Path("docs/asyncapi.json"), help="the committed AsyncAPI document"),
             check: bool = typer.Option(False, "--check", help="show the differences and exit 1 instead of writing")
             ) -> None:
    """Generate the AsyncAPI 3.0 document of the events (docs/asyncapi.json) from the contract and the
    Avro schemas, or --check that the committed one is in step."""
    from . import asyncapi as generator

    if check:
        problems = generator.check(output)
        for problem in problems:
            typer.echo(problem)
        if problems:
            typer.echo(f"{output} differs from the contract and the schemas: run `alpes asyncapi`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{output}: in step with the contract and the schemas")
        return
    typer.echo(generator.write(output))


schemas_app = typer.Typer(help="Avro schema tools.")
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("check")
def schemas_check(directory: Path = typer.Argument(None, help="a directory of <Event>.v<N>.avsc "
                                                              "(default: the package's schemas)")) -> None:
    """Every new version of an event must be backward and forward compatible with the one before it
    (Avro resolution rules); exit 1 naming the event, the versions and the field that breaks it."""
    from .schema_evolution import check as check_evolution

    pairs, problems = check_evolution(directory)
    for problem in problems:
        typer.echo(problem)
    if problems:
        typer.echo(f"{len(problems)} schema evolution problem(s) in {pairs} version pairs", err=True)
        raise typer.Exit(1)
    typer.echo(f"{pairs} version pairs compatible both ways (backward and forward)")
