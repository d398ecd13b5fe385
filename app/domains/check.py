"""The domain check: what a receiver will see of mail from a domain sent by this host.

One report of six items, each ``pass``, ``warn`` or ``fail``, with the record found and, when it
is missing or wrong, the exact record to publish:

- ``spf``: the record, evaluated by pyspf for each address of ``ELEMTA_SENDING_IPS``;
- ``dkim``: each active (and standby) key's TXT record holds our public key;
- ``dmarc``: a record exists, its policy, and whether our SPF and DKIM identities align;
- ``mx``: the return-path domain (the envelope sender's, assumed to be the domain itself) can
  receive bounces;
- ``fcrdns``: each sending address has a PTR whose name resolves back to it;
- ``mta_sts``: whether the domain publishes MTA-STS (optional; the policy file is not fetched).

Reports are cached per process for ``ELEMTA_DOMAIN_CHECK_CACHE`` seconds (DNS answers are
cached by receivers for their TTL anyway); a cached report says its age.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask

from ..config import local_hostname
from ..dkim.keys import dns_record
from ..dkim.records import InvalidName, normalise_domain, parent_domains, parse_tags
from ..dnsresolver import make_resolver
from ..errors import ValidationFailed
from ..models import DkimKey
from ..timeutil import utcnow
from . import spf
from .lookups import Lookups

STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}
DMARC_POLICIES = ("none", "quarantine", "reject")


@dataclass
class Record:
    """A record to publish."""

    name: str
    type: str
    value: str


@dataclass
class Item:
    name: str
    status: str
    summary: str
    found: list[str] = field(default_factory=list)
    publish: list[Record] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    domain: str
    sending_ips: Sequence[str]
    hostname: str  # what this host says in EHLO (ELEMTA_SMTP_HOSTNAME)
    lookups: Lookups
    resolver: Any


def worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=STATUS_ORDER.__getitem__, default="pass")


# --------------------------------------------------------------------------- SPF


def _spf_mechanisms(ips: Sequence[str]) -> list[str]:
    return [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips]


def _spf_with(record: str, missing: Sequence[str]) -> str:
    """The record with mechanisms for the missing addresses inserted after ``v=spf1``."""
    terms = record.split()
    return " ".join(terms[:1] + _spf_mechanisms(missing) + terms[1:])


def check_spf(ctx: Context) -> Item:
    found = spf.spf_record(ctx.resolver, ctx.domain)
    fresh = f"v=spf1 {' '.join(_spf_mechanisms(ctx.sending_ips)) or 'ip4:YOUR.SENDING.IP'} ~all"
    publish = [Record(ctx.domain, "TXT", fresh)]
    if found.error and found.temporary:
        return Item("spf", "warn", f"Could not look up the SPF record of {ctx.domain}: "
                    f"{found.error}. Receivers that fail the same way defer or treat the "
                    "mail as unauthenticated.")
    if found.error:
        return Item("spf", "fail", f"{ctx.domain} has more than one SPF record; receivers "
                    "treat that as an error (permerror) and ignore them all. Merge them into "
                    "one.", details=[found.error], publish=publish)
    if found.record is None:
        return Item("spf", "fail", f"{ctx.domain} publishes no SPF record, so receivers "
                    "cannot tell that this host may send its mail.", publish=publish,
                    details=["~all (softfail) is the cautious start; use -all once every "
                             f"server that sends for {ctx.domain} is listed."])
    item = Item("spf", "pass", "", found=[found.record])
    if not ctx.sending_ips:
        item.status = "warn"
        item.summary = ("ELEMTA_SENDING_IPS is not set, so the record cannot be checked against "
                        "the addresses this host sends from. Set it to the public address(es) "
                        "mail leaves from.")
        return item
    results = [spf.evaluate(ctx.resolver, ctx.domain, ip, ctx.hostname)
               for ip in ctx.sending_ips]
    for r in results:
        item.details.append(f"{r.ip}: {r.result}" + (f" ({r.explanation})"
                                                     if r.explanation else ""))
    failing = [r for r in results if r.result != "pass"]
    if not failing:
        item.summary = (f"The SPF record of {ctx.domain} allows every sending address "
                        f"({', '.join(ctx.sending_ips)}).")
        return item
    if any(r.result == "permerror" for r in failing):
        item.status = "fail"
        item.summary = (f"The SPF record of {ctx.domain} is broken (permerror): receivers "
                        "ignore it. Replace it with a correct one.")
        item.publish = publish
        return item
    if all(r.result == "temperror" for r in failing):
        item.status = "warn"
        item.summary = "A DNS lookup needed by the SPF record failed; try again later."
        return item
    item.status = "fail" if any(r.result in ("fail", "softfail") for r in failing) else "warn"
    addresses = ", ".join(r.ip for r in failing)
    item.summary = (f"The SPF record of {ctx.domain} does not allow {addresses}: mail from "
                    "this host fails SPF there. Add the address(es) to the record.")
    item.publish = [Record(ctx.domain, "TXT",
                           _spf_with(found.record, [r.ip for r in failing]))]
    return item


# --------------------------------------------------------------------------- DKIM


def signing_domain_keys(session: so.Session, domain: str) -> list[DkimKey]:
    """The active and standby keys of the most specific of ``domain`` and its parents that has
    an active key (the domain whose keys sign its mail); standby ones of ``domain`` else."""
    candidates = parent_domains(domain)
    keys = list(session.scalars(sa.select(DkimKey).where(
        DkimKey.domain.in_(candidates), DkimKey.state.in_(("active", "standby")))
        .order_by(DkimKey.id)))
    active = [k for k in keys if k.state == "active"]
    if active:
        nearest = min((k.domain for k in active), key=candidates.index)
    elif keys:
        nearest = min((k.domain for k in keys), key=candidates.index)
    else:
        return []
    return [k for k in keys if k.domain == nearest]


def _key_status(ctx: Context, key: DkimKey) -> tuple[str, str, list[str]]:
    """(status, words, records found) of one key's DNS record."""
    record = dns_record(key)
    answer = ctx.lookups.txt(record.name)
    if answer.error:
        return "warn", f"{record.name}: {answer.error}", []
    found = answer.records
    keys_found = [r for r in found if "p=" in r.replace(" ", "")]
    if not keys_found:
        return ("fail" if key.state == "active" else "warn",
                f"{record.name}: not published" + ("; every signature of this key fails "
                                                   "verification" if key.state == "active"
                                                   else "; publish it before switching to it"),
                found)
    if len(keys_found) > 1:
        return "fail", f"{record.name}: {len(keys_found)} key records; keep exactly one", found
    tags = parse_tags(keys_found[0])
    if tags.get("v", "DKIM1") != "DKIM1":
        return "fail", f"{record.name}: v={tags['v']} (must be DKIM1)", found
    if tags.get("k", "rsa") != key.algorithm:
        return ("fail", f"{record.name}: k={tags.get('k', 'rsa')}, but the key is "
                f"{key.algorithm}", found)
    if not tags.get("p"):
        return "fail", f"{record.name}: the key is revoked (empty p=)", found
    if tags["p"] != key.public_key:
        return ("fail", f"{record.name}: the published key is not this key (an old one, or a "
                "copy error)", found)
    return "pass", f"{record.name}: published, matches our {key.algorithm} key", found


