"""The client handler: OpenVPN's client events in, decisions and session records out.

It owns the pod's :class:`~vpnfleet.core.sessionbook.SessionBook` and its on-disk
:class:`~vpnfleet.agent.clientjournal.ClientJournal`. For every CONNECT/REAUTH it asks the book
(pure) what to answer and answers OpenVPN through the current management session; for
ESTABLISHED and DISCONNECT it records the session and tells the firewall. It disconnects
whatever :meth:`SessionBook.violations` names (disabled users, killed sessions, replaced
certificates...), compares the book with OpenVPN's own client list, and hands session records
to the shipper. A decision never waits on the network: it comes from the local fleet view.

One exception, for refusals only: while the view may be behind the control plane (its watch
stream is reconnecting, say to another replica after one stopped), a CONNECT the view would
refuse is held until the view is current again, at most :data:`HOLD_REFUSAL` seconds, and
decided then. A stock client gives up on a refusal ("account disabled"), so a refusal read
from a view that missed the account's re-enabling would lock a user out; an admission never
waits. Held answers run beside the event stream (OpenVPN accepts answers in any order), so the
clients behind a held one are not kept waiting.

A user whose auth policy is ``cert+sso`` is the other exception (docs/sso.md): when every
other check passes, the CONNECT is answered ``client-pending-auth`` with the login URL the
control plane registers for this connection (``WEB_AUTH::<url>``), and decided again, on the
view of that moment, when the login's decision arrives (admitted, refused, or timed out). A
client that does not announce web auth (``IV_SSO=webauth``) is refused at once with a reason,
never left pending. Each login waits in its own task beside the event stream, so pending logins
never hold up other users' decisions.

The pod's OpenVPN servers (UDP, and TCP unless turned off) share this one handler and book:
every event comes with the name of the server it came from, and every answer, kick and status
listing goes to that server's management session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any

from vpnfleet.agent.clientjournal import ClientJournal
from vpnfleet.agent.cpclient import ControlPlaneError
from vpnfleet.agent.management import ManagementError
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.runners import ManagementSession
from vpnfleet.agent.sessionship import SessionShipper
from vpnfleet.agent.ssologin import SsoLogins
from vpnfleet.core import webauth
from vpnfleet.core.authz import Decision
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.mgmt_protocol import ClientEvent, ClientEventKind, StatusClient
from vpnfleet.core.sessionbook import PRIMARY, Client, ConnectOutcome, Kick, SessionBook

log = logging.getLogger("vpnfleet.agent")

HOLD_REFUSAL = 3.0  # seconds a refusal may wait for a view that is not current
# OpenVPN is told to keep the client pending this much longer than the login lasts, so that
# a login that runs out is refused by the agent, with its reason, not dropped by OpenVPN.
SSO_GRACE = 10
SSO_ADMIT_AT_ONCE = 2  # logins answered at a time (see _login_and_answer)
DENIED_LINGER = 30.0  # seconds a refused client is not restarted by the reconcile
NO_WEBAUTH = Decision(
    False,
    "single sign-on required; the client cannot open a web login",
    "single sign-on login required: use a client with web login (OpenVPN 2.6+, Connect)",
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class ClientHandler:
    """Keeps the session book, the journal and OpenVPN's clients in agreement."""

    def __init__(
        self,
        book: SessionBook,
        journal: ClientJournal,
        shipper: SessionShipper,
        *,
        pod: str,
        view: Callable[[], FleetView],
        mgmt: Callable[[str], ManagementSession | None],
        changed: Callable[[], None],
        metrics: AgentMetrics | None = None,
        clock: Callable[[], str] = _now,
        wait_current: Callable[[float], Awaitable[bool]] | None = None,
        sso: SsoLogins | None = None,
    ) -> None:
        """``wait_current(seconds)`` waits up to that long for the fleet view to be current
        with the control plane and says whether it is (0: just say); without it, refusals
        are never held. ``sso`` registers single sign-on logins; without it a ``cert+sso``
        user is refused."""
        self.book = book
        self._journal = journal
        self._shipper = shipper
        self._pod = pod
        self._view = view
        self._mgmt = mgmt
        self._changed = changed
        self._metrics = metrics
        self._clock = clock
        self._cached: dict[tuple[str, str], Client] = {}
        # Each server's last client listing: byte counters for metrics and for sessions we end.
        self._status: dict[str, list[StatusClient]] = {}
        self.last_status_at = 0.0
        self._bytes: dict[tuple[str, int], tuple[int, int]] = {}
        # Servers whose clients the journal still holds unjudged (until each has been listed
        # or reset once); the journal is compacted when none is left.
        self._unsynced = set(book.config.servers)
        self._wait_current = wait_current
        self._sso = sso
        self._admitting = asyncio.Semaphore(SSO_ADMIT_AT_ONCE)
        # (server, cid) -> its CONNECT whose answer waits: a held refusal or an SSO login
        self._holding: dict[tuple[str, int], asyncio.Task[None]] = {}
        # (server, cid) -> when it was refused: OpenVPN lists it, without an address, until
        # the client's next PUSH_REQUEST gets the AUTH_FAILED (up to 5 s later); the
        # reconcile must not take it for a CONNECT nobody answered and restart it, or the
        # client reconnects instead of showing why it was refused.
        self._denied: dict[tuple[str, int], float] = {}

    def new_uid(self) -> str:
        """A fresh session uid (unique across the fleet: pod name + 64 random bits)."""
        return f"{self._pod}-{secrets.token_hex(8)}"

    def _uids(self) -> Iterator[str]:
        while True:
            yield self.new_uid()

    # ------------------------------------------------------------------ start

    def load_journal(self) -> None:
        """Read the previous agent's sessions: adopted clients keep their uids and owners."""
        self._cached = self._journal.load()
        self.book.seed_owners(self._cached.values())

    @property
    def last_status(self) -> list[StatusClient]:
        """Every server's last client listing, one list (metrics match rows to clients by
        client id and tunnel address, which together are unique across the servers)."""
        return [row for rows in self._status.values() for row in rows]

    def _cached_of(self, server: str) -> dict[tuple[str, str], Client]:
        return {k: c for k, c in self._cached.items() if c.server == server}

    def _synced(self, server: str) -> None:
        """``server``'s clients from the journal are judged: adopted, or closed."""
        for key in self._cached_of(server):
            del self._cached[key]
        if server in self._unsynced:
            self._unsynced.discard(server)
            if not self._unsynced:
                # The journal now holds exactly the live sessions (drops the previous
                # agent's ones that were not there to adopt).
                self._journal.rewrite(self.book.established())

    def reset(self, reason: str, server: str = PRIMARY) -> None:
        """``server``'s OpenVPN was started afresh: every client it had is gone (and so are
        the sessions of it the previous agent's journal still held). So are the CONNECTs of
        it whose answers wait: the new process numbers its clients from 0 again, and an
        old answer must never reach a new client with the same id."""
        for key in [k for k in self._holding if k[0] == server]:
            self._holding.pop(key).cancel()
        self._denied = {k: t for k, t in self._denied.items() if k[0] != server}
        for client in self.book.clear(server):
            self._ended(client, reason)
        for client in self._cached_of(server).values():
            self.book.release_owner(client)
            if client.established:
                self._journal.down(client.uid)
                self._shipper.closed(client, 0, 0, reason)
        self._synced(server)
        self._changed()

    # ------------------------------------------------------------------ events

    async def on_event(self, ev: ClientEvent, server: str = PRIMARY) -> None:
        """One ``>CLIENT:`` notification of ``server``, handled in arrival order (answers
        must not reorder; a held refusal is answered on its own, see the module's docstring)."""
        if ev.kind in (ClientEventKind.CONNECT, ClientEventKind.REAUTH):
            await self._on_connect(ev, server)
        elif ev.kind is ClientEventKind.ESTABLISHED:
            self._on_established(ev, server)
        elif ev.kind is ClientEventKind.DISCONNECT:
            self._on_disconnect(ev, server)

    async def _on_connect(self, ev: ClientEvent, server: str) -> None:
        started = time.perf_counter()
        reauth = ev.kind is ClientEventKind.REAUTH
        if not reauth:
            # The client started over (a new key) before its previous CONNECT was answered:
            # that answer would go to a key OpenVPN no longer knows.
            earlier = self._holding.pop((server, ev.cid), None)
            if earlier is not None:
                earlier.cancel()
        out = self._decide(ev, server, reauth=reauth)
        if out.decision.sso and not reauth:
            if self._sso is None or not webauth.announces_webauth(ev.env):
                await self._answer(ev, server, ConnectOutcome(NO_WEBAUTH), started)
                return
            self._hold(ev, server, self._login(ev, server), "sso-login")
            return
        if (
            not out.decision.allow
            and not reauth
            and self._wait_current is not None
            and not await self._wait_current(0)
        ):
            log.info(
                "holding the answer to %s: the fleet view may be behind (%s)",
                ev.env.get("common_name") or "?",
                out.decision.reason,
            )
            self._hold(ev, server, self._held(ev, server, started), "held-connect")
            return
        await self._answer(ev, server, out, started)

    def _decide(
        self, ev: ClientEvent, server: str, *, reauth: bool = False, signed_in: bool = False
    ) -> ConnectOutcome:
        """The book's decision on a CONNECT/REAUTH on the fleet view of this moment."""
        return self.book.connect(
            self._view(),
            ev.cid,
            ev.env,
            reauth=reauth,
            uid=self.new_uid(),
            now=self._clock(),
            server=server,
            signed_in=signed_in,
        )

    def _hold(
        self, ev: ClientEvent, server: str, answer: Coroutine[Any, Any, None], what: str
    ) -> None:
        """Answer a CONNECT later, in its own task (``answer``), held in ``_holding`` until
        it lets go (``_let_go``), its client leaves, its OpenVPN restarts or we close."""
        key = (server, ev.cid)
        self._holding[key] = asyncio.create_task(answer, name=f"{what}-{server}-{ev.cid}")

    def _let_go(self, server: str, cid: int) -> None:
        """The calling task no longer holds its CONNECT (a newer CONNECT of the same client
        id may hold it by now: that one stays)."""
        key = (server, cid)
        if asyncio.current_task() is self._holding.get(key):
            del self._holding[key]

    async def _held(self, ev: ClientEvent, server: str, started: float) -> None:
        """Decide a held CONNECT again once the view is current (or the hold ran out)."""
        assert self._wait_current is not None
        try:
            await self._wait_current(HOLD_REFUSAL)
        finally:
            self._let_go(server, ev.cid)
        await self._answer(ev, server, self._decide(ev, server), started)

    async def _login(self, ev: ClientEvent, server: str) -> None:
        """A CONNECT that waits for its user's single sign-on login: register it with the
        control plane, send the client the login URL, and answer once the decision is in.
        The connection stays in ``_holding`` until it is answered, so the reconcile never
        takes it for a CONNECT nobody answered."""
        try:
            await self._login_and_answer(ev, server)
        finally:
            self._let_go(server, ev.cid)

    async def _login_and_answer(self, ev: ClientEvent, server: str) -> None:
        assert self._sso is not None
        kid = ev.kid if ev.kid is not None else 0
        user = ev.env.get("common_name", "")
        mgmt = self._mgmt(server)
        try:
            login = await self._sso.register(
                server, ev.cid, kid, user, ev.env.get("untrusted_ip") or None
            )
            extra = webauth.web_auth_extra(login.url)
        except (ControlPlaneError, ValueError) as exc:
            log.warning("no single sign-on login for %s: %s", user or "?", exc)
            refusal = Decision(
                False,
                "single sign-on unavailable",
                "single sign-on login unavailable, try again later",
            )
            await self._answer(ev, server, ConnectOutcome(refusal), time.perf_counter())
            return
        pending = min(login.timeout_seconds + SSO_GRACE, webauth.PENDING_MAX)
        try:
            if mgmt is None:
                raise ManagementError("no management session")
            await _unbroken(mgmt.client_pending_auth(ev.cid, kid, extra, pending))
        except ManagementError as exc:
            log.info("could not send %s the login URL over %s: %s", user or "?", server, exc)
            return
        log.info(
            "%s from %s waits for a single sign-on login (%d s)",
            user or "?",
            ev.env.get("untrusted_ip", "?"),
            pending,
            extra={"event": "auth", "user": user, "result": "pending"},
        )
        outcome = await self._sso.wait(login, pending - SSO_GRACE)
        # Few admissions at a time: a poll may bring many decisions at once, and every
        # answer goes through the one management session; other users' CONNECTs must not
        # queue behind all of them.
        async with self._admitting:
            started = time.perf_counter()
            if not outcome.admitted:
                text = outcome.reason or "single sign-on login refused"
                refusal = Decision(False, f"single sign-on refused ({text})", text)
                await self._answer(ev, server, ConnectOutcome(refusal), started)
                return
            # Decided again on today's view: the user may have been disabled meanwhile, or
            # the session limit filled by another device.
            await self._answer(ev, server, self._decide(ev, server, signed_in=True), started)

    async def _answer(
        self, ev: ClientEvent, server: str, out: ConnectOutcome, started: float
    ) -> None:
        """Tell OpenVPN the book's decision on a CONNECT or REAUTH."""
        reauth = ev.kind is ClientEventKind.REAUTH
        decision = out.decision
        kid = ev.kid if ev.kid is not None else 0
        mgmt = self._mgmt(server)
        try:
            if mgmt is None:
                raise ManagementError("no management session")
            if not decision.allow:
                if out.ended is not None:
                    self._ended(out.ended, decision.reason)
                await _unbroken(
                    mgmt.client_deny(ev.cid, kid, decision.reason, decision.client_reason)
                )
                if not reauth:
                    self._denied[(server, ev.cid)] = time.monotonic()
                log.info(
                    "denied %s from %s over %s: %s",
                    ev.env.get("common_name") or "?",
                    ev.env.get("untrusted_ip", "?"),
                    server,
                    decision.reason,
                    extra={"event": "auth", "user": ev.env.get("common_name"), "result": "deny"},
                )
            elif reauth:
                await _unbroken(mgmt.client_auth(ev.cid, kid, ()))
            else:
                for old in out.replaced:
                    await self.kick(old, "replaced by a new connection", halt=True)
                await _unbroken(mgmt.client_auth(ev.cid, kid, out.push))
        except (ManagementError, ValueError) as exc:
            # The client vanished meanwhile, or openvpn restarted: reconcile tidies up.
            log.info("could not answer %s client %d: %s", server, ev.cid, exc)
            mine = out.client
            if mine is not None and self.book.get(ev.cid, server) is mine:
                self.book.forget(ev.cid, server)  # only what this answer admitted
        if self._metrics is not None:
            self._metrics.decisions.labels(result=decision.label).inc()
            self._metrics.decision_seconds.observe(time.perf_counter() - started)

    def _on_established(self, ev: ClientEvent, server: str) -> None:
        client = self.book.establish(ev.cid, server)
        if client is None:
            log.warning(
                "ESTABLISHED for unknown %s client %d; reconcile will decide", server, ev.cid
            )
            return
        self._journal.up(client)
        self._shipper.opened(client)
        self._changed()
        if self._metrics is not None:
            self._metrics.connects.inc()
        log.info(
            "%s connected from %s:%s over %s as %s (%s)",
            client.user,
            client.real_ip,
            client.real_port,
            client.server,
            client.tunnel_ip,
            client.mode,
            extra={
                "event": "connect",
                "user": client.user,
                "tunnel_ip": client.tunnel_ip,
                "session_uid": client.uid,
                "proto": client.server,
            },
        )

    def _on_disconnect(self, ev: ClientEvent, server: str, reason: str = "disconnected") -> None:
        self._denied.pop((server, ev.cid), None)
        held = self._holding.pop((server, ev.cid), None)
        if held is not None:  # it gave up while its answer was held
            held.cancel()
        client = self.book.forget(ev.cid, server)
        self._bytes.pop((server, ev.cid), None)
        if client is None or not client.established:
            return
        self._ended(
            client,
            reason,
            bytes_in=_int(ev.env.get("bytes_received")),
            bytes_out=_int(ev.env.get("bytes_sent")),
        )
        if self._metrics is not None:
            self._metrics.disconnects.inc()
        log.info(
            "%s disconnected (%s)",
            client.user,
            client.tunnel_ip,
            extra={"event": "disconnect", "user": client.user, "session_uid": client.uid},
        )

    def _ended(
        self, client: Client, reason: str, bytes_in: int | None = None, bytes_out: int | None = None
    ) -> None:
        """A live session is over: journal, session record, firewall."""
        if bytes_in is None or bytes_out is None:
            bytes_in, bytes_out = self._bytes.get(client.key, (0, 0))
        self._journal.down(client.uid)
        self._shipper.closed(client, bytes_in, bytes_out, reason)
        self._changed()

    # ------------------------------------------------------------------ disconnecting

    async def kick(self, client: Client, reason: str, *, halt: bool) -> None:
        """Disconnect ``client`` now: its session ends at once, OpenVPN drops it shortly.

        OpenVPN keeps a killed instance for a few seconds (delayed exit): the address leaves
        the firewall and the session record closes now, not at DISCONNECT.
        """
        ended = self.book.kick(client.cid, reason, client.server)
        if ended is None and self.book.get(client.cid, client.server) is None:
            return
        log.info(
            "disconnecting %s (%s): %s",
            client.user,
            client.tunnel_ip,
            reason,
            extra={"event": "kick", "user": client.user, "reason": reason},
        )
        if ended is not None:
            self._ended(ended, reason)
        mgmt = self._mgmt(client.server)
        if mgmt is None:
            return
        try:
            await _unbroken(mgmt.client_kill(client.cid, "HALT" if halt else "RESTART"))
        except ManagementError as exc:
            log.info("client-kill %d: %s", client.cid, exc)

    async def apply(self, kicks: Iterable[Kick]) -> None:
        for k in kicks:
            await self.kick(k.client, k.reason, halt=k.halt)

    async def converge(self, users: Iterable[str] | None = None) -> None:
        """Disconnect every client (of ``users``) the fleet view no longer allows."""
        await self.apply(self.book.violations(self._view(), users))

    async def end_lapsed_logins(self, now: float | None = None) -> None:
        """Restart the clients of single sign-on users whose login is older than the session
        lifetime at ``now`` (Unix seconds, default: now; called every reconcile interval):
        they come back and log in again."""
        await self.apply(self.book.lapsed(time.time() if now is None else now))

    async def kick_uid(self, uid: str, reason: str) -> None:
        """Disconnect the client of session ``uid`` (the control plane refused it)."""
        for client in self.book.by_uid(uid):
            await self.kick(client, reason, halt=True)

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, server: str = PRIMARY) -> bool:
        """Compare ``server``'s client list with the book; adopt, close and restart as needed.

        False when OpenVPN could not be asked (no session, or it did not answer).
        """
        mgmt = self._mgmt(server)
        if mgmt is None or mgmt.closed:
            return False
        listed_after = self.book.seq
        try:
            rows = await mgmt.status()
        except ManagementError as exc:
            log.info("reconcile skipped: %s", exc)
            return False
        self._status[server] = rows
        self.last_status_at = time.time()
        self._bytes = {k: v for k, v in self._bytes.items() if k[0] != server}
        now = time.monotonic()
        self._denied = {k: t for k, t in self._denied.items() if now - t < DENIED_LINGER}
        self._bytes.update(
            ((server, r.client_id), (r.bytes_received, r.bytes_sent))
            for r in rows
            if r.client_id is not None
        )
        result = self.book.reconcile(
            rows,
            self._cached_of(server),
            listed_after=listed_after,
            new_uid=self._uids(),
            now=self._clock(),
            server=server,
        )
        for client in result.vanished:
            log.warning("client %d (%s) vanished without DISCONNECT", client.cid, client.user)
            self._ended(client, "missing from openvpn status (reconciled)")
        for client in result.adopted:
            # Always spooled: delivery is idempotent by uid, and the journal may have held the
            # session while its open record was lost with the previous agent.
            self._journal.up(client)
            self._shipper.opened(client)
            log.info(
                "adopted %s (%s, %s) after restart",
                client.user,
                client.tunnel_ip,
                client.server,
                extra={"event": "adopt", "user": client.user, "session_uid": client.uid},
            )
        for cid in result.restart:
            if (server, cid) in self._holding:
                continue  # answered once the view is current, or once its login is decided
            if time.monotonic() - self._denied.get((server, cid), -DENIED_LINGER) < DENIED_LINGER:
                continue  # refused: the client hears AUTH_FAILED at its next PUSH_REQUEST
            log.info("client %d never got an answer; asking it to reconnect", cid)
            try:
                await mgmt.client_kill(cid, "RESTART")
            except ManagementError as exc:
                log.info("client-kill %d: %s", cid, exc)
        self._synced(server)
        if result.adopted:
            self._changed()
        await self.converge()
        return True

    def end_all(self, reason: str) -> None:
        """Forget every client (drain, after OpenVPN stopped serving them); close live ones."""
        for client in self.book:
            gone = self.book.forget(client.cid, client.server)
            if gone is not None and gone.established:
                self._ended(gone, reason)

    # ------------------------------------------------------------------ reading

    def owner(self, tunnel_ip: str) -> tuple[str, str] | None:
        """(user, session uid) of the session holding ``tunnel_ip`` now."""
        return self.book.owner(tunnel_ip)

    def established(self) -> list[Client]:
        """Clients whose session is live."""
        return self.book.established()

    def all(self) -> list[Client]:
        """Every client OpenVPN told us about (connecting and being disconnected included)."""
        return list(self.book)

    def users_of(self, uid: str) -> set[str]:
        """The user of session ``uid`` here (empty if it is not on this pod)."""
        return {c.user for c in self.book.by_uid(uid)}

    def live_uids(self) -> list[str]:
        return [c.uid for c in self.book.established()]

    def close(self) -> None:
        for task in self._holding.values():
            task.cancel()
        self._holding.clear()
        self._journal.close()


async def _unbroken(command: Awaitable[None]) -> None:
    """Run a management command that the cancellation of the task awaiting it (its client
    left, OpenVPN restarted) does not break off: a command abandoned half-way closes the
    management session, and the supervisor then restarts OpenVPN with every client on it."""
    task = asyncio.ensure_future(command)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # It finishes on its own; its outcome concerns a client that is gone.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0
