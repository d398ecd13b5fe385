"""A private Postfix on loopback (Debian's package) for interoperability tests.

Its own configuration and queue directories in a temporary directory (``postfix -c DIR``), an
SMTP server on a loopback port, relaying everything to a given loopback port: nothing of the
system's mail set-up is read or changed. Skipped with the reason when Postfix is not installed
(.ci/run installs it with apt, debconf preseeded to "No configuration").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.smtpd_helpers import free_port

POSTFIX = "/usr/sbin/postfix"
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """``with PrivatePostfix(relay_port) as postfix:`` mail to ``postfix.port`` goes on to
    127.0.0.1:``relay_port``."""

    def __init__(self, relay_port: int) -> None:
        if not os.path.exists(POSTFIX) or shutil.which("postconf") is None:
            pytest.skip("Postfix is not installed (Debian package postfix)")
        if os.geteuid() != 0:
            pytest.skip("a private Postfix instance needs root (postfix -c DIR start)")
        self.port = free_port()
        # Not under pytest's 0700 tmp_path: the postfix user must reach the queue directory.
        self.root = Path(tempfile.mkdtemp(prefix="elemta-postfix-"))
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.config.mkdir()
        (self.root / "queue").mkdir(mode=0o755)  # Postfix makes its subdirectories itself
        (self.root / "data").mkdir(mode=0o700)
        shutil.chown(self.root / "data", "postfix", "postfix")
        self.log = self.root / "postfix.log"
        (self.config / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.config / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.root / 'queue'}",
            f"data_directory = {self.root / 'data'}",
            f"maillog_file = {self.log}",
            f"maillog_file_prefixes = {self.root}",  # the default allows only /var and stdout
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = postfix.test.example",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [127.0.0.1]:{relay_port}",
            "smtp_tls_security_level = none",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "smtputf8_enable = no",
            "",
        ]))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config), *args], capture_output=True,
                              text=True, timeout=60)

    def __enter__(self) -> PrivatePostfix:
        started = self._postfix("start")
        if started.returncode != 0:
            self._cleanup()
            pytest.fail(f"postfix start failed: {started.stdout}{started.stderr}")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __exit__(self, *exc: object) -> None:
        self._postfix("stop")
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