def check_dkim(ctx: Context, keys: Sequence[DkimKey]) -> Item:
    if not keys:
        return Item("dkim", "fail", f"No DKIM key signs mail from {ctx.domain}: receivers see "
                    "it unsigned. Create one with `flask dkim create --domain "
                    f"{ctx.domain}` and publish the record it prints.")
    item = Item("dkim", "pass", "")
    statuses = []
    for key in keys:
        status, words, found = _key_status(ctx, key)
        statuses.append(status)
        item.details.append(f"{key.selector} ({key.algorithm}, {key.state}): {words}")
        item.found.extend(found)
        if status != "pass":
            record = dns_record(key)
            item.publish.append(Record(record.name, "TXT", record.value))
    item.status = worst(statuses)
    active = [k for k in keys if k.state == "active"]
    signer = keys[0].domain
    via = "" if signer == ctx.domain else f" (signed as d={signer}, a parent domain)"
    if not active:
        item.status = "fail"
        item.summary = (f"{signer} has only standby keys: nothing signs mail from "
                        f"{ctx.domain} until one is switched to (`flask dkim activate`).")
    elif item.status == "pass":
        item.summary = (f"Mail from {ctx.domain} is signed{via} and receivers find the "
                        "matching public key(s).")
    elif item.status == "fail":
        item.summary = ("Receivers cannot verify the DKIM signatures of mail from "
                        f"{ctx.domain}{via}: publish the record(s) below exactly.")
    else:
        item.summary = f"DKIM works for {ctx.domain}{via}, with the remarks below."
    return item


