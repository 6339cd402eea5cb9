"""Concurrent requests that race for the same name or gateway address: never both win."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import Server


def test_concurrent_gateway_leases_are_unique(server: Server) -> None:
    def create(i: int) -> int:
        with server.client() as c:
            r = c.post("/api/v1/users", json={"name": f"gw{i}", "mode": "gateway"})
            if r.status_code != 201:
                print(r.text)
            return r.status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(create, range(24)))
    assert codes.count(201) + codes.count(409) == 24
    with server.client() as c:
        users = [u for u in c.get("/api/v1/users").json() if u["mode"] == "gateway"]
    addresses = [u["gateway_address"] for u in users]
    assert len(users) == codes.count(201) >= 20
    assert len(set(addresses)) == len(addresses)


def test_concurrent_same_name_has_one_winner(server: Server) -> None:
    def create(_: int) -> int:
        with server.client() as c:
            return c.post("/api/v1/users", json={"name": "same", "mode": "gateway"}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(create, range(8)))
    assert codes.count(201) == 1 and codes.count(409) == 7
    with server.client() as c:
        assert len(c.get("/api/v1/users").json()) == 1
        assert c.get("/api/v1/pki").json()["issued"] == 1
        assert [p["leases"] for p in c.get("/api/v1/pools").json() if p["kind"] == "gateway"] == [1]
