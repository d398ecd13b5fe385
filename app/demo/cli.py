"""``flask demo seed``: realistic queued messages and a year of delivery history (added to what
is there); ``flask demo reset``: all of it removed again."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from ..cli import emit_json
from ..extensions import db
from .history import seed_history
from .messages import seed_messages
from .reset import reset_demo

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
    """Add realistic queued messages and a year of delivery history.

    Seeding adds to what is there (run it twice: twice the data); `flask demo reset` removes
    every demo message and event again.
    """
    def progress(done: int, total: int) -> None:
        if not as_json and total >= 1_000_000:
            click.echo(f"  history events: {done}/{total}", err=True)

    history = seed_history(db.session(), events, days=days, seed=seed, progress=progress)
    made = seed_messages(db.session(), messages, seed=seed)
    if as_json:
        emit_json({"messages": made, "events": history["events"],
                   "rollup_rows": history["rollup_rows"]})
    else:
        click.echo(f"Seeded history: {history['events']} events over {days} days")
        click.echo("Seeded messages: " + ", ".join(f"{k} {v}" for k, v in made.items()))


@demo_cli.command("reset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def demo_reset_cmd(as_json: bool) -> None:
    """Delete every demo message and event, and nothing else.

    Deleted: queued demo messages (with their recipients and contents) and every event of a
    demo message id (msg-demo-...), the seeded history included; the delivery statistics of
    those hours are recounted. Kept: mail received over SMTP or the API and its events,
    bounces, log records, API keys, DKIM keys.
    """
    done = reset_demo(db.session())
    if as_json:
        emit_json(done)
    else:
        click.echo(f"Deleted {done['messages']} demo message(s) from the queue and "
                   f"{done['events']} demo event(s); other mail, logs and keys are untouched.")
