"""Several listener processes on one port (ELEMTA_SMTPD_PROCESSES, app/smtpd/processes.py):
``flask smtpd`` run as in production, on this test's database, real SMTP on loopback.

Which process takes a connection is the kernel's and the event loops' business; where a test
needs a given process to take one, it stops the others (SIGSTOP) while it connects.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from app.smtpd.server import AUTO_PROCESSES_MAX, ListenerSettings, resolve_processes
from tests.smtpd_helpers import (
    ProxiedSMTP,
    crlf,
    email_message,
    free_port,
    make_certificate,
    port_is_free,
    queued_id,
    raw_of,
    stored,
)
from tests.test_smtpd_admission import open_from
from tests.test_smtpd_policy import api_key

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
# A safety net for a broken start or stop, not a measurement.
PATIENCE = 120.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def _env(database_url: str, values: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    env.update(FLASK_APP="wsgi.py", ELEMTA_DATABASE_URL=database_url,
               ELEMTA_LOG_TO_DATABASE="false", ELEMTA_LOG_FORMAT="text",
               ELEMTA_SMTP_HOSTNAME="mx.test.example")
    env.update({f"ELEMTA_{k.upper()}": str(v) for k, v in values.items()})
    return env


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
                if int(ppid) == pid and state != "Z":  # a zombie: dead, not yet reaped
                    found.append(int(entry))
            except (OSError, ValueError):
                pass
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Smtpd:
    """``flask smtpd`` in its own process; ``children`` are its listener processes."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, output: Path) -> None:
        self.process = process
        self.port = port
        self.output = output

    @property
    def text(self) -> str:
        return self.output.read_text()

    @property
    def children(self) -> list[int]:
        return children_of(self.process.pid)

    def wait_for(self, condition, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + PATIENCE
        while not condition():
            assert self.process.poll() is None, self.text
            assert time.monotonic() < deadline, f"{what}:\n{self.text}"
            time.sleep(0.1)

    @contextmanager
    def only(self, pid: int) -> Iterator[None]:
        """Every listener process but ``pid`` stopped (SIGSTOP) meanwhile."""
        others = [p for p in self.children if p != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            yield
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=PATIENCE)


@contextmanager
def smtpd(database_url: str, tmp_path: Path, **values: object) -> Iterator[Smtpd]:
    values.setdefault("smtpd_processes", 2)
    port = free_port()
    output = tmp_path / f"smtpd-{port}.log"
    with open(output, "wb") as sink:
        process = subprocess.Popen([FLASK, "smtpd", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                                   env=_env(database_url, {k: str(v) for k, v in values.items()}),
                                   stdout=sink, stderr=subprocess.STDOUT)
    server = Smtpd(process, port, output)
    try:
        server.wait_for(lambda: "smtpd: listening on" in server.text, "never listened")
        yield server
    finally:
        if process.poll() is None:
            for child in server.children:
                os.kill(child, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def send_one(port: int, client_class: type[smtplib.SMTP] = smtplib.SMTP) -> str:
    with client_class("127.0.0.1", port, timeout=PATIENCE) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        code, reply = client.data(crlf(email_message()))
    assert code == 250, reply
    return queued_id(reply)


def greeting(port: int, stack: ExitStack, source: str = "127.0.0.1") -> bytes:
    return open_from(port, source, stack)[1]


# ------------------------------------------------------------------ the setting


def test_the_setting_auto_and_one(app):
    assert ListenerSettings.from_config(app.config).processes == resolve_processes("auto")
    cpus = len(os.sched_getaffinity(0))
    assert resolve_processes("auto") == max(1, min(cpus // 2, AUTO_PROCESSES_MAX))
    assert resolve_processes(1) == 1 and resolve_processes(3) == 3
    settings = ListenerSettings.from_config({**app.config, "SMTPD_PROCESSES": 1})
    assert settings.processes == 1


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_a_bad_setting_is_one_line(database_url, value):
    done = subprocess.run([FLASK, "smtpd", "--listen", f"127.0.0.1:{free_port()}"], cwd=ROOT,
                          env=_env(database_url, {"SMTPD_PROCESSES": value}),
                          capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 2
    assert done.stderr == (f"Error: ELEMTA_SMTPD_PROCESSES: {value!r} must be auto or a whole "
                           "number from 1 to 64\n")


def test_a_busy_port_is_one_line_before_any_process_starts(database_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([FLASK, "smtpd", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                              env=_env(database_url, {"SMTPD_PROCESSES": "2"}),
                              capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 1
    assert done.stderr == f"Error: Cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert "listening" not in done.stdout + done.stderr


# ------------------------------------------------------------------ serving


def test_every_process_accepts_and_commits_before_its_250(app, database_url, tmp_path):
    with smtpd(database_url, tmp_path) as server:
        children = server.children
        assert len(children) == 2
        ids = []
        for child in children:
            with server.only(child):
                ids.append(send_one(server.port))  # 250 only after the commit: stored now
                assert ids[-1] in {m.id for m in stored(app)["messages"]}
        ids.append(send_one(server.port))
        assert server.stop() == 0
    text = server.output.read_text()
    assert {f"(pid {child})" in text for child in children} == {True}
    assert sorted(m.id for m in stored(app)["messages"]) == sorted(ids)


def test_starttls_auth_and_proxy_in_every_process(fresh_app, database_url, tmp_path,
                                                  certificate):
    cert, key_file = certificate
    app = fresh_app()
    key = api_key(app)
    context = ssl.create_default_context(cafile=cert)
    with smtpd(database_url, tmp_path, tls_cert=cert, tls_key=key_file,
               relay_networks="203.0.113.0/24", smtpd_proxy_protocol="true") as server:
        for child in server.children:
            with server.only(child), ProxiedSMTP("127.0.0.1", server.port,
                                                 timeout=PATIENCE) as client:
                client.ehlo("remote.example")
                assert not client.has_extn("auth")  # a remote client: TLS first
                assert client.starttls(context=context)[0] == 220
                client.ehlo("remote.example")
                client.login("mailer", key)
                client.mail("alice@example.com")
                client.rcpt("bob@example.net")
                code, reply = client.data(crlf(email_message()))
            assert code == 250
            assert b"with ESMTPSA" in raw_of(app, queued_id(reply))
            with server.only(child):  # the client named by the PROXY header
                raw = raw_of(app, send_one(server.port, ProxiedSMTP))
            assert raw.startswith(b"Received: from client.example ([203.0.113.7])")


# ------------------------------------------------------------------ limits across processes


def test_the_session_cap_counts_every_process(app, database_url, tmp_path):
    with smtpd(database_url, tmp_path, smtpd_max_sessions=2) as server, ExitStack() as stack:
        first, second = server.children
        with server.only(first):
            assert greeting(server.port, stack).startswith(b"220 ")
        with server.only(second):
            assert greeting(server.port, stack).startswith(b"220 ")
        # One session in each process: the third is over the cap, whichever takes it.
        for child in (first, second):
            with server.only(child), ExitStack() as more:
                assert greeting(server.port, more).startswith(b"421 4.3.2 ")
        stack.close()  # both sessions end
        with ExitStack() as more:
            server.wait_for(lambda: greeting(server.port, more).startswith(b"220 "),
                            "the ended sessions were not given back")


def test_per_client_limits_count_every_process(fresh_app, database_url, tmp_path):
    fresh_app()
    with smtpd(database_url, tmp_path, relay_networks="192.0.2.0/24",
               smtpd_client_connection_count_limit=2) as server, ExitStack() as stack:
        first, second = server.children
        with server.only(first):
            assert greeting(server.port, stack, "127.0.0.2").startswith(b"220 ")
        with server.only(second):
            assert greeting(server.port, stack, "127.0.0.2").startswith(b"220 ")
        for child in (first, second):
            with server.only(child), ExitStack() as more:
                assert greeting(server.port, more, "127.0.0.2").startswith(
                    b"421 4.7.0 Too many connections from 127.0.0.2")
        assert greeting(server.port, stack, "127.0.0.3").startswith(b"220 ")  # another client


def test_a_killed_process_is_replaced_and_its_sessions_released(app, database_url, tmp_path):
    with smtpd(database_url, tmp_path, smtpd_max_sessions=2) as server, ExitStack() as stack:
        first, second = server.children
        with server.only(first):
            assert greeting(server.port, stack).startswith(b"220 ")
            assert greeting(server.port, stack).startswith(b"220 ")
        with ExitStack() as more:
            assert greeting(server.port, more).startswith(b"421 4.3.2 ")
        os.kill(first, signal.SIGKILL)
        def replaced() -> bool:
            children = server.children  # once: it changes between two reads
            return len(children) == 2 and first not in children

        server.wait_for(replaced, "the killed process was not replaced")
        assert f"(pid {first}) was killed by signal 9 (SIGKILL); 2 of its sessions " \
               "released" in server.text
        replacement = next((p for p in server.children if p != second), None)
        assert replacement is not None, server.text
        with server.only(replacement):
            send_one(server.port)  # the replacement serves, the slots are free again
        with server.only(second):
            send_one(server.port)
        assert server.stop() == 0
    assert len(stored(app)["messages"]) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_leaves_no_process_and_no_port(app, database_url, tmp_path, signum):
    with smtpd(database_url, tmp_path) as server, ExitStack() as stack:
        children = server.children
        held = smtplib.SMTP("127.0.0.1", server.port, timeout=PATIENCE)
        stack.callback(held.close)
        held.ehlo("client.example")
        assert server.stop(signum) == 0
        assert not any(alive(child) for child in children)
        assert port_is_free(server.port)
        try:  # told 421 and closed
            code = held.noop()[0]
        except smtplib.SMTPServerDisconnected:
            code = 421
        assert code == 421
    assert server.text.count("SMTP listener stopped") == 3


def test_the_listeners_stop_when_their_parent_is_killed(app, database_url, tmp_path):
    with smtpd(database_url, tmp_path) as server:
        children = server.children
        server.stop(signal.SIGKILL)
        deadline = time.monotonic() + PATIENCE
        while any(alive(child) for child in children) or not port_is_free(server.port):
            assert time.monotonic() < deadline, "the listeners outlived their parent"
            time.sleep(0.1)
