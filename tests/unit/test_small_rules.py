"""Small rules every area leans on: uptime wording, log levels, timestamps, settings, addresses."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging

import pytest

from app import serves_http
from app.config import ConfigError, parse_host_port, retry_schedule
from app.health.service import format_uptime
from app.logs.levels import canonical_levelno, level_name, levelno_of
from app.smtpd.policy import address_problem, client_ip, in_networks
from app.timeutil import isoformat_z, parse_iso

UTC = dt.UTC


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 seconds"), (-5, "0 seconds"), (0.9, "0 seconds"), (1, "1 second"),
    (303, "5 minutes, 3 seconds"), (3600, "1 hour"), (86400, "1 day"),
    (2 * 86400 + 3 * 3600 + 59, "2 days, 3 hours"), (86400 + 60, "1 day, 1 minute"),
])
def test_uptime_wording(seconds, text):
    assert format_uptime(seconds) == text


@pytest.mark.parametrize(("name", "levelno"), [
    ("debug", logging.DEBUG), ("INFO", logging.INFO), (" warn ", logging.WARNING),
    ("warning", logging.WARNING), ("error", logging.ERROR), ("fatal", logging.CRITICAL),
    ("critical", logging.CRITICAL),
])
def test_level_names_and_aliases(name, levelno):
    assert levelno_of(name) == levelno


def test_unknown_level_is_refused():
    with pytest.raises(ValueError):
        levelno_of("verbose")


@pytest.mark.parametrize(("levelno", "name"), [
    (1, "debug"), (logging.DEBUG, "debug"), (15, "debug"), (logging.INFO, "info"),
    (logging.WARNING + 1, "warn"), (logging.ERROR, "error"), (99, "fatal"),
])
def test_any_level_number_maps_to_an_api_level(levelno, name):
    assert level_name(levelno) == name
    assert canonical_levelno(levelno) == levelno_of(name)


@pytest.mark.parametrize(("text", "instant"), [
    ("2026-01-28T12:00:00Z", dt.datetime(2026, 1, 28, 12, tzinfo=UTC)),
    ("2026-01-28t12:00:00z", dt.datetime(2026, 1, 28, 12, tzinfo=UTC)),
    ("2026-01-28T12:00:00", dt.datetime(2026, 1, 28, 12, tzinfo=UTC)),  # naive: UTC
    ("2026-01-28T14:00:00+02:00", dt.datetime(2026, 1, 28, 12, tzinfo=UTC)),
])
def test_parse_iso(text, instant):
    assert parse_iso(text) == instant


@pytest.mark.parametrize("text", ["yesterday", "", "0001-01-01T00:00:00+05:00"])
def test_parse_iso_refuses_what_is_no_instant(text):
    with pytest.raises(ValueError):
        parse_iso(text)


def test_timestamps_are_utc_seconds_with_z():
    moment = dt.datetime(2026, 1, 28, 14, 0, 5, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert isoformat_z(moment) == "2026-01-28T12:00:05Z"
    assert isoformat_z(None) is None


def test_retry_schedule_setting():
    assert retry_schedule("RETRY_SCHEDULE", " 60, 300 ,,900") == [60, 300, 900]
    for bad in ("", "60,0", "60,soon", ","):
        with pytest.raises(ConfigError, match="ELEMTA_RETRY_SCHEDULE"):
            retry_schedule("RETRY_SCHEDULE", bad)


@pytest.mark.parametrize(("value", "parsed"), [
    ("mx.example.com", ("mx.example.com", 25)), ("mx.example.com:587", ("mx.example.com", 587)),
    ("[2001:db8::1]:2525", ("2001:db8::1", 2525)), ("192.0.2.1", ("192.0.2.1", 25)),
])
def test_host_port(value, parsed):
    assert parse_host_port(value, 25) == parsed


@pytest.mark.parametrize("value", ["host:notaport", "host:0", "host:70000", ":25"])
def test_host_port_refused(value):
    with pytest.raises(ValueError):
        parse_host_port(value, 25)


def test_client_ip_unmaps_and_drops_the_scope():
    assert client_ip(("::ffff:192.0.2.7", 25, 0, 0)) == ipaddress.ip_address("192.0.2.7")
    assert client_ip(("fe80::1%eth0", 25)) == ipaddress.ip_address("fe80::1")
    assert client_ip("not an ip") is None
    assert client_ip(None) is None


def test_relay_networks():
    nets = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert in_networks(ipaddress.ip_address("127.1.2.3"), nets)
    assert in_networks(ipaddress.ip_address("::1"), nets)
    assert not in_networks(ipaddress.ip_address("192.0.2.1"), nets)
    assert not in_networks(None, nets)


@pytest.mark.parametrize(("address", "is_sender", "smtputf8", "problem"), [
    ("", True, False, None),  # the null sender of bounces
    ("", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("bob@example.net", False, False, None),
    ("bob", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("@example.net", True, False, "501 5.1.7 Bad sender address syntax"),
    ("bob@example..net", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("bob@.example.net", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("b\x85ob@example.net", False, True, "501 5.1.3 Bad recipient address syntax"),
    ("bob@[192.0.2.1", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("x" * 65 + "@example.net", False, False, "501 5.1.3 Bad recipient address syntax"),
    ("jörg@example.net", False, False, "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
    ("jörg@example.net", False, True, None),
    ("bob\udcff@example.net", True, True, "553 5.1.7 Address is not valid UTF-8"),
])
def test_envelope_addresses(address, is_sender, smtputf8, problem):
    assert address_problem(address, is_sender=is_sender, smtputf8=smtputf8) == problem


@pytest.mark.parametrize(("argv", "serve"), [
    (["worker"], False), (["worker", "--once"], False), (["smtpd", "--listen", ":2525"], False),
    (["webhook", "dispatch"], False), (["--app", "wsgi.py", "worker"], False),
    (["-e", "x.env", "smtpd"], False),
    (["webhook", "list"], True), (["webhook"], True), (["queue", "stats"], True),
    (["db", "upgrade"], True), (["routes"], True), ([], True), (["--help"], True),
    (["--app", "worker"], True),  # "worker" is the --app value here: in doubt, the whole app
    (["-c", "gunicorn.conf.py", "wsgi:app"], True),
])
def test_only_the_services_that_answer_no_http_get_the_app_without_its_http_side(argv, serve):
    assert serves_http(argv) is serve