# --------------------------------------------------------------------------- DMARC


def _dmarc_record(ctx: Context) -> tuple[str | None, list[str], str | None]:
    """(where it was found, the records there, a DNS error) for the domain, else its parents
    (a receiver falls back to the organisational domain)."""
    for name in parent_domains(ctx.domain):
        answer = ctx.lookups.txt(f"_dmarc.{name}", prefix="v=DMARC1")
        if answer.error:
            return None, [], answer.error
        if answer.records:
            return name, answer.records, None
    return None, [], None


def check_dmarc(ctx: Context, keys: Sequence[DkimKey], spf_item: Item,
                dkim_item: Item) -> Item:
    publish = [Record(f"_dmarc.{ctx.domain}", "TXT",
                      f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{ctx.domain}")]
    where, records, error = _dmarc_record(ctx)
    if error:
        return Item("dmarc", "warn", f"Could not look up the DMARC record: {error}.")
    if not records:
        return Item("dmarc", "fail", f"{ctx.domain} publishes no DMARC record. Gmail and Yahoo "
                    "require one from bulk senders, and without it receivers apply their own "
                    "rules. Start with p=none and read the reports (rua) before tightening.",
                    publish=publish)
    item = Item("dmarc", "pass", "", found=records)
    if where != ctx.domain:
        item.details.append(f"found at _dmarc.{where}; it covers {ctx.domain} (sp= applies)")
    if len(records) > 1:
        item.status, item.summary = "fail", (f"_dmarc.{where} has {len(records)} DMARC records: "
                                             "receivers ignore them all. Keep one.")
        item.publish = publish
        return item
    tags = parse_tags(records[0])
    policy = (tags["sp"] if where != ctx.domain and tags.get("sp") else tags.get("p", ""))
    if not records[0].replace(" ", "").lower().startswith("v=dmarc1;") \
            or policy.lower() not in DMARC_POLICIES:
        item.status = "fail"
        item.summary = ("The DMARC record is broken: it must start with v=DMARC1 and give "
                        "p=none, quarantine or reject. Receivers ignore it as it is.")
        item.publish = publish
        return item
    policy = policy.lower()
    strict_dkim = tags.get("adkim", "r").lower() == "s"
    strict_spf = tags.get("aspf", "r").lower() == "s"
    signer = keys[0].domain if keys else None
    dkim_aligned = signer is not None and (signer == ctx.domain or not strict_dkim)
    dkim_passes = dkim_item.status == "pass" and dkim_aligned
    spf_passes = spf_item.status == "pass"  # the envelope domain is the domain itself
    inherited = bool(tags.get("sp")) and where != ctx.domain
    item.details.append(f"policy p={policy}" + (" (from sp=)" if inherited else ""))
    item.details.append(
        "DKIM: " + ("no key" if signer is None else
                    f"d={signer}, {'aligned' if dkim_aligned else 'NOT aligned'} "
                    f"({'strict' if strict_dkim else 'relaxed'} alignment)"))
    item.details.append(f"SPF: envelope domain {ctx.domain}, aligned "
                        f"({'strict' if strict_spf else 'relaxed'} alignment), "
                        f"SPF check {spf_item.status}")
    if not (dkim_passes or spf_passes):
        item.status = "fail"
        item.summary = ("Neither DKIM nor SPF passes aligned with the From: domain, so mail "
                        f"from this host fails DMARC (policy {policy}). Fix the DKIM and SPF "
                        "items above.")
    elif policy == "none":
        item.status = "warn"
        item.summary = ("DMARC is in monitoring mode (p=none): receivers act on nothing. Once "
                        "the reports show all your mail passing, move to p=quarantine.")
    else:
        through = " and ".join(name for name, ok in (("DKIM", dkim_passes), ("SPF", spf_passes))
                               if ok)
        item.summary = f"DMARC policy {policy}; mail from this host passes it through {through}."
    return item


# --------------------------------------------------------------------------- MX, FCrDNS, MTA-STS


def check_mx(ctx: Context) -> Item:
    answer = ctx.lookups.query(ctx.domain, "MX")
    example = Record(ctx.domain, "MX", f"10 mail.{ctx.domain}.")
    if answer.error:
        return Item("mx", "warn", f"Could not look up the MX of {ctx.domain}: {answer.error}.")
    if answer.nxdomain:
        return Item("mx", "fail", f"{ctx.domain} does not exist in DNS: receivers refuse mail "
                    "whose return path they cannot reach.", publish=[example])
    if any(r.split()[-1] == "." for r in answer.records):
        return Item("mx", "fail", f"{ctx.domain} has a null MX (RFC 7505): it accepts no mail, "
                    "so bounces to its senders are lost and many receivers refuse such mail.",
                    found=answer.records, publish=[example])
    if answer.records:
        return Item("mx", "pass", f"Bounces to the return path @{ctx.domain} can be delivered.",
                    found=answer.records)
    addresses = ctx.lookups.addresses(ctx.domain)
    if addresses.records:
        return Item("mx", "warn", f"{ctx.domain} has no MX record; mail to it goes to its "
                    "address record (implicit MX). Publish an MX for the server that receives "
                    "its mail.", found=addresses.records, publish=[example])
    return Item("mx", "fail", f"{ctx.domain} has no MX and no address record: bounces to its "
                "senders cannot be delivered, and receivers refuse mail from domains that "
                "cannot receive.", publish=[example])


def check_fcrdns(ctx: Context) -> Item:
    if not ctx.sending_ips:
        return Item("fcrdns", "warn", "ELEMTA_SENDING_IPS is not set: the reverse DNS of this "
                    "host's sending addresses cannot be checked.")
    statuses, item = [], Item("fcrdns", "pass", "")
    for ip in ctx.sending_ips:
        reverse = ipaddress.ip_address(ip).reverse_pointer
        ptr = ctx.lookups.ptr(ip)
        wanted = [Record(reverse, "PTR", f"{ctx.hostname}."),
                  Record(ctx.hostname, "A" if ":" not in ip else "AAAA", ip)]
        if ptr.error:
            statuses.append("warn")
            item.details.append(f"{ip}: {ptr.error}")
            continue
        if not ptr.records:
            statuses.append("fail")
            item.details.append(f"{ip}: no PTR record (ask whoever owns the address, usually "
                                "the hosting provider, to set it)")
            item.publish.extend(wanted)
            continue
        item.found.extend(f"{reverse} PTR {name}" for name in ptr.records)
        confirmed = [name for name in ptr.records if ip in ctx.lookups.addresses(name).records]
        if not confirmed:
            statuses.append("fail")
            item.details.append(f"{ip}: PTR {', '.join(ptr.records)}, but that name does not "
                                f"resolve back to {ip}")
            item.publish.extend(wanted)
        elif ctx.hostname.lower() not in confirmed:
            statuses.append("warn")
            item.details.append(f"{ip}: {confirmed[0]} (confirmed), but this host says "
                                f"EHLO {ctx.hostname}; set ELEMTA_SMTP_HOSTNAME={confirmed[0]} "
                                "or change the PTR")
        else:
            statuses.append("pass")
            item.details.append(f"{ip}: {confirmed[0]} (confirmed, matches EHLO)")
    item.status = worst(statuses)
    item.summary = {
        "pass": "Every sending address has a PTR that resolves back to it (FCrDNS).",
        "warn": "Reverse DNS works, with the remarks below.",
        "fail": "A sending address lacks forward-confirmed reverse DNS: many receivers "
                "(Gmail, Outlook) refuse or junk mail from such addresses.",
    }[item.status]
    return item


def check_mta_sts(ctx: Context) -> Item:
    answer = ctx.lookups.txt(f"_mta-sts.{ctx.domain}", prefix="v=STSv1")
    example = Record(f"_mta-sts.{ctx.domain}", "TXT", f"v=STSv1; id={utcnow():%Y%m%d}01")
    if answer.error:
        return Item("mta_sts", "warn", f"Could not look up MTA-STS: {answer.error}.")
    if not answer.records:
        return Item("mta_sts", "warn", f"{ctx.domain} does not publish MTA-STS (optional): it "
                    "would tell other servers to require TLS when they deliver to "
                    f"{ctx.domain}. It also needs the policy file at https://mta-sts."
                    f"{ctx.domain}/.well-known/mta-sts.txt.", publish=[example])
    if len(answer.records) > 1 or "id" not in parse_tags(answer.records[0]):
        return Item("mta_sts", "fail", "The MTA-STS record is broken (one record, with an id=, "
                    "is needed): senders ignore it.", found=answer.records, publish=[example])
    return Item("mta_sts", "pass", f"{ctx.domain} publishes MTA-STS (the policy file itself is "
                "not fetched by this check).", found=answer.records)


# --------------------------------------------------------------------------- the report


def run_checks(session: so.Session, domain: str, *, sending_ips: Sequence[str], hostname: str,
               resolver: Any) -> dict[str, Any]:
    ctx = Context(domain, list(sending_ips), hostname, Lookups(resolver), resolver)
    keys = signing_domain_keys(session, domain)
    spf_item = check_spf(ctx)
    dkim_item = check_dkim(ctx, keys)
    items = [spf_item, dkim_item, check_dmarc(ctx, keys, spf_item, dkim_item), check_mx(ctx),
             check_fcrdns(ctx), check_mta_sts(ctx)]
    return {"domain": domain, "status": worst([i.status for i in items]),
            "checked_at": utcnow().replace(microsecond=0),
            "sending_ips": list(sending_ips), "hostname": hostname,
            "checks": [asdict(i) for i in items]}


CACHE_EXTENSION = "elemta.domain_checks"


def cache_of(app: Flask) -> ReportCache:
    """The report cache of this application (one per process)."""
    return app.extensions.setdefault(CACHE_EXTENSION, ReportCache())


class ReportCache:
    """Reports of this process by domain, reused for ``max_age`` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, domain: str, max_age: float) -> dict[str, Any] | None:
        with self._lock:
            entry = self._reports.get(domain)
        if entry is None or time.monotonic() - entry[0] > max_age:
            return None
        return entry[1]

    def put(self, domain: str, report: dict[str, Any]) -> None:
        with self._lock:
            self._reports[domain] = (time.monotonic(), report)


def check_domain(session: so.Session, domain: str, config: Mapping[str, Any], *,
                 cache: ReportCache | None = None, refresh: bool = False,
                 resolver: Any = None) -> dict[str, Any]:
    """The report for ``domain``: from ``cache`` when fresh enough, else checked now."""
    try:
        domain = normalise_domain(domain)
    except InvalidName as exc:
        raise ValidationFailed("Invalid domain", {"domain": [str(exc)]}) from None
    max_age = float(config["DOMAIN_CHECK_CACHE"])
    report = None if (refresh or cache is None) else cache.get(domain, max_age)
    cached = report is not None
    if report is None:
        report = run_checks(
            session, domain, sending_ips=config["SENDING_IPS"],
            hostname=local_hostname(config["SMTP_HOSTNAME"]).lower(),
            resolver=resolver or make_resolver(config["DNS_SERVERS"], config["DNS_TIMEOUT"]))
        if cache is not None:
            cache.put(domain, report)
    age = int((utcnow() - report["checked_at"]).total_seconds())
    return {**report, "cached": cached, "age_seconds": age}
