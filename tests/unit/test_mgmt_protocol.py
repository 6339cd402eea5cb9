"""The management-interface parser and command formatters, on output captured from 2.6.14."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnfleet.core import mgmt_protocol as mp
from vpnfleet.core.mgmt_protocol import (
    ClientAddress,
    ClientEvent,
    ClientEventKind,
    Hold,
    Info,
    ManagementParser,
    MultiLine,
    Notification,
    Reply,
    Unknown,
)

# Captured from OpenVPN 2.6.14 (management-client-auth, client 'alice'), trimmed.
CONNECT_BLOCK = """\
>CLIENT:CONNECT,0,1
>CLIENT:ENV,n_clients=0
>CLIENT:ENV,password=hunter2
>CLIENT:ENV,untrusted_port=36742
>CLIENT:ENV,untrusted_ip=198.18.0.2
>CLIENT:ENV,common_name=alice
>CLIENT:ENV,username=
>CLIENT:ENV,IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305
>CLIENT:ENV,IV_VER=2.6.14
>CLIENT:ENV,tls_serial_hex_0=56:f8:7a:c8:e6:84:6d:b0
>CLIENT:ENV,tls_id_0=CN=alice
>CLIENT:ENV,X509_0_CN=alice
>CLIENT:ENV,tls_id_1=CN=vpnfleet CA
>CLIENT:ENV,config=server.conf
>CLIENT:ENV,dev=tun0
>CLIENT:ENV,END
"""

STATUS_3 = [
    "TITLE\tOpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [LZ4] [EPOLL] [AEAD] [DCO]",
    "TIME\t2026-11-26 14:43:51\t1795704231",
    "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\t"
    "Bytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\t"
    "Client ID\tPeer ID\tData Channel Cipher",
    "CLIENT_LIST\talice\t198.18.0.2:52196\t10.77.0.23\t\t2326\t2304\t2026-11-26 14:43:46\t"
    "1795704226\tUNDEF\t1\t1\tAES-256-GCM",
    # A client still waiting for client-auth: no virtual address, placeholder cipher.
    "CLIENT_LIST\tbob\t198.18.0.3:49801\t\t\t2819\t2439\t2026-11-26 14:43:12\t1795704192\t"
    "UNDEF\t2\t0\tBF-CBC",
    "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\t"
    "Last Ref (time_t)",
    "ROUTING_TABLE\t10.77.0.23\talice\t198.18.0.2:52196\t2026-11-26 14:43:47\t1795704227",
    "GLOBAL_STATS\tMax bcast/mcast queue length\t1",
    "GLOBAL_STATS\tdco_enabled\t0",
]


def feed_text(parser: ManagementParser, text: str) -> list[mp.Event]:
    return parser.feed(text.replace("\n", "\r\n").encode())


# ------------------------------------------------------------------ events


def test_greeting_hold_and_replies() -> None:
    p = ManagementParser()
    events = feed_text(
        p,
        ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\n"
        ">HOLD:Waiting for hold release:0\n"
        "SUCCESS: hold release succeeded\n"
        "ERROR: unknown command, enter 'help' for more options\n",
    )
    assert events == [
        Info("OpenVPN Management Interface Version 5 -- type 'help' for more info"),
        Hold("Waiting for hold release:0"),
        Reply(True, "hold release succeeded"),
        Reply(False, "unknown command, enter 'help' for more options"),
    ]


def test_connect_env_block_is_accumulated_into_one_event() -> None:
    p = ManagementParser()
    lines = CONNECT_BLOCK.splitlines(keepends=True)
    for line in lines[:-1]:
        assert p.feed_line(line) == []  # nothing until ENV,END
    (event,) = p.feed_line(lines[-1])
    assert isinstance(event, ClientEvent)
    assert (event.kind, event.cid, event.kid) == (ClientEventKind.CONNECT, 0, 1)
    assert event.common_name == "alice"
    assert event.env["untrusted_ip"] == "198.18.0.2"
    assert event.env["tls_id_0"] == "CN=alice"  # split on the first '=' only
    assert event.env["username"] == ""
    assert event.env["IV_CIPHERS"] == "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"
    assert len(event.env) == 14


def test_client_event_repr_and_safe_env_hide_the_password() -> None:
    (event,) = feed_text(ManagementParser(), CONNECT_BLOCK)
    assert isinstance(event, ClientEvent)
    assert event.env["password"] == "hunter2"
    assert "hunter2" not in repr(event)
    assert "hunter2" not in str(event.safe_env())
    assert event.safe_env()["common_name"] == "alice"


@pytest.mark.parametrize(
    ("header", "kind", "cid", "kid"),
    [
        (">CLIENT:REAUTH,7,2", ClientEventKind.REAUTH, 7, 2),
        (">CLIENT:ESTABLISHED,7", ClientEventKind.ESTABLISHED, 7, None),
        (">CLIENT:DISCONNECT,4294967295", ClientEventKind.DISCONNECT, 2**32 - 1, None),
    ],
)
def test_other_client_blocks(header: str, kind: ClientEventKind, cid: int, kid: int | None) -> None:
    events = feed_text(
        ManagementParser(),
        f"{header}\n>CLIENT:ENV,bytes_received=1234\n>CLIENT:ENV,common_name=bob\n>CLIENT:ENV,END\n",
    )
    assert events == [ClientEvent(kind, cid, kid, {"bytes_received": "1234", "common_name": "bob"})]


def test_cr_response_keeps_the_response_out_of_repr() -> None:
    (event,) = feed_text(
        ManagementParser(), ">CLIENT:CR_RESPONSE,3,0,ODY3NTMwOQ==\n>CLIENT:ENV,END\n"
    )
    assert isinstance(event, ClientEvent)
    assert event.kind is ClientEventKind.CR_RESPONSE
    assert (event.cid, event.kid, event.cr_response) == (3, 0, "ODY3NTMwOQ==")
    assert "ODY3" not in repr(event)


def test_client_address() -> None:
    events = feed_text(
        ManagementParser(),
        ">CLIENT:ADDRESS,1,10.77.0.23,1\n>CLIENT:ADDRESS,1,192.168.5.0/255.255.255.0,0\n",
    )
    assert events == [
        ClientAddress(1, "10.77.0.23", True),
        ClientAddress(1, "192.168.5.0/255.255.255.0", False),
    ]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (">LOG:1795704118,D,MANAGEMENT: CMD 'help'", "LOG"),
        (">STATE:1795704115,CONNECTED,SUCCESS,10.77.0.1,,,,", "STATE"),
        (">BYTECOUNT_CLI:3,1024,2048", "BYTECOUNT_CLI"),
        (">FATAL:cannot open tun", "FATAL"),
        (">PASSWORD:Need 'Auth' username/password", "PASSWORD"),
        (">NEED-OK:Need 'token' confirmation MSG:insert", "NEED-OK"),
        (">NOTIFY:info,remote-exit,EXIT", "NOTIFY"),
        (">CLIENT:FUTURE_THING,1,2", "CLIENT"),
    ],
)
def test_other_realtime_messages_are_notifications(line: str, kind: str) -> None:
    text = line.split(":", 1)[1]
    assert ManagementParser().feed_line(line) == [Notification(kind, text)]


# ------------------------------------------------------------------ multi-line replies


def test_listing_is_one_multiline_event() -> None:
    p = ManagementParser()
    p.expect_multiline()
    assert p.multiline_pending
    events = feed_text(p, "\n".join(STATUS_3) + "\nEND\n")
    assert events == [MultiLine(tuple(STATUS_3))]
    assert not p.multiline_pending
    # Afterwards, lines are replies again.
    assert feed_text(p, "SUCCESS: pid=42\n") == [Reply(True, "pid=42")]


def test_notifications_interleaved_in_a_listing_are_delivered_apart() -> None:
    p = ManagementParser()
    p.expect_multiline()
    text = (
        f"{STATUS_3[0]}\n{STATUS_3[1]}\n"
        ">LOG:1795704118,D,MANAGEMENT: CMD 'status 3'\n"
        f"{STATUS_3[2]}\n"
        + CONNECT_BLOCK
        + "\n".join(STATUS_3[3:])
        + "\n>BYTECOUNT_CLI:1,10,20\nEND\n"
    )
    events = feed_text(p, text)
    assert [type(e) for e in events] == [Notification, ClientEvent, Notification, MultiLine]
    assert events[-1] == MultiLine(tuple(STATUS_3))
    assert isinstance(events[1], ClientEvent) and events[1].common_name == "alice"


def test_error_instead_of_listing_ends_it() -> None:
    p = ManagementParser()
    p.expect_multiline()
    events = feed_text(
        p,
        "ERROR: The 'status' command is not supported by the current daemon mode\n"
        "SUCCESS: hold release succeeded\n",
    )
    assert events == [
        Reply(False, "The 'status' command is not supported by the current daemon mode"),
        Reply(True, "hold release succeeded"),
    ]


def test_listing_lines_that_look_like_replies_stay_in_the_listing() -> None:
    p = ManagementParser()
    p.expect_multiline()
    assert feed_text(p, "first\nSUCCESS: not a reply here\nEND\n") == [
        MultiLine(("first", "SUCCESS: not a reply here"))
    ]


def test_empty_listing() -> None:
    p = ManagementParser()
    p.expect_multiline()
    assert feed_text(p, "END\n") == [MultiLine(())]


# ------------------------------------------------------------------ robustness


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    data = (CONNECT_BLOCK + ">CLIENT:ESTABLISHED,0\n>CLIENT:ENV,END\nSUCCESS: ok\n").encode()
    whole = ManagementParser().feed(data)
    p = ManagementParser()
    pieces = [e for i in range(len(data)) for e in p.feed(data[i : i + 1])]
    assert pieces == whole
    assert len(whole) == 3


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "END",
        ">",
        ">:x",
        ">lower:case",
        ">CLIENT:CONNECT,x,1",
        ">CLIENT:CONNECT,1",
        ">CLIENT:ESTABLISHED,",
        ">CLIENT:ADDRESS,1",
        ">CLIENT:ENV,END",
        ">CLIENT:ENV,common_name=stray",
    ],
)
def test_bad_lines_become_unknown(line: str) -> None:
    (event,) = ManagementParser().feed_line(line)
    assert isinstance(event, Unknown)
    assert event.line == line
    assert event.reason


def test_invalid_utf8_does_not_raise() -> None:
    (event,) = ManagementParser().feed(b">INFO:caf\xe9 \xff\r\n")
    assert event == Info("caf\ufffd \ufffd")


def test_client_block_cut_short_is_reported_and_the_next_line_still_parsed() -> None:
    p = ManagementParser()
    events = feed_text(p, ">CLIENT:CONNECT,5,0\n>CLIENT:ENV,common_name=x\nSUCCESS: pid=1\n")
    assert events == [
        Unknown(">CLIENT:CONNECT,5,0", "CLIENT notification ended without >CLIENT:ENV,END"),
        Reply(True, "pid=1"),
    ]


def test_overlong_line_is_dropped_once_and_parsing_resumes() -> None:
    p = ManagementParser()
    events = p.feed(b">LOG:" + b"x" * (mp.MAX_LINE_BYTES + 10))
    assert len(events) == 1 and isinstance(events[0], Unknown)
    assert p.feed(b"y" * 1000) == []  # still the same line
    assert p.feed(b"\r\nSUCCESS: fine\r\n") == [Reply(True, "fine")]


def test_close_reports_what_was_left_incomplete() -> None:
    p = ManagementParser()
    p.expect_multiline()
    feed_text(p, "partial listing\n>CLIENT:DISCONNECT,3\n>CLIENT:ENV,a=b\n")
    p.feed(b"half a li")
    reasons = [e.reason for e in p.close() if isinstance(e, Unknown)]
    assert reasons == [
        "incomplete last line",
        "stream ended inside a CLIENT block",
        "stream ended before the multi-line reply's END",
    ]
    assert not p.multiline_pending
    assert p.feed(b"SUCCESS: again\n") == [Reply(True, "again")]


@given(st.lists(st.binary(max_size=200), max_size=30), st.booleans())
def test_parser_never_raises(chunks: list[bytes], listing: bool) -> None:
    p = ManagementParser()
    if listing:
        p.expect_multiline()
    for chunk in chunks:
        p.feed(chunk)
    p.close()


@given(st.lists(st.sampled_from(CONNECT_BLOCK.splitlines() + STATUS_3 + ["END", "SUCCESS: x"])))
def test_parser_never_raises_on_shuffled_protocol_lines(lines: list[str]) -> None:
    p = ManagementParser()
    p.expect_multiline()
    for line in lines:
        p.feed_line(line)


# ------------------------------------------------------------------ commands


def test_client_auth_block() -> None:
    lines = ["ifconfig-push 10.77.0.5 255.255.255.0", 'push "route 10.0.0.0 255.0.0.0"']
    assert mp.client_auth(3, 1, lines) == (
        "client-auth 3 1\n"
        "ifconfig-push 10.77.0.5 255.255.255.0\n"
        'push "route 10.0.0.0 255.0.0.0"\n'
        "END\n"
    )
    assert mp.client_auth(0, 0) == "client-auth 0 0\nEND\n"


@pytest.mark.parametrize(
    "line",
    [
        "ifconfig-push 10.0.0.2 255.255.255.0\nsignal SIGTERM",
        "ifconfig-push 10.0.0.2 255.255.255.0\rX",
        "push \x00",
        "END",
        "  END ",
        'push "route\tx"',
        'push "é"',
        "x" * (mp.MAX_COMMAND_LINE + 1),
    ],
)
def test_client_auth_rejects_injection(line: str) -> None:
    with pytest.raises(ValueError):
        mp.client_auth(1, 1, [line])


@pytest.mark.parametrize("bad", [-1, 2**32, True, "1"])
def test_ids_are_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="cid"):
        mp.client_auth(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kid"):
        mp.client_deny(1, bad, "x")  # type: ignore[arg-type]


def test_client_deny_quotes_per_openvpn_lexer() -> None:
    assert mp.client_deny(3, 1, "account disabled") == 'client-deny 3 1 "account disabled"\n'
    assert (
        mp.client_deny(3, 1, 'say "no"', "back\\slash, 'single' \"double\"")
        == 'client-deny 3 1 "say \\"no\\"" "back\\\\slash, \'single\' \\"double\\""\n'
    )
    # OpenVPN drops non-ASCII bytes; a visible placeholder is kinder than a silent gap.
    assert mp.client_deny(1, 0, "x", "Konto gesperrt \u2013 bitte IT") == (
        'client-deny 1 0 "x" "Konto gesperrt ? bitte IT"\n'
    )


@pytest.mark.parametrize("reason", ["a\nclient-kill 0", "a\rb", "nul\x00"])
def test_client_deny_rejects_control_characters(reason: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        mp.client_deny(1, 1, "ok", reason)
    with pytest.raises(ValueError, match="control character"):
        mp.client_deny(1, 1, reason)


def test_client_kill() -> None:
    assert mp.client_kill(4) == 'client-kill 4 "RESTART"\n'
    assert mp.client_kill(4, "HALT") == 'client-kill 4 "HALT"\n'
    assert mp.client_kill(4, "HALT,going away") == 'client-kill 4 "HALT,going away"\n'
    assert mp.client_kill(4, "RESTART,[N]") == 'client-kill 4 "RESTART,[N]"\n'


@pytest.mark.parametrize("message", ["", "restart", "BYE", "HALT\nsignal SIGTERM", "RESTARTX"])
def test_client_kill_rejects_messages_clients_do_not_act_on(message: str) -> None:
    with pytest.raises(ValueError, match="RESTART or HALT"):
        mp.client_kill(1, message)


@pytest.mark.parametrize(
    ("cmd", "listing"),
    [
        ("status 3", True),
        ("version", True),
        ("help", True),
        ("state", True),
        ("state all", True),
        ("log 20", True),
        ("state on", False),
        ("log off", False),
        ("hold release", False),
        ("pid", False),
        ("client-kill 1", False),
        ("something-new", None),
    ],
)
def test_expects_listing(cmd: str, listing: bool | None) -> None:
    assert mp.expects_listing(cmd) is listing


@pytest.mark.parametrize(
    "cmd", ["", "exit", "quit", "test 5", "version 3", "log on all", "client-auth 1 1"]
)
def test_commands_whose_reply_cannot_be_matched_are_refused(cmd: str) -> None:
    with pytest.raises(ValueError):
        mp.expects_listing(cmd)


def test_format_command() -> None:
    assert mp.format_command("status 3") == "status 3\n"
    with pytest.raises(ValueError):
        mp.format_command("pid\nsignal SIGTERM")


# ------------------------------------------------------------------ status and version


def test_parse_status_real_output() -> None:
    alice, bob = mp.parse_status(STATUS_3)
    assert alice == mp.StatusClient(
        common_name="alice",
        real_address="198.18.0.2:52196",
        virtual_address="10.77.0.23",
        virtual_ipv6_address=None,
        bytes_received=2326,
        bytes_sent=2304,
        connected_since=dt.datetime.fromtimestamp(1795704226, dt.UTC),
        username=None,
        client_id=1,
        peer_id=1,
        data_channel_cipher="AES-256-GCM",
    )
    assert (alice.real_ip, alice.real_port) == ("198.18.0.2", 52196)
    assert bob.virtual_address is None and bob.client_id == 2


def test_parse_status_finds_columns_by_header() -> None:
    lines = [
        "HEADER\tCLIENT_LIST\tClient ID\tNew Column\tBytes Sent\tBytes Received\tReal Address\t"
        "Common Name",
        "CLIENT_LIST\t9\twhatever\t5\t6\t[2001:db8::7]:1194\tcarol",
    ]
    (row,) = mp.parse_status(lines)
    assert (row.common_name, row.client_id, row.bytes_sent, row.bytes_received) == (
        "carol",
        9,
        5,
        6,
    )
    assert (row.real_ip, row.real_port) == ("2001:db8::7", 1194)
    assert row.virtual_address is None and row.connected_since is None


def test_parse_status_without_clients_is_empty() -> None:
    assert mp.parse_status([line for line in STATUS_3 if not line.startswith("CLIENT_LIST")]) == []


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["TITLE\tx", "GLOBAL_STATS\tdco_enabled\t0"],
        STATUS_3[3:4] + STATUS_3[2:3],  # row before header
        ["HEADER\tCLIENT_LIST\tCommon Name\tReal Address"],  # required columns missing
        [STATUS_3[2], STATUS_3[3].replace("\t2326\t", "\tlots\t")],
        [STATUS_3[2], "CLIENT_LIST"],
        ["Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since"],  # status 1
    ],
)
def test_parse_status_refuses_what_it_cannot_read(lines: list[str]) -> None:
    with pytest.raises(mp.StatusParseError):
        mp.parse_status(lines)


def test_parse_version() -> None:
    info = mp.parse_version(
        [
            "OpenVPN Version: OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)]",
            "Management Version: 5",
        ]
    )
    assert info == mp.VersionInfo("OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)]", 5)


# ------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (">CLIENT:ENV,password=hunter2", ">CLIENT:ENV,password=<redacted>"),
        (">CLIENT:ENV,auth_token=abc", ">CLIENT:ENV,auth_token=<redacted>"),
        (">PASSWORD:Auth-Token:Zm9vYmFy", ">PASSWORD:Auth-Token:<redacted>"),
        ('password "Auth" hunter2', 'password "Auth" <redacted>'),
        ('password "Private Key" "foo\\"bar baz"', 'password "Private Key" <redacted>'),
        ('push "auth-token SESS_ID_abc"', 'push "auth-token <redacted>'),
        (">CLIENT:CR_RESPONSE,3,0,ODY3NTMwOQ==", ">CLIENT:CR_RESPONSE,3,0,<redacted>"),
    ],
)
def test_redact_removes_secrets(line: str, expected: str) -> None:
    assert mp.redact(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        ">CLIENT:ENV,common_name=alice",
        ">CLIENT:ENV,username=alice",
        ">PASSWORD:Need 'Auth' username/password",
        ">PASSWORD:Verification Failed: 'Auth'",
        'username "Auth" alice',
        "client-auth 1 2",
        "ifconfig-push 10.77.0.5 255.255.255.0",
    ],
)
def test_redact_keeps_harmless_lines(line: str) -> None:
    assert mp.redact(line) == line


def test_redact_multiline_text() -> None:
    text = ">CLIENT:CONNECT,0,1\n>CLIENT:ENV,password=hunter2\n>CLIENT:ENV,END"
    assert (
        mp.redact(text) == ">CLIENT:CONNECT,0,1\n>CLIENT:ENV,password=<redacted>\n>CLIENT:ENV,END"
    )
    assert "hunter2" not in mp.redact(CONNECT_BLOCK)


def test_client_pending_auth() -> None:
    extra = "WEB_AUTH::https://vpn.example.test/sso/login/Xy_9"
    assert mp.client_pending_auth(7, 2, extra, 120) == (
        'client-pending-auth 7 2 "WEB_AUTH::https://vpn.example.test/sso/login/Xy_9" 120\n'
    )
    with pytest.raises(ValueError, match="timeout"):
        mp.client_pending_auth(7, 2, extra, 0)
    with pytest.raises(ValueError, match="control character"):
        mp.client_pending_auth(7, 2, extra + "\nclient-kill 0", 60)
    with pytest.raises(ValueError, match="longer than"):
        mp.client_pending_auth(7, 2, "WEB_AUTH::https://x.test/" + "a" * 1000, 60)
