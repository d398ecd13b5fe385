"""The domain check against a DNS server on loopback: good, missing and broken records."""

from __future__ import annotations

import pytest

from app.dkim import keys as dkim_keys
from app.extensions import db
from tests.dns_server import LoopbackDns

SENDING_IP = "192.0.2.10"
HOSTNAME = "mta.example.com"


@pytest.fixture
def zone():
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def checked(make_app, app, zone):
    """``checked(domain) -> {item name: item}`` through the API, DNS asked each time."""
    api_app = make_app(dns_servers=f"127.0.0.1:{zone.port}", sending_ips=SENDING_IP,
                       smtp_hostname=HOSTNAME)
    client = api_app.test_client()

    def check(domain="example.com"):
        response = client.get(f"/api/domains/{domain}/check?refresh=true")
        assert response.status_code == 200, response.get_json()
        report = response.get_json()
        return {item["name"]: item for item in report["checks"]} | {"report": report}

    return check


def key_for(app, zone, domain="example.com", publish=True, algorithm="rsa"):
    with app.app_context():
        key = dkim_keys.create_key(db.session, domain, None, algorithm)
        record = dkim_keys.dns_record(key)
        db.session.remove()
    if publish:
        zone.add(record.name, "TXT", record.value)
    return record


def good_zone(app, zone):
    key_for(app, zone)
    zone.add("example.com", "TXT", f"v=spf1 ip4:{SENDING_IP} -all")
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    zone.add("example.com", "MX", "10 mx.example.com")
    zone.add("mx.example.com", "A", "192.0.2.20")
    zone.add("10.2.0.192.in-addr.arpa", "PTR", HOSTNAME)
    zone.add(HOSTNAME, "A", SENDING_IP)
    zone.add("_mta-sts.example.com", "TXT", "v=STSv1; id=2026010101")


def test_a_well_configured_domain_passes_everything(app, zone, checked):
    good_zone(app, zone)
    items = checked()
    assert {name: item["status"] for name, item in items.items() if name != "report"} == {
        "spf": "pass", "dkim": "pass", "dmarc": "pass", "mx": "pass", "fcrdns": "pass",
        "mta_sts": "pass"}
    report = items["report"]
    assert report["status"] == "pass" and report["cached"] is False
    assert report["sending_ips"] == [SENDING_IP] and report["hostname"] == HOSTNAME
    assert items["spf"]["found"] == [f"v=spf1 ip4:{SENDING_IP} -all"]
    assert all(item["publish"] == [] for name, item in items.items() if name != "report")


def test_missing_records_fail_with_the_exact_records_to_publish(app, zone, checked):
    zone.add("example.com", "A", "192.0.2.30")  # the domain exists, nothing else is published
    record = key_for(app, zone, publish=False)
    items = checked()
    assert items["report"]["status"] == "fail"
    assert items["spf"]["status"] == "fail"
    assert items["spf"]["publish"] == [{"name": "example.com", "type": "TXT",
                                        "value": f"v=spf1 ip4:{SENDING_IP} ~all"}]
    assert items["dkim"]["status"] == "fail"
    assert items["dkim"]["publish"] == [{"name": record.name, "type": "TXT",
                                         "value": record.value}]
    assert items["dmarc"]["status"] == "fail"
    assert items["dmarc"]["publish"][0]["name"] == "_dmarc.example.com"
    assert items["dmarc"]["publish"][0]["value"].startswith("v=DMARC1; p=none")
    assert items["mx"]["status"] == "warn"  # implicit MX: the A record
    assert items["fcrdns"]["status"] == "fail"
    assert {r["type"] for r in items["fcrdns"]["publish"]} == {"PTR", "A"}
    assert items["mta_sts"]["status"] == "warn"


def test_a_domain_without_any_key_is_told_how_to_make_one(checked, zone):
    zone.add("example.org", "TXT", f"v=spf1 ip4:{SENDING_IP} -all")
    item = checked("example.org")["dkim"]
    assert item["status"] == "fail"
    assert "flask dkim create --domain example.org" in item["summary"]


