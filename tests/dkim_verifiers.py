"""Verifying our DKIM signatures as receivers do, against keys in a ``LoopbackDns`` zone.

- dkimpy (the library that signs; its verifier with our resolver as ``dnsfunc``);
- Mail::DKIM (Debian's libmail-dkim-perl, an independent implementation), its resolver pointed
  at the loopback server. Debian 12's version (1.20230212) has no Ed25519: the Ed25519 tests
  probe for it and say so when it is missing.
- OpenDKIM's ``opendkim-testmsg`` (opendkim-tools; independent again, RSA and Ed25519). It can
  only ask the system resolver, on port 53: it runs in a private network and mount namespace
  (``unshare``) with its own /etc/resolv.conf and a copy of the zone served on that namespace's
  loopback. Nothing of the host's network or DNS set-up is touched. (It refuses a message
  without a Date: as a syntax error, RFC 5322 3.6; the listener adds one when missing.)

Each helper verifies one signature at a time: ``only_signature`` removes the other
DKIM-Signature fields (none signs another, RFC 6376 5.4), so "both" means each on its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dkim
import pytest

from tests.dns_server import LoopbackDns

ROOT = Path(__file__).resolve().parent.parent
_FIELD = re.compile(rb"^([^\s:]+):.*?\r\n(?![ \t])", re.DOTALL | re.MULTILINE)

PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1, tcp_timeout => 5,
    udp_timeout => 5));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\015?\012\z/\015\012/; $dkim->PRINT($_); }
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    print join(" ", $sig->domain, $sig->selector, $sig->result, $sig->result_detail), "\n";
}
"""


def header_fields(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return [m.group(0) for m in _FIELD.finditer(head)]


def only_signature(raw: bytes, index: int) -> bytes:
    """``raw`` keeping only its ``index``-th DKIM-Signature field."""
    seen, out = 0, []
    head, sep, body = raw.partition(b"\r\n\r\n")
    for field in header_fields(raw):
        if field.lower().startswith(b"dkim-signature:"):
            seen += 1
            if seen - 1 != index:
                continue
        out.append(field)
    return b"".join(out) + b"\r\n" + body


def signature_count(raw: bytes) -> int:
    return sum(1 for f in header_fields(raw) if f.lower().startswith(b"dkim-signature:"))


def dkimpy_verifies(raw: bytes, zone: LoopbackDns) -> list[bool]:
    """Per signature: does dkimpy's verifier accept it?"""
    return [dkim.verify(only_signature(raw, i), dnsfunc=zone.txt)
            for i in range(signature_count(raw))]


def need(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if not path:
        pytest.skip(f"{program} is not installed (Debian package {package}; .ci/run installs it "
                    "with apt when it can)")
    return path


def perl_results(raw: bytes, zone: LoopbackDns, algorithm: str = "rsa") -> list[str]:
    """Per signature: Mail::DKIM's result (pass, fail, invalid, ...) and its detail."""
    need("perl", "perl")
    probe = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Mail::DKIM is not installed (Debian package libmail-dkim-perl)")
    if algorithm == "ed25519" and subprocess.run(
            ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-e", "1"],
            capture_output=True).returncode != 0:
        pytest.skip("this Mail::DKIM cannot verify Ed25519 (RFC 8463; Debian 12 ships "
                    "1.20230212 without it); OpenDKIM and dkimpy verify Ed25519 in the other "
                    "tests")
    results = []
    for i in range(signature_count(raw)):
        done = subprocess.run(["perl", "-e", PERL_VERIFIER, str(zone.port)],
                              input=only_signature(raw, i), capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        results.append(done.stdout.decode().strip())
    return results


def opendkim_results(raw: bytes, zone: LoopbackDns) -> list[tuple[bool, str]]:
    """Per signature: (verified, opendkim-testmsg's complaint), in a private namespace."""
    testmsg = need("opendkim-testmsg", "opendkim-tools")
    need("unshare", "util-linux")
    results = []
    with tempfile.TemporaryDirectory(prefix="elemta-opendkim-") as tmp:
        work = Path(tmp)
        (work / "zone.json").write_text(json.dumps(zone.dump()))
        (work / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
        script = (
            'ip link set lo up 2>/dev/null; mount --bind "$1/resolv.conf" /etc/resolv.conf '
            "|| exit 97\n"
            f'"{sys.executable}" -m tests.dns_server "$1/zone.json" 53 "$1/ready" &\n'
            "server=$!\n"
            'for i in $(seq 1 400); do [ -e "$1/ready" ] && break; sleep 0.05; done\n'
            '[ -e "$1/ready" ] || { kill $server; exit 98; }\n'
            f'"{testmsg}" < "$1/message"; status=$?\n'
            "kill $server; exit $status\n")
        for i in range(signature_count(raw)):
            (work / "message").write_bytes(only_signature(raw, i))
            (work / "ready").unlink(missing_ok=True)
            done = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script, "sh",
                                   str(work)], capture_output=True, timeout=60, cwd=ROOT)
            if done.returncode in (97, 98):
                pytest.skip("cannot run opendkim-testmsg in a private network namespace here: "
                            + done.stderr.decode(errors="replace")[-300:])
            results.append((done.returncode == 0,
                            (done.stdout + done.stderr).decode("utf-8", "replace").strip()))
    return results
