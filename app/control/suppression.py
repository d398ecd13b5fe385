"""The suppression list: addresses no mail is sent to (docs/DELIVERY.md, "Suppression list").

A recipient that failed permanently with a "no such user" class of reply from the receiving
server (5.1.1 bad mailbox, 5.1.10 null MX of the recipient, 5.2.1 when the text says the
mailbox is disabled) is suppressed in the same transaction that records the failure
(``queue.outcomes`` calls ``suppress_after_failure``). New mail to a suppressed address is
refused before it is queued: at RCPT time by the SMTP listener
(``550 5.1.1 <address>: Recipient address suppressed``) and by send-test, each with a
``rejection`` event, so no delivery is ever attempted. Operators list, add, remove, import and
export entries; an entry may expire (then it no longer applies and is not listed by default).

Every address that enters the list (after a failure, by an operator, by an import) records a
``system`` event with action ``suppressed`` in the same transaction: the history says why mail
to it stops, and the webhook feed sends it as a ``suppressed`` event (docs/WEBHOOKS.md).

Addresses are compared in lower case (the local part is case-sensitive in theory, in practice
nowhere).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so

from ..errors import Conflict, NotFound, ValidationFailed
from ..events import record_event
from ..mail.addresses import AddressError, check_address
from ..models import Suppression
from ..timeutil import isoformat_z, parse_iso, utcnow

log = logging.getLogger("elemta.control")

SUPPRESSING_CODES = ("5.1.1", "5.1.10")
_DISABLED = re.compile(r"disabled|deactivated|inactive|suspended|not active", re.IGNORECASE)
SOURCES = ("bounce", "operator", "import")
CSV_FIELDS = ("address", "reason", "source", "created_at", "expires_at")
MAX_IMPORT_ROWS = 100_000
CHUNK = 1000
REPLY = "550 5.1.1 <{address}>: Recipient address suppressed ({reason})"
EVENT_TEXT = "{address} added to the suppression list ({source}): {reason}"


def normalise(address: str) -> str:
    return address.strip().lower()


def checked_address(address: object, field: str = "address") -> str:
    if not isinstance(address, str):
        raise ValidationFailed("Invalid address", {field: ["Must be an email address."]})
    text = normalise(address)
    try:
        check_address(text)
    except AddressError as exc:
        raise ValidationFailed("Invalid address", {field: [str(exc)]}) from None
    return text


def _record_suppressed(session: so.Session, entry: Suppression, *, sender: str | None = None,
                       enhanced_code: str | None = None, queue_state: str | None = None) -> None:
    """The ``suppressed`` system event of a new entry; no commit (the caller's transaction)."""
    record_event(session, "system", message_id=entry.message_id, sender=sender,
                 recipient=entry.address, timestamp=entry.created_at,
                 message=EVENT_TEXT.format(address=entry.address, source=entry.source,
                                           reason=" ".join(entry.reason.split())[:200]),
                 enhanced_code=enhanced_code, action="suppressed", queue_state=queue_state,
                 counts_as_outcome=False)


# --------------------------------------------------------------------------- delivery side


def suppresses(smtp_code: int | None, enhanced_code: str | None, text: str) -> bool:
    """Whether a permanent failure means the mailbox does not exist (or is disabled).

    Only replies of a receiving server count (``smtp_code``): a 5.1.10 Elemta derives from a
    null MX record is about the domain, and is not a remote's word on the mailbox.
    """
    if smtp_code is None or smtp_code < 500 or not enhanced_code:
        return False
    if enhanced_code in SUPPRESSING_CODES:
        return True
    return enhanced_code == "5.2.1" and bool(_DISABLED.search(text))


def suppress_after_failure(session: so.Session, address: str, reason: str,
                           enhanced_code: str | None, message_id: str | None,
                           now: dt.datetime, sender: str | None = None,
                           queue_state: str | None = None) -> None:
    """Suppress ``address`` after a permanent failure; no commit (the outcome's transaction).

    An entry that exists is kept as it is (an operator's expiry included), unless it expired.
    """
    address = normalise(address)[:320]
    existing = session.scalar(sa.select(Suppression).where(Suppression.address == address))
    if existing is not None:
        if existing.expires_at is None or existing.expires_at > now:
            return
        session.delete(existing)
        session.flush()
    entry = Suppression(address=address, reason=reason[:1000], source="bounce",
                        enhanced_code=enhanced_code, message_id=message_id,
                        created_by="delivery", created_at=now, expires_at=None)
    session.add(entry)
    _record_suppressed(session, entry, sender=sender, enhanced_code=enhanced_code,
                       queue_state=queue_state)
    log.info("Suppressed %s after a permanent failure (%s)", address, reason[:200])


def active(session: so.Session, addresses: Sequence[str],
           now: dt.datetime | None = None) -> dict[str, Suppression]:
    """The suppressions in force among ``addresses`` (by lower-case address)."""
    wanted = sorted({normalise(a) for a in addresses})
    now = now or utcnow()
    found: dict[str, Suppression] = {}
    for start in range(0, len(wanted), CHUNK):  # bound the statement's parameters
        found.update((row.address, row) for row in session.scalars(sa.select(Suppression).where(
            Suppression.address.in_(wanted[start:start + CHUNK]),
            sa.or_(Suppression.expires_at.is_(None), Suppression.expires_at > now))))
    return found


class SuppressionFields(Protocol):
    """What the refusal reads of an entry: a ``Suppression`` or a row of these columns."""

    @property
    def reason(self) -> str: ...
    @property
    def source(self) -> str: ...


def refusal_reply(address: str, entry: SuppressionFields) -> str:
    reason = " ".join(entry.reason.split())[:120] or entry.source
    return REPLY.format(address=address, reason=reason)


# --------------------------------------------------------------------------- operator side


@dataclass(frozen=True)
class SuppressionFilters:
    address: str | None = None  # case-insensitive substring
    source: str | None = None
    reason: str | None = None  # case-insensitive substring
    include_expired: bool = False


def _conditions(filters: SuppressionFilters, now: dt.datetime) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = []
    if filters.address:
        conds.append(Suppression.address.contains(filters.address.lower(), autoescape=True))
    if filters.source:
        conds.append(Suppression.source == filters.source)
    if filters.reason:
        conds.append(sa.func.lower(Suppression.reason).contains(filters.reason.lower(),
                                                                autoescape=True))
    if not filters.include_expired:
        conds.append(sa.or_(Suppression.expires_at.is_(None), Suppression.expires_at > now))
    return conds


def _encode_cursor(row: Suppression) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, ident = raw.partition("|")
        return parse_iso(created), int(ident)
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("Invalid cursor",
                               {"cursor": ["Not a cursor from this API."]}) from None


def list_suppressions(session: so.Session, filters: SuppressionFilters, *, limit: int = 100,
                      cursor: str | None = None) -> tuple[list[Suppression], str | None, int]:
    """A page of entries, newest first (keyset paging), the next cursor and the total."""
    now = utcnow()
    conds = _conditions(filters, now)
    total = session.scalar(sa.select(sa.func.count()).select_from(Suppression).where(*conds))
    query = sa.select(Suppression).where(*conds)
    if cursor:
        created, ident = _decode_cursor(cursor)
        query = query.where(sa.tuple_(Suppression.created_at, Suppression.id)
                            < sa.tuple_(sa.literal(created, Suppression.created_at.type),
                                        sa.literal(ident)))
    rows = list(session.scalars(query.order_by(Suppression.created_at.desc(),
                                               Suppression.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor, total or 0


def get_suppression(session: so.Session, address: str) -> Suppression:
    row = session.scalar(sa.select(Suppression).where(Suppression.address == normalise(address)))
    if row is None:
        raise NotFound(f"{address} is not suppressed")
    return row


def add_suppression(session: so.Session, address: str, reason: str,
                    expires_at: dt.datetime | None, actor: str) -> Suppression:
    """Suppress an address by hand; commits. 409 when it is suppressed already."""
    address = checked_address(address)
    now = utcnow().replace(microsecond=0)
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed("Invalid suppression", {"expires_at": ["Must be in the future."]})
    existing = session.scalar(sa.select(Suppression).where(Suppression.address == address))
    if existing is not None and (existing.expires_at is None or existing.expires_at > now):
        raise Conflict(f"{address} is suppressed already (since "
                       f"{isoformat_z(existing.created_at)}); remove it first to change it")
    if existing is not None:
        session.delete(existing)
        session.flush()
    row = Suppression(address=address, reason=reason.strip() or "added by an operator",
                      source="operator", enhanced_code=None, message_id=None,
                      created_by=actor[:100], created_at=now, expires_at=expires_at)
    session.add(row)
    _record_suppressed(session, row)
    try:
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        raise Conflict(f"{address} was suppressed at the same time; try again") from None
    log.info("%s suppressed by %s: %s", address, actor, row.reason)
    return row


def remove_suppression(session: so.Session, address: str, actor: str) -> None:
    row = get_suppression(session, address)
    session.delete(row)
    session.commit()
    log.info("%s removed from the suppression list by %s", row.address, actor)


def export_csv(session: so.Session, filters: SuppressionFilters) -> str:
    """Every matching entry as CSV (``CSV_FIELDS``), newest first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_FIELDS)
    query = sa.select(Suppression).where(*_conditions(filters, utcnow())).order_by(
        Suppression.created_at.desc(), Suppression.id.desc())
    for row in session.scalars(query):
        writer.writerow([row.address, row.reason, row.source, isoformat_z(row.created_at),
                         isoformat_z(row.expires_at) or ""])
    return out.getvalue()


def import_csv(session: so.Session, text: str, actor: str) -> dict[str, int]:
    """Add the addresses of a CSV (a header with ``address``, optional ``reason`` and
    ``expires_at``; other columns, such as an export's, are ignored); commits.

    Every row is checked first: one bad row refuses the whole file (400, with the lines)
    and nothing changes. Addresses suppressed already are left as they are (``skipped``).
    """
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "address" not in [f.strip().lower() for f in reader.fieldnames]:
        raise ValidationFailed("Invalid CSV", {"body": [
            "The first line must be a header naming an 'address' column."]})
    now = utcnow().replace(microsecond=0)
    wanted: dict[str, tuple[str, dt.datetime | None]] = {}
    problems: dict[str, list[str]] = {}
    try:
        for number, raw in enumerate(reader, start=2):
            if number - 1 > MAX_IMPORT_ROWS:
                raise ValidationFailed("Invalid CSV", {"body": [
                    f"At most {MAX_IMPORT_ROWS} rows per import."]})
            row = {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else ""
                   for k, v in raw.items()}
            try:
                address = checked_address(row.get("address", ""))
            except ValidationFailed as exc:
                problems[f"line {number}"] = [m for ms in exc.details.values() for m in ms]
                continue
            expires = None
            if row.get("expires_at"):
                try:
                    expires = parse_iso(row["expires_at"])
                except ValueError:
                    problems[f"line {number}"] = ["expires_at: not an ISO 8601 timestamp."]
                    continue
                if expires <= now:
                    continue  # an expired entry (an old export): nothing to import
            wanted[address] = (row.get("reason") or "imported", expires)
    except csv.Error as exc:
        raise ValidationFailed("Invalid CSV", {"body": [str(exc)]}) from None
    if problems:
        raise ValidationFailed("Invalid CSV: nothing was imported", problems)
    present = active(session, list(wanted), now)
    added = 0
    stale = [a for a in wanted if a not in present]  # absent, or expired: replaced
    for start in range(0, len(stale), CHUNK):
        session.execute(sa.delete(Suppression).where(
            Suppression.address.in_(stale[start:start + CHUNK])))
    for address, (reason, expires) in wanted.items():
        if address in present:
            continue
        entry = Suppression(address=address, reason=reason[:1000], source="import",
                            enhanced_code=None, message_id=None, created_by=actor[:100],
                            created_at=now, expires_at=expires)
        session.add(entry)
        _record_suppressed(session, entry)
        added += 1
    try:
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        raise Conflict("Addresses were suppressed at the same time; import again") from None
    log.info("Suppression import by %s: %d added, %d suppressed already", actor, added,
             len(present))
    return {"imported": added, "skipped": len(present)}