def test_broken_records_fail_and_say_why(app, zone, checked):
    good_zone(app, zone)
    zone.remove("example.com", "TXT")
    zone.add("example.com", "TXT", "v=spf1 ip4:198.51.100.1 -all")  # not our address
    zone.remove("_dmarc.example.com")
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=maybe")
    [dkim_record] = [n for n in zone.dump() if "._domainkey." in n]
    zone.remove(dkim_record)
    zone.add(dkim_record, "TXT", "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"
                                 "wrongwrongwrong")
    zone.remove("example.com", "MX")
    zone.add("example.com", "MX", "0 .")
    items = checked()
    assert items["spf"]["status"] == "fail"
    assert SENDING_IP in items["spf"]["summary"]
    assert items["spf"]["publish"][0]["value"] == (
        f"v=spf1 ip4:{SENDING_IP} ip4:198.51.100.1 -all")
    assert items["dkim"]["status"] == "fail"
    assert "not this key" in " ".join(items["dkim"]["details"])
    assert items["dmarc"]["status"] == "fail" and "broken" in items["dmarc"]["summary"]
    assert items["mx"]["status"] == "fail" and "null MX" in items["mx"]["summary"]


def test_two_spf_records_and_a_monitoring_dmarc(app, zone, checked):
    good_zone(app, zone)
    zone.add("example.com", "TXT", "v=spf1 include:_spf.google.com ~all")
    zone.remove("_dmarc.example.com")
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    items = checked()
    assert items["spf"]["status"] == "fail" and "more than one" in items["spf"]["summary"]
    assert items["dmarc"]["status"] == "warn" and "p=none" in items["dmarc"]["summary"]


def test_dmarc_of_the_parent_covers_a_subdomain_signed_by_the_parent_key(app, zone, checked):
    good_zone(app, zone)
    zone.add("news.example.com", "TXT", f"v=spf1 ip4:{SENDING_IP} -all")
    zone.add("news.example.com", "MX", "10 mx.example.com")
    items = checked("news.example.com")
    assert items["dkim"]["status"] == "pass" and "d=example.com" in items["dkim"]["summary"]
    assert items["dmarc"]["status"] == "pass"
    assert any("_dmarc.example.com" in line for line in items["dmarc"]["details"])


def test_the_report_is_cached_and_says_its_age(make_app, app, zone):
    good_zone(app, zone)
    client = make_app(dns_servers=f"127.0.0.1:{zone.port}", sending_ips=SENDING_IP,
                      smtp_hostname=HOSTNAME).test_client()
    first = client.get("/api/domains/example.com/check").get_json()
    zone.remove("_dmarc.example.com")
    second = client.get("/api/domains/example.com/check").get_json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["checked_at"] == first["checked_at"] and second["age_seconds"] >= 0
    fresh = client.get("/api/domains/example.com/check?refresh=true").get_json()
    assert fresh["cached"] is False and fresh["status"] == "fail"


def test_a_bad_domain_is_a_validation_error(client):
    response = client.get("/api/domains/not_a..domain/check")
    assert response.status_code == 400
    assert response.get_json()["code"] == "VALIDATION_ERROR"


def test_flask_domain_check_tells_the_operator_what_to_fix(make_app, app, zone):
    zone.add("example.com", "A", "192.0.2.30")
    key_for(app, zone, publish=False)
    cli_app = make_app(dns_servers=f"127.0.0.1:{zone.port}", sending_ips=SENDING_IP,
                       smtp_hostname=HOSTNAME)
    result = cli_app.test_cli_runner().invoke(args=["domain", "check", "example.com"])
    assert result.exit_code == 0, result.output
    assert "Domain check for example.com: FAIL" in result.output
    assert f'publish: example.com. TXT "v=spf1 ip4:{SENDING_IP} ~all"' in result.output
    assert "publishes no DMARC record" in result.output
