"""A private Postfix instance for the side-by-side benchmark (``bench/suite_postfix.py``).

Everything lives under a temporary directory: ``main.cf``/``master.cf`` (``postfix -c DIR``),
the queue, the data directory and the log file. It listens on one loopback port, relays
everything to ``[127.0.0.1]:SINK`` and changes nothing in the system's own mail setup
(``/etc/postfix`` is only read for ``master.cf``'s service list). Mail it accepts is put on
hold (``check_client_access static:HOLD``) so intake is measured alone, as Elemta's listener
is measured without its worker; ``release`` hands the held mail to the queue manager.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

POSTFIX = "/usr/sbin/postfix"
POSTSUPER = "/usr/sbin/postsuper"
POSTQUEUE = "/usr/sbin/postqueue"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")


def unavailable() -> str | None:
    """Why Postfix cannot be used here, or None. Installs Debian's packages when root + apt."""
    missing = [p for p in (POSTFIX, SMTP_SOURCE, SMTP_SINK) if not os.access(p, os.X_OK)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # No system instance is configured or started by this: "No configuration" keeps
        # the package's postinst from writing /etc/postfix/main.cf.
        subprocess.run(["sh", "-c", "echo 'postfix postfix/main_mailer_type select No "
                        "configuration' | debconf-set-selections"], env=env,
                       capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], env=env,
                       capture_output=True)
        missing = [p for p in (POSTFIX, SMTP_SOURCE, SMTP_SINK) if not os.access(p, os.X_OK)]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian package postfix; needs root + apt)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (postfix -c DIR start)"
    try:
        import pwd
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' system user"
    return None


def _master_cf(smtp_port: int) -> str:
    """Debian's service list, chroot off (nothing prepared under the private queue), the
    ``smtp inet`` service on our loopback port."""
    lines = []
    with open("/etc/postfix/master.cf") as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace():  # -o options of the previous service
                lines.append(line.rstrip("\n"))
                continue
            fields = line.split()
            if fields[:2] == ["smtp", "inet"]:
                fields[0] = f"127.0.0.1:{smtp_port}"
            if fields[1] in ("inet", "unix", "fifo", "unix-dgram", "pass") and len(fields) > 4:
                fields[4] = "n"
            if fields[7:8] == ["pipe"] or fields[7:8] == []:  # maildrop, uucp ...: not needed
                lines.append("#" + line.rstrip("\n"))
                continue
            lines.append(" ".join(fields))
    # Drop continuation lines of commented-out pipe services.
    out, skipping = [], False
    for line in lines:
        if line.startswith("#"):
            skipping = True
            continue
        if line[0].isspace() and skipping:
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


class PostfixInstance:
    def __init__(self, smtp_port: int, relay_port: int) -> None:
        self.smtp_port = smtp_port
        self.relay_port = relay_port
        self.root = tempfile.mkdtemp(prefix="elemta-bench-postfix-")
        os.chmod(self.root, 0o755)
        self.config = os.path.join(self.root, "etc")
        self.queue = os.path.join(self.root, "queue")
        os.makedirs(self.config)
        os.makedirs(self.queue, mode=0o755)  # postfix start makes the rest of the tree
        data = os.path.join(self.root, "data")
        os.makedirs(data)
        shutil.chown(data, "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix-bench.localdomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "check_client_access static:HOLD",
            "message_size_limit": "30000000",
            "smtp_host_lookup": "native",
            "maillog_file": os.path.join(self.root, "maillog"),
            "maillog_file_prefixes": self.root,
            "biff": "no",
            "smtputf8_enable": "no",
        }
        with open(os.path.join(self.config, "main.cf"), "w") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in main.items())
        with open(os.path.join(self.config, "master.cf"), "w") as fh:
            fh.write(_master_cf(smtp_port))

    def _postfix(self, *args: str) -> None:
        done = subprocess.run([POSTFIX, "-c", self.config, *args], capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"postfix {' '.join(args)}: {done.stderr.strip()} "
                               f"{self.log_tail()}")

    def start(self) -> None:
        self._postfix("start")  # creates the queue tree with its owners and modes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.master_pid() and _listening(self.smtp_port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not start; see {self.root}/maillog")

    def stop(self) -> None:
        try:
            if self.master_pid():
                self._postfix("stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "maillog")) as fh:
                return fh.read()[-600:]
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as fh:
                return int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queued(self, queues: tuple[str, ...] = QUEUES) -> int:
        count = 0
        for name in queues:
            for _dir, _sub, files in os.walk(os.path.join(self.queue, name)):
                count += len(files)
        return count

    def release(self) -> None:
        """Held mail to the deferred queue, then a flush: the queue manager takes it now."""
        subprocess.run([POSTSUPER, "-c", self.config, "-H", "ALL"], check=True,
                       capture_output=True)
        subprocess.run([POSTQUEUE, "-c", self.config, "-f"], check=True, capture_output=True)

    def purge(self) -> None:
        subprocess.run([POSTSUPER, "-c", self.config, "-d", "ALL"], check=True,
                       capture_output=True)

    def pids(self) -> list[int]:
        """The master and its children (smtpd, cleanup, qmgr, smtp, ...)."""
        master = self.master_pid()
        return [master] + children(master) if master else []


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (from ``/proc/PID/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    return parents


def children(pid: int) -> list[int]:
    return children_by_parent().get(pid, [])


def _listening(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
