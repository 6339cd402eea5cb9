"""Directory sync of 10,000 users in 500 groups against a real slapd: time and LDAP queries.

    .venv/bin/python bench/directory_sync.py [--users 10000] [--groups 500] [--rounds 3]
        [--db sqlite,postgresql] [--pg-url postgresql+psycopg://...]

A real OpenLDAP server (Debian's slapd, tests/ldapserver.py) on loopback is seeded with
ldapadd: `--users` people (each with uid, mail) and `--groups` groupOfNames; every user is a
direct member of two groups, and one group in ten also holds two other groups as members
(nesting, resolved client-side). Every group is mapped to a vpnfleet group.

Measured, for each database (a fresh SQLite file; on PostgreSQL a database created and
dropped through the test role, VPNFLEET_TEST_PG_URL), through the same code the API runs
(`directorysync.run_sync`, no HTTP):

- the baseline: `ldapsearch` (OpenLDAP's own C client, paged by 500) fetching the same user and
  group entries with the same attributes: the floor for reading this directory;
- reading and resolving the directory alone (`read_directory`): time and LDAP requests;
- the first sync (10,000 users created with a certificate each, memberships set);
- a sync with nothing to change (the steady state every interval);
- a sync after 1 % of the users were disabled in the directory (ldapmodify);
- creating `--import-users` users one by one through `users.create_user` (the admin API's
  path, which the first import used before) against the bulk `users.create_nat_users`, in
  the same database kind and run.

Prints each median over `--rounds` (the first sync runs once per database) and the read as a
ratio of the ldapsearch baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests import ldapserver as ldap
from vpnfleet.controlplane import directorysync
from vpnfleet.controlplane.app import prepare
from vpnfleet.controlplane.ldapsource import LdapConfig, read_directory
from vpnfleet.controlplane.models import Group
from vpnfleet.controlplane.schemas import DirectorySetIn
from vpnfleet.controlplane.services import directory as dirsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.settings import ServerSettings


def seed(srv: ldap.Slapd, n_users: int, n_groups: int) -> None:
    people = "\n".join(
        ldap.person(f"u{i:05d}", mail=f"u{i:05d}@example.test") for i in range(n_users)
    )
    srv.ldapadd(people)
    direct: dict[int, list[str]] = {g: [] for g in range(n_groups)}
    for i in range(n_users):
        direct[i % n_groups].append(ldap.user_dn(f"u{i:05d}"))
        direct[(i * 7 + 3) % n_groups].append(ldap.user_dn(f"u{i:05d}"))
    # Children first: a parent's member DNs must exist for the memberof overlay.
    parents = [g for g in range(n_groups) if g % 10 == 0]
    children = {g: [(g + 1) % n_groups, (g + 2) % n_groups] for g in parents}
    order = [g for g in range(n_groups) if g not in children] + parents
    srv.ldapadd(
        "\n".join(
            ldap.group(
                f"g{g:03d}",
                sorted(set(direct[g])) + [ldap.group_dn(f"g{c:03d}") for c in children.get(g, [])],
            )
            for g in order
        )
    )


def ldapsearch_baseline(srv: ldap.Slapd) -> float:
    t0 = time.perf_counter()
    for base, flt, attrs in (
        (ldap.PEOPLE, "(objectClass=inetOrgPerson)", ["uid", "mail", "employeeType"]),
        (ldap.GROUPS, "(objectClass=groupOfNames)", ["cn", "member"]),
    ):
        subprocess.run(
            ["ldapsearch", "-x", "-LLL", "-H", srv.url, "-D", ldap.ROOT_DN, "-w", ldap.ROOT_PW,
             "-E", "pr=500/noprompt", "-b", base, flt, *attrs],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return time.perf_counter() - t0


def pg_database(admin_url: str) -> tuple[str, str]:
    name = f"vfbench_{os.getpid()}"
    engine = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), name


def drop_pg(admin_url: str, name: str) -> None:
    engine = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def run_db(kind: str, srv: ldap.Slapd, args: argparse.Namespace, work: Path) -> dict[str, float]:
    pg_name = None
    if kind == "sqlite":
        url = f"sqlite:///{work / f'bench-{kind}.db'}"
    else:
        url, pg_name = pg_database(args.pg_url)
    try:
        settings = ServerSettings(
            data_dir=work / f"data-{kind}",
            database_url=url,
            secret="bench-seal-secret-Qx9LmPz4Rk8Vw2b7",
        )
        state = prepare(settings)
        body = DirectorySetIn(
            url=srv.url,
            bind_dn=ldap.ROOT_DN,
            bind_password=ldap.ROOT_PW,
            user_bases=[ldap.PEOPLE],
            group_bases=[ldap.GROUPS],
            group_map={f"g{g:03d}": f"g{g:03d}" for g in range(args.groups)},
            disabled_attribute="employeeType",
            disabled_value="disabled",
            enabled=False,
        )
        with state.factory() as db, db.begin():
            journal = Journal(db, directorysync.SYNC_ACTOR)
            dirsvc.set_config(db, journal, state.sealer, body)
            journal.commit()
        req = directorysync.SyncRequest(who=directorysync.SYNC_ACTOR)
        lease = settings.pod_lease

        t0 = time.perf_counter()
        first = directorysync.run_sync(state.factory, state.sealer, req, lease)
        out = {"first": time.perf_counter() - t0, "first_queries": first.queries}
        assert first.counts["users_created"] == args.users, first.counts
        steady, disabled, steady_read = [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            res = directorysync.run_sync(state.factory, state.sealer, req, lease)
            steady.append(time.perf_counter() - t0)
            steady_read.append(res.read_seconds)
            assert sum(res.counts.values()) == 0, res.counts
            # 1 % of the users disabled in the directory, then enabled again.
            picked = [f"u{i:05d}" for i in range(r, args.users, 100)]
            srv.ldapmodify(
                "\n".join(
                    f"dn: {ldap.user_dn(u)}\nchangetype: modify\nreplace: employeeType\n"
                    "employeeType: disabled\n"
                    for u in picked
                )
            )
            t0 = time.perf_counter()
            res = directorysync.run_sync(state.factory, state.sealer, req, lease)
            disabled.append(time.perf_counter() - t0)
            assert res.counts["users_disabled"] == len(picked), res.counts
            srv.ldapmodify(
                "\n".join(
                    f"dn: {ldap.user_dn(u)}\nchangetype: modify\ndelete: employeeType\n"
                    for u in picked
                )
            )
            directorysync.run_sync(state.factory, state.sealer, req, lease)
        out["steady"] = statistics.median(steady)
        out["steady_read"] = statistics.median(steady_read)
        out["disable_1pct"] = statistics.median(disabled)
        state.engine.dispose()
        return out
    finally:
        if pg_name:
            drop_pg(args.pg_url, pg_name)


def import_paths(kind: str, args: argparse.Namespace, work: Path, n: int) -> tuple[float, float]:
    """Creating `n` users one by one through `users.create_user` (the admin API's path, what
    the sync did before the bulk import) against `users.create_nat_users`, same database,
    same run: (one by one, bulk) seconds."""
    from vpnfleet.controlplane.services import users

    pg_name = None
    if kind == "sqlite":
        url = f"sqlite:///{work / f'import-{kind}.db'}"
    else:
        url, pg_name = pg_database(args.pg_url)
    try:
        state = prepare(
            ServerSettings(
                data_dir=work / f"import-{kind}",
                database_url=url,
                secret="bench-seal-secret-Qx9LmPz4Rk8Vw2b7",
            )
        )
        with state.factory() as db, db.begin():
            journal = Journal(db, directorysync.SYNC_ACTOR, itemized=False)
            for g in ("ga", "gb"):
                db.add(Group(name=g))
            journal.commit()
        timings = []
        for prefix, bulk in (("one", False), ("bulk", True)):
            t0 = time.perf_counter()
            with state.factory() as db, db.begin():
                journal = Journal(db, directorysync.SYNC_ACTOR, itemized=False)
                names = [f"{prefix}{i:05d}" for i in range(n)]
                if bulk:
                    users.create_nat_users(
                        db, journal, state.sealer,
                        [users.NewNatUser(u, f"{u}@example.test", True, ["ga", "gb"])
                         for u in names],
                    )  # fmt: skip
                else:
                    for u in names:
                        users.create_user(
                            db, journal, state.sealer, name=u, email=f"{u}@example.test",
                            mode="nat", enabled=True, max_sessions=1, groups=["ga", "gb"],
                        )  # fmt: skip
                journal.commit()
            timings.append(time.perf_counter() - t0)
        state.engine.dispose()
        return timings[0], timings[1]
    finally:
        if pg_name:
            drop_pg(args.pg_url, pg_name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--groups", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--import-users", type=int, default=1000, help="users per import path")
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL"))
    args = p.parse_args()
    kinds = [k for k in args.db.split(",") if k]
    if "postgresql" in kinds and not args.pg_url:
        p.error("postgresql needs --pg-url or VPNFLEET_TEST_PG_URL")
    print(f"# {platform.node()} {platform.python_version()} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="vf-dirbench-") as tmp:
        work = Path(tmp)
        with ldap.running_slapd(work / "slapd") as srv:
            t0 = time.perf_counter()
            seed(srv, args.users, args.groups)
            print(f"seeded {args.users} users, {args.groups} groups: "
                  f"{time.perf_counter() - t0:.1f} s (ldapadd)")  # fmt: skip
            base, reads, queries = [], [], 0
            cfg = None
            for _ in range(args.rounds):
                base.append(ldapsearch_baseline(srv))
                cfg = LdapConfig(
                    url=srv.url,
                    bind_dn=ldap.ROOT_DN,
                    bind_password=ldap.ROOT_PW,
                    user_bases=(ldap.PEOPLE,),
                    group_bases=(ldap.GROUPS,),
                    group_map={f"g{g:03d}": f"g{g:03d}" for g in range(args.groups)},
                    disabled_attribute="employeeType",
                    disabled_value="disabled",
                )
                t0 = time.perf_counter()
                res = read_directory(cfg)
                reads.append(time.perf_counter() - t0)
                queries = res.queries
            b, r = statistics.median(base), statistics.median(reads)
            print(f"ldapsearch baseline (users + groups): {b:.2f} s")
            print(f"read + resolve: {r:.2f} s ({r / b:.1f}x the baseline), "
                  f"{queries} LDAP requests")  # fmt: skip
            for kind in kinds:
                out = run_db(kind, srv, args, work)
                one, bulk = import_paths(kind, args, work, args.import_users)
                print(
                    f"{kind}: creating {args.import_users} users one by one {one:.1f} s, "
                    f"in bulk {bulk:.1f} s ({bulk / one:.2f}x)"
                )
                print(
                    f"{kind}: first sync {out['first']:.1f} s ({int(out['first_queries'])} "
                    f"LDAP requests); no change {out['steady']:.2f} s (reading the directory "
                    f"{out['steady_read']:.2f} s of it); "
                    f"1% disabled {out['disable_1pct']:.2f} s"
                )


if __name__ == "__main__":
    main()
