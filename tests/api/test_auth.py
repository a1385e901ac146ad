"""API keys, permissions, rate limits and the error envelope, against a real service (tiny
Qwen2-VL, so every endpoint including images is reachable)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tkr_embed.api.app import create_app
from tkr_embed.auth.store import KeyStore
from tkr_embed.config import SettingsError
from tkr_embed.engine.service import EmbeddingService
from tests.api.conftest import served
from tests.helpers import ROOT, make_settings, png_bytes

PERMS = ["embed:text", "embed:image", "embed:multimodal", "similarity", "admin"]


def auth_settings(model_dir, data_dir, **extra):
    ov = {"security.require_api_key": True, "data_dir": str(data_dir), "rate_limit.enabled": True,
          "rate_limit.per_minute": 10_000, "rate_limit.per_hour": 100_000, "rate_limit.per_day": 1_000_000,
          "rate_limit.burst": 1000}
    ov.update(extra)
    return make_settings(str(model_dir), **ov)


@asynccontextmanager
async def auth_app(settings, announced=None):
    service = EmbeddingService(settings)
    app = create_app(settings, service, announce=(announced.append if announced is not None else lambda t: None))
    async with served(app) as client:
        yield client, app


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
async def env(tiny_dir, data_dir):
    announced: list[str] = []
    async with auth_app(auth_settings(tiny_dir, data_dir), announced) as (client, app):
        assert len(announced) == 1  # first start, empty store: a bootstrap admin key, shown once
        admin = announced[0]
        keys = {}
        for perm in PERMS:
            r = await client.post("/admin/api-keys", json={"name": perm, "permissions": [perm]},
                                  headers={"X-API-Key": admin})
            assert r.status_code == 201, r.text
            keys[perm] = r.json()["key"]
        yield client, app, admin, keys


def H(key):  # noqa: N802
    return {"Authorization": f"Bearer {key}"}


IMG = png_bytes(40, 40)
B64 = base64.b64encode(IMG).decode()


def calls():
    """(name, required permission, request kwargs) for every protected endpoint."""
    return [
        ("text", "embed:text", dict(method="POST", url="/embed/text", json={"texts": ["hi"]})),
        ("image", "embed:image", dict(method="POST", url="/embed/image", files={"file": ("a.png", IMG, "image/png")})),
        ("multimodal", "embed:multimodal", dict(method="POST", url="/embed/multimodal", data={"text": "t"},
                                                files={"image": ("a.png", IMG, "image/png")})),
        ("similarity", "similarity", dict(method="POST", url="/similarity", json={"query": "q", "candidates": ["c"]})),
        ("admin", "admin", dict(method="GET", url="/admin/api-keys")),
        ("admin-stats", "admin", dict(method="GET", url="/admin/stats")),
    ]


async def test_permission_matrix(env):
    client, _, admin, keys = env
    for name, needed, kw in calls():
        r = await client.request(**kw)
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        for perm, key in keys.items():
            r = await client.request(**kw, headers=H(key))
            expected = 200 if perm in (needed, "admin") else 403
            assert r.status_code == expected, (name, perm, r.status_code, r.text)
            if expected == 403:
                assert needed in r.json()["error"]["message"]


async def test_a_caller_without_a_key_is_refused_before_the_body_is_read(env):
    client, _, _, keys = env
    broken = {"content": b"{broken", "headers": {"content-type": "application/json"}}
    for path in ("/embed/text", "/v1/embeddings"):
        assert (await client.post(path, **broken)).status_code == 401, path
        r = await client.post(path, content=b"{broken", headers={**broken["headers"], **H(keys["admin"])})
        assert r.status_code == 400 and "not valid JSON" in r.text, (path, r.text)
    # a key without embed:text is refused before its body is looked at
    r = await client.post("/embed/text", content=b"{broken", headers={**broken["headers"], **H(keys["similarity"])})
    assert r.status_code == 403


async def test_similarity_with_images_needs_the_image_permission_too(env):
    client, _, _, keys = env
    body = {"query": "q", "candidates": [{"image": B64}]}
    assert (await client.post("/similarity", json=body, headers=H(keys["similarity"]))).status_code == 403
    assert (await client.post("/similarity", json=body, headers=H(keys["admin"]))).status_code == 200


async def test_open_and_any_key_endpoints(env):
    client, _, _, keys = env
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/info")).status_code == 401
    assert (await client.get("/info", headers=H(keys["embed:text"]))).status_code == 200


async def test_x_api_key_and_bearer_both_work(env):
    client, _, _, keys = env
    for headers in ({"X-API-Key": keys["embed:text"]}, {"Authorization": f"Bearer {keys['embed:text']}"},
                    {"authorization": f"bearer {keys['embed:text']}"}):
        assert (await client.post("/embed/text", json={"texts": ["x"]}, headers=headers)).status_code == 200


@pytest.mark.parametrize("headers,reason", [
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
    ({"Authorization": "Bearer "}, "Bearer"),
    ({"X-API-Key": ""}, "empty"),
    ({"X-API-Key": "tke_" + "a" * 600}, "malformed"),
    ({"X-API-Key": "not-a-key"}, "malformed"),
    ({"X-API-Key": "tke_0123456789ab_" + "A" * 43}, "invalid"),  # well-formed, unknown id
])
async def test_malformed_unknown_and_oversized_keys(env, headers, reason):
    client, *_ = env
    r = await client.post("/embed/text", json={"texts": ["x"]}, headers=headers)
    assert r.status_code == 401 and reason in r.json()["error"]["message"]


async def test_wrong_secret_for_a_real_id_and_non_ascii_header(env):
    client, _, _, keys = env
    key_id = keys["embed:text"].split("_")[1]
    forged = f"tke_{key_id}_{'B' * 43}"
    r = await client.post("/embed/text", json={"texts": ["x"]}, headers={"X-API-Key": forged})
    assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
    r = await client.post("/embed/text", json={"texts": ["x"]}, headers=[(b"x-api-key", "cl\u00e9".encode("latin-1"))])
    assert r.status_code == 401


async def test_query_string_keys_are_off_by_default(env):
    client, _, _, keys = env
    r = await client.post(f"/embed/text?api_key={keys['embed:text']}", json={"texts": ["x"]})
    assert r.status_code == 401


async def test_revocation_and_expiry_take_effect_on_the_next_request(env):
    client, _, admin, _ = env
    r = await client.post("/admin/api-keys", json={"name": "short", "permissions": ["embed:text"],
                                                   "expires_in_days": 1.5 / 86400}, headers=H(admin))
    short = r.json()["key"]
    assert (await client.post("/embed/text", json={"texts": ["x"]}, headers=H(short))).status_code == 200
    await asyncio.sleep(1.6)
    r = await client.post("/embed/text", json={"texts": ["x"]}, headers=H(short))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]

    created = (await client.post("/admin/api-keys", json={"name": "victim", "permissions": ["embed:text"]},
                                 headers=H(admin))).json()
    assert (await client.post("/embed/text", json={"texts": ["y"]}, headers=H(created["key"]))).status_code == 200
    r = await client.delete(f"/admin/api-keys/{created['id']}", headers=H(admin))
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = await client.post("/embed/text", json={"texts": ["y"]}, headers=H(created["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


async def test_rotation_replaces_the_secret(env):
    client, _, admin, _ = env
    created = (await client.post("/admin/api-keys", json={"name": "rot", "permissions": ["embed:text"]},
                                 headers=H(admin))).json()
    rotated = (await client.post(f"/admin/api-keys/{created['id']}/rotate", headers=H(admin))).json()
    assert rotated["id"] == created["id"] and rotated["key"] != created["key"]
    assert (await client.post("/embed/text", json={"texts": ["x"]}, headers=H(created["key"]))).status_code == 401
    assert (await client.post("/embed/text", json={"texts": ["x"]}, headers=H(rotated["key"]))).status_code == 200


async def test_admin_crud_validation_and_listing_has_no_secrets(env):
    client, _, admin, keys = env
    for bad in ({"name": "x", "permissions": ["fly"]}, {"name": "", "permissions": ["admin"]},
                {"name": "x", "permissions": []}, {"name": "x", "permissions": ["admin"], "expires_in_days": -1},
                {"name": "x", "permissions": ["admin"], "rate_limits": {"per_minute": 0}}):
        r = await client.post("/admin/api-keys", json=bad, headers=H(admin))
        assert r.status_code == 400, (bad, r.text)
    listing = (await client.get("/admin/api-keys", headers=H(admin))).text
    for key in keys.values():
        assert key.split("_", 2)[2] not in listing
    assert "digest" not in listing
    kid = keys["similarity"].split("_")[1]
    r = await client.patch(f"/admin/api-keys/{kid}", json={"name": "renamed", "permissions": ["similarity", "embed:text"]},
                           headers=H(admin))
    assert r.status_code == 200 and r.json()["name"] == "renamed"
    assert (await client.post("/embed/text", json={"texts": ["z"]}, headers=H(keys["similarity"]))).status_code == 200
    await client.patch(f"/admin/api-keys/{kid}", json={"permissions": ["similarity"]}, headers=H(admin))
    assert (await client.get("/admin/api-keys/nope00000000", headers=H(admin))).status_code == 404


async def test_usage_is_counted_per_key(env):
    client, _, admin, keys = env
    kid = keys["embed:text"].split("_")[1]
    before = (await client.get(f"/admin/api-keys/{kid}", headers=H(admin))).json()["usage"]
    await client.post("/embed/text", json={"texts": ["u1", "u2", "u3"]}, headers=H(keys["embed:text"]))
    after = (await client.get(f"/admin/api-keys/{kid}", headers=H(admin))).json()
    assert after["usage"]["requests"] == before["requests"] + 1
    assert after["usage"]["items"] == before["items"] + 3
    assert after["last_used_at"] is not None


async def test_stats_and_config(env):
    client, _, admin, _ = env
    stats = (await client.get("/admin/stats", headers=H(admin))).json()
    assert stats["requests"]["requests"] > 0 and stats["requests"]["items"] > 0
    assert {"p50", "p95", "p99"} <= set(stats["requests"]["latency_ms"])
    assert "rate_limit_rejections" in stats["requests"] and "/embed/text" in stats["requests"]["by_route"]
    assert "hit_rate" in stats["cache"] and "depth" in stats["queue"]
    assert any(k["requests"] > 0 for k in stats["keys"])
    cfg = (await client.get("/admin/config", headers=H(admin))).json()
    assert cfg["security"]["require_api_key"] is True and cfg["rate_limit"]["storage_uri"] == "**********"


async def test_the_store_holds_no_secret(env, data_dir):
    client, app, admin, keys = env
    app.state.key_store.flush_usage()
    # Read the files from another process: closing a descriptor to an open SQLite database in
    # this process would drop SQLite's POSIX locks (and let another connection delete the WAL).
    files = [str(p) for p in Path(data_dir).glob("keys.db*")]
    blob = subprocess.run(["cat", *files], capture_output=True, check=True).stdout
    assert blob, "no database file"
    for key in [admin, *keys.values()]:
        secret = key.split("_", 2)[2]
        assert secret.encode() not in blob and key.encode() not in blob
        assert key.split("_")[1].encode() in blob  # the public id is there: we searched the right file


async def test_concurrent_key_creation(env):
    client, _, admin, _ = env
    rs = await asyncio.gather(*(client.post("/admin/api-keys", json={"name": f"c{i}", "permissions": ["embed:text"]},
                                            headers=H(admin)) for i in range(20)))
    assert all(r.status_code == 201 for r in rs)
    assert len({r.json()["id"] for r in rs}) == 20
    ok = await asyncio.gather(*(client.post("/embed/text", json={"texts": ["c"]}, headers=H(r.json()["key"])) for r in rs))
    assert all(r.status_code == 200 for r in ok)


def test_store_concurrent_creation_from_threads(tmp_path):
    store = KeyStore(f"sqlite:///{tmp_path / 'k.db'}")
    tokens: list[str] = []
    lock = threading.Lock()

    def make(i):
        _, tok = store.create(f"t{i}", ["embed:text"])
        with lock:
            tokens.append(tok)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 16 and store.count() == 16
    assert all(store.authenticate(t).name.startswith("t") for t in tokens)


async def test_error_envelope_on_every_path(env):
    client, _, admin, keys = env
    text = H(keys["embed:text"])
    cases = [
        (400, client.post("/embed/text", json={"texts": []}, headers=text)),
        (401, client.post("/embed/text", json={"texts": ["x"]})),
        (403, client.get("/admin/stats", headers=text)),
        (404, client.get("/no/such/route", headers=text)),
        (405, client.put("/embed/text", headers=text)),
        (413, client.post("/embed/text", content=b"x" * (70 * 1024 * 1024), headers=text)),
        (415, client.post("/embed/text", content=b"x", headers={**text, "content-type": "text/plain"})),
    ]
    for status, call in cases:
        r = await call
        assert r.status_code == status, (status, r.text[:200])
        err = r.json()["error"]
        assert set(err) >= {"type", "message", "request_id"} and err["request_id"] == r.headers["x-request-id"]
        assert "Traceback" not in r.text and "/work/" not in r.text and "tke_" not in r.text


async def test_keys_survive_a_restart_and_no_second_bootstrap(tiny_dir, data_dir, env):
    client, app, admin, keys = env
    announced: list[str] = []
    # a second app on the same store (the first keeps running: like a replica, or a restart)
    async with auth_app(auth_settings(tiny_dir, data_dir), announced) as (c2, _):
        assert announced == []
        r = await c2.post("/embed/text", json={"texts": ["after restart"]}, headers=H(keys["embed:text"]))
        assert r.status_code == 200


async def test_master_key_from_the_environment(tiny_dir, tmp_path):
    announced: list[str] = []
    settings = auth_settings(tiny_dir, tmp_path, **{"security.api_key": "my-very-secret-master-key"})
    async with auth_app(settings, announced) as (client, _):
        assert announced == []  # a master key exists: no bootstrap key
        r = await client.get("/admin/api-keys", headers=H("my-very-secret-master-key"))
        assert r.status_code == 200 and r.json() == {"data": []}
        assert (await client.get("/admin/stats", headers=H("my-very-secret-master-key!"))).status_code == 401
        cfg = (await client.get("/admin/config", headers=H("my-very-secret-master-key"))).text
        assert "my-very-secret-master-key" not in cfg


async def test_rate_limits_exact_at_the_boundary_reset_and_per_key_override(tiny_dir, tmp_path):
    settings = auth_settings(tiny_dir, tmp_path, **{"rate_limit.burst": 3, "rate_limit.per_minute": 5,
                                                   "security.api_key": "master-key-for-limits-test"})
    async with auth_app(settings) as (client, app):
        master = H("master-key-for-limits-test")
        plain = (await client.post("/admin/api-keys", json={"name": "p", "permissions": ["embed:text"]},
                                   headers=master)).json()["key"]
        wide = (await client.post("/admin/api-keys", json={"name": "w", "permissions": ["embed:text"],
                                                           "rate_limits": {"burst": 6, "per_minute": 100}},
                                  headers=master)).json()["key"]
        # burst: 3 per second. Exactly 3 pass, the 4th is refused with the headers a client needs.
        statuses = []
        for i in range(4):
            r = await client.post("/embed/text", json={"texts": [f"b{i}"]}, headers=H(plain))
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429]
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 0 and r.headers["x-ratelimit-limit"] == "3"
        assert r.headers["x-ratelimit-remaining"] == "0" and int(r.headers["x-ratelimit-reset"]) > time.time() - 1
        ok = await client.post("/embed/text", json={"texts": ["w"]}, headers=H(wide))
        assert ok.status_code == 200 and "x-ratelimit-limit" in ok.headers  # a separate budget
        # the window resets: after a second the key may send again, until its per-minute limit (5)
        await asyncio.sleep(1.1)
        r4 = await client.post("/embed/text", json={"texts": ["b4"]}, headers=H(plain))
        r5 = await client.post("/embed/text", json={"texts": ["b5"]}, headers=H(plain))
        r6 = await client.post("/embed/text", json={"texts": ["b6"]}, headers=H(plain))
        assert (r4.status_code, r5.status_code, r6.status_code) == (200, 200, 429)  # 3 + 2 = 5 per minute
        # the override: 6 in a burst for the wide key
        await asyncio.sleep(1.1)
        burst = [await client.post("/embed/text", json={"texts": [f"w{i}"]}, headers=H(wide)) for i in range(7)]
        assert [r.status_code for r in burst] == [200] * 6 + [429]
        assert (await client.get("/health")).status_code == 200  # never limited
        stats = (await client.get("/admin/stats", headers=master)).json()
        assert stats["requests"]["rate_limit_rejections"] >= 3


async def test_anonymous_callers_are_limited_per_address(tiny_dir, tmp_path):
    settings = auth_settings(tiny_dir, tmp_path, **{"rate_limit.burst": 2})
    async with auth_app(settings) as (client, _):
        rs = [await client.post("/embed/text", json={"texts": ["x"]}, headers={"X-API-Key": "guess"}) for _ in range(3)]
        assert [r.status_code for r in rs] == [401, 401, 429]


async def test_query_string_keys_when_enabled(tiny_dir, tmp_path):
    settings = auth_settings(tiny_dir, tmp_path, **{"security.allow_query_key": True,
                                                   "security.api_key": "query-master-key"})
    async with auth_app(settings) as (client, _):
        assert (await client.get("/admin/api-keys?api_key=query-master-key")).status_code == 200


def test_hmac_digests_depend_on_the_server_secret(tmp_path):
    a = KeyStore(f"sqlite:///{tmp_path / 'a.db'}", server_secret="pepper-1")
    _, token = a.create("k", ["embed:text"])
    assert a.authenticate(token).name == "k"
    b = KeyStore(f"sqlite:///{tmp_path / 'a.db'}", server_secret="pepper-2")
    c = KeyStore(f"sqlite:///{tmp_path / 'a.db'}")
    from tkr_embed.auth.store import AuthFailure
    for other in (b, c):
        with pytest.raises(AuthFailure):
            other.authenticate(token)


def test_auth_off_refuses_a_public_address():
    with pytest.raises(SettingsError, match="loopback"):
        make_settings("x", **{"security.require_api_key": False, "server.host": "0.0.0.0"})
    make_settings("x", **{"security.require_api_key": False, "server.host": "::1"})
    make_settings("x", **{"security.require_api_key": True, "server.host": "0.0.0.0"})


@pytest.mark.slow
async def test_cli_and_admin_api_see_the_same_keys(env, data_dir):
    client, _, admin, _ = env
    cfg = Path(data_dir) / "cli.yaml"
    cfg.write_text(f"data_dir: {data_dir}\nsecurity:\n  require_api_key: true\n")
    cli = [sys.executable, "-m", "tkr_embed", "keys", "--config", str(cfg)]
    r = subprocess.run([*cli, "create", "--name", "from-cli", "--permissions", "embed:text"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import json
    made = json.loads(r.stdout)
    assert (await client.post("/embed/text", json={"texts": ["cli"]}, headers=H(made["key"]))).status_code == 200
    listing = (await client.get("/admin/api-keys", headers=H(admin))).json()["data"]
    assert made["id"] in {k["id"] for k in listing}
    api_made = (await client.post("/admin/api-keys", json={"name": "from-api", "permissions": ["similarity"]},
                                  headers=H(admin))).json()
    assert "id" in api_made, api_made
    r = subprocess.run([*cli, "list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert api_made["id"] in r.stdout and api_made["key"] not in r.stdout
    r = subprocess.run([*cli, "revoke", made["id"]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    r2 = await client.post("/embed/text", json={"texts": ["cli2"]}, headers=H(made["key"]))
    assert r2.status_code == 401 and "revoked" in r2.json()["error"]["message"]
    r = subprocess.run([*cli, "revoke", "000000000000"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no API key" in r.stderr


async def test_v1_permissions_follow_the_content(env):
    client, _, _, keys = env
    uri = "data:image/png;base64," + B64
    image_part = {"model": "tiny-qwen2-vl", "input": [[{"type": "image_url", "image_url": {"url": uri}}]]}
    text = {"model": "tiny-qwen2-vl", "input": "hello"}
    r = await client.post("/v1/embeddings", json=image_part, headers=H(keys["embed:text"]))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "embed:image" in r.json()["error"]["message"]
    assert (await client.post("/v1/embeddings", json=image_part, headers=H(keys["embed:image"]))).status_code == 200
    assert (await client.post("/v1/embeddings", json=text, headers=H(keys["embed:image"]))).status_code == 403
    assert (await client.post("/v1/embeddings", json=text, headers=H(keys["embed:text"]))).status_code == 200
    r = await client.post("/v1/embeddings", json=text)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert (await client.get("/v1/models", headers=H(keys["similarity"]))).status_code == 200
