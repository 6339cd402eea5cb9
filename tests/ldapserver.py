"""A real OpenLDAP server (Debian's `slapd`) for tests and the benchmark.

`running_slapd` writes a slapd.conf into a temporary directory (mdb database, the core,
cosine, inetorgperson and nis schemas, the memberof overlay), starts slapd in the foreground
on a free loopback port (or another address, inside a network namespace: a lab's control
plane), waits until it answers, and always stops it (and removes nothing the caller did not
give it: the directory lives under the caller's temporary path). Entries are added and
changed with the real `ldapadd`/`ldapmodify` from ldap-utils. `stop` and `start` again
keep the data: a directory outage and its end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "slapd-test-Kp3nW8qZ"  # a throwaway test directory's password
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Slapd:
    url: str
    port: int
    workdir: Path
    conf: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path, Path] | None = None  # ca, cert, key
    ldaps_port: int | None = None  # with tls: ldaps:// on this port too
    host: str = "127.0.0.1"  # the address slapd listens on (the caller must reach it)
    netns: str | None = None  # run slapd in this network namespace

    @property
    def ldaps_url(self) -> str:
        assert self.ldaps_port is not None, "started without TLS"
        return f"ldaps://{self.host}:{self.ldaps_port}"

    def ldapadd(self, ldif: str) -> None:
        _ldap_tool("ldapadd", self.url, ldif)

    def ldapmodify(self, ldif: str) -> None:
        _ldap_tool("ldapmodify", self.url, ldif)

    def start(self) -> None:
        urls = self.url + (f" {self.ldaps_url}" if self.ldaps_port else "")
        self.proc = subprocess.Popen(
            [
                *(["ip", "netns", "exec", self.netns] if self.netns else []),
                *(SLAPD, "-f", str(self.conf), "-h", urls, "-d", "0"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"slapd exited with {self.proc.returncode}: {err[-2000:]}")
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("slapd did not listen within 20 s")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _ldap_tool(tool: str, url: str, ldif: str) -> None:
    res = subprocess.run(
        [tool, "-x", "-H", url, "-D", ROOT_DN, "-w", ROOT_PW],
        input=ldif.encode(),
        capture_output=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")


CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
{tls}
database mdb
maxsize 1073741824
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {dir}/data
index objectClass eq
index uid eq
index member eq
overlay memberof
"""

BASE_LDIF = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: {GROUPS}
objectClass: organizationalUnit
ou: groups
"""


@contextmanager
def running_slapd(
    workdir: Path,
    tls: tuple[Path, Path, Path] | None = None,
    *,
    host: str = "127.0.0.1",
    netns: str | None = None,
) -> Iterator[Slapd]:
    """A started slapd with the base entries (suffix, ou=people, ou=groups); stopped on exit.

    With `tls` (CA, certificate, key files) it also offers StartTLS on the same port and
    ldaps:// on another (`ldaps_url`). `netns`: run it in that network namespace (a lab's
    control-plane namespace), listening on `host`, one of its addresses the test can reach
    (the ports are picked free on the host: a namespace the test just made uses none)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    port = _free_port()
    tls_lines = ""
    if tls:
        ca, cert, key = tls
        tls_lines = (
            f"TLSCACertificateFile {ca}\nTLSCertificateFile {cert}\nTLSCertificateKeyFile {key}"
        )
    conf = workdir / "slapd.conf"
    conf.write_text(
        CONF.format(dir=workdir, suffix=SUFFIX, rootdn=ROOT_DN, rootpw=ROOT_PW, tls=tls_lines)
    )
    srv = Slapd(
        url=f"ldap://{host}:{port}",
        port=port,
        workdir=workdir,
        conf=conf,
        tls=tls,
        ldaps_port=_free_port() if tls else None,
        host=host,
        netns=netns,
    )
    srv.start()
    try:
        srv.ldapadd(BASE_LDIF)
        yield srv
    finally:
        srv.stop()


def person(uid: str, *, mail: str | None = None, employee_type: str | None = None) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {uid.title()}",
        f"sn: {uid.title()}",
    ]
    if mail:
        lines.append(f"mail: {mail}")
    if employee_type:
        lines.append(f"employeeType: {employee_type}")
    return "\n".join(lines) + "\n"


def group(cn: str, member_dns: list[str]) -> str:
    lines = [f"dn: cn={cn},{GROUPS}", "objectClass: groupOfNames", f"cn: {cn}"]
    # groupOfNames needs a member: an empty group holds the suffix, which is no user.
    lines += [f"member: {dn}" for dn in (member_dns or [SUFFIX])]
    return "\n".join(lines) + "\n"


def user_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE}"


def group_dn(cn: str) -> str:
    return f"cn={cn},{GROUPS}"
