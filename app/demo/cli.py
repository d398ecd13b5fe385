"""``flask demo seed``: realistic queued messages and a year of delivery history."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from ..cli import emit_json
from ..extensions import db
from .history import seed_history
from .messages import seed_messages

demo_cli = AppGroup("demo", help="Demo data for a first look and for benchmarks.")


@demo_cli.command("seed")
@click.option("--messages", type=click.IntRange(0), default=300, show_default=True,
              help="Queued messages to create, spread over every state.")
@click.option("--events", type=click.IntRange(0), default=5000, show_default=True,
              help="History events spread over the past year (10 million: minutes on PostgreSQL).")
@click.option("--days", type=click.IntRange(1, 3660), default=365, show_default=True,
              help="How far back the history events go.")
@click.option("--seed", type=int, default=None, help="Random seed, for repeatable data.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def demo_seed_cmd(messages: int, events: int, days: int, seed: int | None, as_json: bool) -> None:
    """Fill the database with realistic queued messages and a year of delivery history."""
    def progress(done: int, total: int) -> None:
        if not as_json and total >= 1_000_000:
            click.echo(f"  history events: {done}/{total}", err=True)

    history = seed_history(db.session, events, days=days, seed=seed, progress=progress)
    made = seed_messages(db.session, messages, seed=seed)
    if as_json:
        emit_json({"messages": made, "events": history["events"],
                   "rollup_rows": history["rollup_rows"]})
    else:
        click.echo(f"Seeded history: {history['events']} events over {days} days")
        click.echo("Seeded messages: " + ", ".join(f"{k} {v}" for k, v in made.items()))
