"""`kmnist-batch review`: a real server process on a real socket over a real predict run (made in this
process, without Ray): the token, row ids instead of paths, labels checked against the card, decisions
on disk before the answer (kill -9 right after), two servers on one OUT, the queue listing every
flagged row exactly once, the seeded stratified audit sample, a running run's new shards, bad OUTs; and
the hardening: Host and Origin checks, security headers, the token in a URL on `GET /` only, body and
JSON limits, shards rewritten under the server, listen options, HTTPS."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.job import PredictOptions, run_predict
from kmnist_core.predictions import read_predictions
from kmnist_core.storage import resolve
from reviews import audit, stats, store
from reviews.queue import AUDIT, TABS, Queue, key_hashes, row_id
from reviews.server import Review
from tests.crop_tree import plain_tree
from tests.decisions_server import CLI, Server, make_run, self_signed
from tests.object_store import upload_tree
from tests.test_object_store import bucket, s3_env  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def run(tmp_path_factory, kmnist_dev) -> Path:
    """A finished predict run; tests review copies of it."""
    return make_run(tmp_path_factory.mktemp("review-app"), kmnist_dev.test.images)


@pytest.fixture
def out(run, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(run, copy, symlinks=True)  # an OUT links its report in
    return copy


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(out: Path, *args: str, cafile: Path | None = None) -> Server:
        started.append(Server(out, *args, cafile=cafile))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def flagged(out: Path) -> dict[str, set[str]]:
    """Row ids of the needs_review rows per reason, from the Parquet."""
    table = read_predictions(out)
    table = table.filter(table["needs_review"])
    ids: dict[str, set[str]] = {}
    for key, reason in zip(table["path_bytes"].to_pylist(), table["review_reason"].to_pylist()):
        ids.setdefault(reason, set()).add(row_id(key_hashes([key])[0]))
    return ids


def history(out: Path):
    return store.read_history(resolve(out))


def test_every_request_without_the_token_is_refused(out, servers):
    server = servers(out)
    some = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]["id"]
    for method, path in [("GET", "/"), ("GET", "/api/info"), ("GET", f"/api/crop/{some}.png"),
                         ("GET", "/static/app.js"), ("GET", "/no/such/page"), ("POST", "/api/decisions")]:
        assert server.request(method, path, token=False)[0] == 403, path
        assert server.request(method, path + "?token=not-the-token", token=False)[0] == 403, path
    status, headers, _ = server.request("GET", f"/?token={server.token}", token=False)
    assert status == 303 and headers["location"] == "/"  # the token leaves the address bar ...
    cookie = headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
    status, _, body = server.request("GET", "/api/info", headers={"Cookie": cookie}, token=False)
    assert status == 200 and json.loads(body)["out"] == str(out)  # ... and the cookie carries it
    name = cookie.split("=")[0]
    assert server.request("GET", "/api/info", headers={"Cookie": f"{name}=guess"}, token=False)[0] == 403
    assert server.post([{"id": some, "label": "お"}], token=False)[0] == 403
    assert not (out / "reviews").exists()


def test_crops_are_served_by_row_id_only(out, servers):
    server = servers(out)
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    status, headers, body = server.request("GET", f"/api/crop/{tile['id']}.png")
    assert status == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    crop = Path(tile["path"])
    for path in ["/api/crop/../../../../etc/passwd", "/api/crop/..%2F..%2F..%2Fetc%2Fpasswd",
                 f"/api/crop/{crop}", "/api/crop/" + str(crop).replace("/", "%2F"), "/static/../server.py",
                 "/static/..%2Fserver.py", "/static/index.html/../../queue.py", "/api/crop/0123456789abcdef.png",
                 f"/api/crop/{tile['id'].upper()}.png", f"/api/page/{tile['id']}.png"]:
        status, _, body = server.request("GET", path)
        assert status == 404, (path, status)
        assert b"root:" not in body and b"import" not in body


def test_labels_outside_the_card_are_refused_and_nothing_is_written(out, servers):
    server = servers(out)
    some = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]["id"]
    status, body = server.post([{"id": some, "label": "お"}, {"id": some, "label": "A"}])
    assert status == 400 and "'A' is not one of the model's characters" in body["error"]
    assert server.post([{"id": some, "label": "漢"}])[0] == 400
    assert server.post([{"id": "0123456789abcdef", "label": "お"}])[0] == 404
    assert server.post([{"id": some, "label": 3}])[0] == 400
    status, _, _ = server.request("POST", "/api/decisions", b"id=x&label=%E3%81%8A",
                                  {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415  # what a cross-site form could send
    assert history(out).num_rows == 0


def test_decisions_are_on_disk_with_what_the_reviewer_saw(out, servers, run):
    server = servers(out, "--reviewer", "ayumi", "--audit", "12")
    tiles = server.all_tiles("low_confidence")
    audited = server.all_tiles(AUDIT)[0]
    first, second, third = tiles[:3]
    status, answer = server.post([{"id": first["id"], "label": first["top"][1][0]},
                                  {"id": second["id"], "label": "not_a_character"},
                                  {"id": third["id"], "label": "unreadable"},
                                  {"id": audited["id"], "label": audited["pred_char"]}])
    assert status == 200 and answer["saved"] == 4
    assert sorted(p.name for p in (out / "reviews").iterdir()) == [answer["file"]]  # one request, one file
    saved = {r["path"]: r for r in history(out).to_pylist()}
    assert set(saved) == {first["path"], second["path"], third["path"], audited["path"]}
    r = saved[first["path"]]
    assert (r["label"], r["reviewer"], r["kind"], r["source"]) == (first["top"][1][0], "ayumi", "review", "ui")
    assert r["key"] == first["path"].encode() and r["pred_char"] == first["pred_char"]
    assert r["confidence"] == pytest.approx(first["confidence"]) and r["review_reason"] == "low_confidence"
    rows = read_predictions(run)
    assert r["model_id"] == rows["model_id"][0].as_py() and r["run_id"] == rows["run_id"][0].as_py()
    assert saved[audited["path"]]["kind"] == "audit" and saved[audited["path"]]["review_reason"] is None

    tabs = {t["name"]: t for t in server.get_json("/api/info")["tabs"]}
    assert tabs["low_confidence"]["left"] == tabs["low_confidence"]["total"] - 3
    page = server.get_json("/api/queue?tab=low_confidence&size=3")
    assert [t["decision"]["label"] for t in page["tiles"]] == [first["top"][1][0], "not_a_character", "unreadable"]

    assert server.post([{"id": first["id"], "label": None}])[0] == 200  # undo: withdrawn
    assert first["path"] not in {r["path"] for r in store.latest(history(out)).to_pylist()}
    assert server.get_json("/api/queue?tab=low_confidence&size=3")["tiles"][0]["decision"] is None
    assert len(list((out / "reviews").iterdir())) == 2
    assert server.stop() == 0  # Ctrl-C: a normal stop
    assert "stopped; decisions are in" in "".join(server.lines)


def test_kill_9_right_after_saved_answers_loses_nothing(out, servers):
    server = servers(out)
    ids = [t["id"] for tab in ("low_confidence", "unknown_character", "blank", "error") for t in server.all_tiles(tab)]
    assert len(ids) >= 16
    acknowledged: list[str] = []
    lock = threading.Lock()

    def reviewer(mine: list[str]) -> None:
        for i in mine:  # one decision per request, as fast as the server answers, until it dies
            try:
                status, _ = server.post([{"id": i, "label": "unreadable"}])
            except OSError:
                return
            if status == 200:
                with lock:
                    acknowledged.append(i)

    threads = [threading.Thread(target=reviewer, args=(ids[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < len(ids) // 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    server.kill()  # SIGKILL while requests are in flight
    for t in threads:
        t.join(timeout=60)
    on_disk = {row_id(h) for h in key_hashes(history(out)["key"].to_pylist())}
    assert set(acknowledged) <= on_disk and len(acknowledged) >= len(ids) // 2


def test_two_reviewers_on_two_servers_lose_nothing(out, servers):
    alice, bob = servers(out, "--reviewer", "alice"), servers(out, "--reviewer", "bob")
    tiles = alice.all_tiles("low_confidence")
    assert len(tiles) >= 6
    ids = [t["id"] for t in tiles]
    shared = ids[:2]
    plan = {alice: [(i, "お") for i in ids[2::2]] + [(i, "お") for i in shared],
            bob: [(i, "き") for i in ids[3::2]] + [(i, "き") for i in shared]}
    errors: list = []

    def review(server: Server) -> None:
        for i, label in plan[server]:
            status, _ = server.post([{"id": i, "label": label}])
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=review, args=(s,)) for s in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    h = history(out)
    assert h.num_rows == sum(len(p) for p in plan.values())
    assert Counter(h["reviewer"].to_pylist()) == {"alice": len(plan[alice]), "bob": len(plan[bob])}
    clash = stats.conflicts(h)
    assert sorted(row_id(k) for k in key_hashes(clash["key"].to_pylist())) == sorted(shared)
    # each server shows the other's decisions once it lists reviews/ again (at most every second)
    time.sleep(1.2)
    for server in (alice, bob):
        seen = {t["id"]: t["decision"] for t in server.all_tiles("low_confidence")}
        assert {i for i, d in seen.items() if d} == set(ids[2:]) | set(shared)
        assert {seen[i]["reviewer"] for i in ids[2:]} == {"alice", "bob"}
        tab = {t["name"]: t for t in server.get_json("/api/info")["tabs"]}["low_confidence"]
        assert tab["left"] == tab["total"] - len(set(ids[2:]) | set(shared))


def test_the_queue_lists_every_flagged_row_exactly_once_across_pages(out, servers):
    server = servers(out)
    expected = flagged(out)
    assert set(expected) >= {"low_confidence", "blank", "error"}
    tabs = {t["name"]: t for t in server.get_json("/api/info")["tabs"]}
    for reason in ("error", "blank", "unknown_character", "low_confidence"):
        tiles = server.all_tiles(reason, size=7)
        ids = [t["id"] for t in tiles]
        assert len(ids) == len(set(ids)) == tabs[reason]["total"]
        assert set(ids) == expected.get(reason, set())
        assert {t["reason"] for t in tiles} <= {reason}
        runs = [g for i, g in enumerate(t["group"] for t in tiles) if i == 0 or tiles[i - 1]["group"] != g]
        assert len(runs) == len(set(runs)), "a group is split"
        sizes = [sum(t["group"] == g for t in tiles) for g in runs]
        assert sizes == sorted(sizes, reverse=True), "largest group first"
        if reason == "low_confidence":
            for g in runs:
                conf = [t["confidence"] for t in tiles if t["group"] == g]
                assert conf == sorted(conf), "most doubtful first"
                assert all(g == "/".join(c for c, _ in t["top"][:2]) for t in tiles if t["group"] == g)
    assert AUDIT not in tabs and server.request("GET", "/api/queue?tab=audit")[0] == 404


def test_a_box_is_shown_on_its_page(tmp_path, servers):
    out = tmp_path / "pages"
    run_predict([], out, PredictOptions(manifest=str(ROOT / "examples" / "pages" / "boxes.csv"), executor="local"))
    server = servers(out, "--audit", "3")
    tiles = server.all_tiles(AUDIT) + server.all_tiles("low_confidence")
    assert tiles and all(t["on_page"] and "#xywh=" in t["path"] for t in tiles)
    for tile in tiles[:4]:
        status, headers, body = server.request("GET", f"/api/page/{tile['id']}.png")
        assert status == 200 and headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(body)) as page, Image.open(tile["path"].split("#xywh=")[0]) as source:
            assert page.size == source.size  # the whole page (small enough to show as it is)
        status, _, body = server.request("GET", f"/api/crop/{tile['id']}.png")
        assert status == 200 and body.startswith(b"\x89PNG")


def test_an_out_on_an_object_store(out, bucket, s3_env, servers):  # noqa: F811
    upload_tree(s3_env, out, bucket, "out")
    server = servers(f"s3://{bucket}/out", "--reviewer", "remote")
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    assert server.request("GET", f"/api/crop/{tile['id']}.png")[0] == 200
    status, answer = server.post([{"id": tile["id"], "label": "を"}])
    assert status == 200
    saved = store.read_history(resolve(f"s3://{bucket}/out")).to_pylist()
    assert [(r["path"], r["label"], r["reviewer"]) for r in saved] == [(tile["path"], "を", "remote")]
    assert not (out / "reviews").exists()


def test_audit_sample_is_seeded_and_stratified(out):
    card_classes = tuple("おきすつなはまやれを")
    rows = read_predictions(out)
    accepted = rows.filter(pc.invert(rows["needs_review"]))
    first = Queue(resolve(out), card_classes, audit_size=40, seed=7)
    ids = lambda q: sorted(q.rows.key[q.tabs[AUDIT].order].tolist())  # noqa: E731
    assert len(ids(first)) == 40
    assert ids(first) == ids(Queue(resolve(out), card_classes, audit_size=40, seed=7))
    assert ids(first) != ids(Queue(resolve(out), card_classes, audit_size=40, seed=8))
    assert set(ids(first)) <= set(key_hashes(accepted["path_bytes"].to_pylist()).tolist())
    assert not set(ids(first)) & set(first.rows.key[first.rows.tab != TABS.index(AUDIT)].tolist())  # no flagged row

    # stratified: each (class, confidence tercile) stratum gets its proportional share of the sample
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 10, 5000)
    conf = rng.uniform(0.9, 1.0, 5000)
    chosen = audit.draw(cls, conf, 300, seed=1)
    assert len(chosen) == len(set(chosen)) == 300
    strata = audit.strata(cls, conf)
    ids_, sizes = np.unique(strata, return_counts=True)
    got = Counter(strata[chosen].tolist())
    for s, size in zip(ids_, sizes):
        assert abs(got.get(int(s), 0) - size * 300 / 5000) < 1
    assert np.array_equal(chosen, audit.draw(cls, conf, 300, seed=1))
    assert len(audit.draw(cls[:5], conf[:5], 300, seed=1)) == 5  # N above the accepted rows: all of them


def test_a_running_run_s_new_shards_join_the_queue(run, tmp_path, kmnist_dev):
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(run.parent / "in", inputs)
    shutil.copytree(run, out, symlinks=True)
    queue = Queue(resolve(out), tuple("おきすつなはまやれを"))
    before = sum(len(t.order) for t in queue.tabs.values())
    plain_tree(inputs / "later", kmnist_dev.test.images[-300:], 300)
    run_predict([inputs], out, PredictOptions(precision="fp32", resume=True, executor="local"))
    assert queue.refresh(force=True)
    ids = {reason: {row_id(k) for k in queue.rows.key[tab.order]} for reason, tab in queue.tabs.items()}
    assert sum(len(t.order) for t in queue.tabs.values()) > before
    assert {r: v for r, v in ids.items() if v and r != AUDIT} == flagged(out)
    assert not queue.refresh(force=True)  # nothing new: no rebuild


def test_an_out_that_is_not_a_predict_run_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        r = subprocess.run([CLI, "review", str(target), "--port", "0"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "not a predict output" in r.stderr
        assert not r.stdout


def test_host_other_than_loopback_warns(out, servers):
    server = servers(out, "--host", "0.0.0.0")
    assert server.get_json("/api/info")["out"] == str(out)
    deadline = time.monotonic() + 10
    while not server.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "warning: --host 0.0.0.0" in "".join(server.errors)


# -- hardening (issue 35, item 4) -------------------------------------------------------------------------

SECURITY = {"content-security-policy": "frame-ancestors 'none'", "x-frame-options": "DENY",
            "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def secured(headers: dict) -> bool:
    """Whether an answer carries every security header (names as http.client gives them)."""
    lower = {k.lower(): v for k, v in headers.items()}
    return all(part in lower.get(name, "") for name, part in SECURITY.items())


def test_only_the_server_s_own_host_names_are_answered(out, servers):
    server = servers(out)
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert server.request("GET", "/api/info", headers={"Host": host})[0] == 200, host
    # a DNS-rebound name, another port, no port, nothing at all: a browser there never reaches the app
    for host in (f"attacker.example:{port}", f"127.0.0.1.attacker.example:{port}", f"127.0.0.1:{int(port) + 1}",
                 "127.0.0.1", f"127.0.0.1:{port}@attacker.example", ""):
        status, headers, body = server.request("GET", "/api/info", headers={"Host": host})
        assert status == 400 and secured(headers) and b"Host" in body, host
        assert server.request("POST", "/api/decisions", b"{}", {"Host": host, "Content-Type": "application/json"})[0] == 400


def test_state_changing_requests_from_another_origin_are_refused(out, servers):
    server = servers(out)
    ids = [t["id"] for t in server.get_json("/api/queue?tab=low_confidence")["tiles"]]
    own = f"http://127.0.0.1:{server.port}"
    body = lambda i: json.dumps({"decisions": [{"id": ids[i], "label": "お"}]}).encode()  # noqa: E731
    for headers in [{"Origin": "http://attacker.example"},
                    {"Origin": f"http://127.0.0.1:{int(server.port) + 1}"},  # the same site, another port
                    {"Origin": f"https://127.0.0.1:{server.port}"}, {"Origin": "null"}, {"Origin": f"{own}.attacker.example"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": own, "Sec-Fetch-Site": "cross-site"}]:
        status, answer_headers, text = server.request("POST", "/api/decisions", body(0),
                                                      {"Content-Type": "application/json", **headers})
        assert status == 403 and b"another origin" in text and secured(answer_headers), headers
    assert not (out / "reviews").exists()
    accepted = [{"Origin": own}, {"Origin": f"http://localhost:{server.port}", "Sec-Fetch-Site": "same-site"},
                {"Sec-Fetch-Site": "same-origin"}, {}]  # {}: a script, not a browser (the cookie still needed)
    for i, headers in enumerate(accepted, start=1):
        status, _, text = server.request("POST", "/api/decisions", body(i), {"Content-Type": "application/json", **headers})
        assert status == 200, (headers, text)
    assert history(out).num_rows == len(accepted)
    # reading is not changing: a foreign Origin on a GET is the token's business only
    assert server.request("GET", "/api/info", headers={"Origin": "http://attacker.example"})[0] == 200


def test_every_answer_carries_the_security_headers(out, servers):
    server = servers(out)
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    asked = [("GET", "/", None, True), ("GET", "/static/app.js", None, True), ("GET", "/static/app.css", None, True),
             ("GET", "/api/info", None, True), ("GET", "/api/queue?tab=blank", None, True),
             ("GET", f"/api/crop/{tile['id']}.png", None, True), ("GET", "/no/such/page", None, True),
             ("GET", "/api/info", None, False), ("POST", "/api/decisions", b"{", True)]
    answers = [server.request(method, path, body, {"Content-Type": "application/json"}, token=token)
               for method, path, body, token in asked]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 200, 404, 403, 400]
    for request, (status, headers, _) in zip(asked, answers):
        assert secured(headers), (request, headers)
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store", request
    # the font is the one answer that may be cached (it never changes), and it says so itself
    status, headers, _ = server.request("GET", "/static/ipaexg.ttf")
    assert status == 200 and secured(headers) and headers["cache-control"] == "private, max-age=86400"


def test_the_token_in_a_url_is_taken_only_on_get_slash(out, servers):
    server = servers(out)
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    query = f"?token={server.token}"
    for method, path in [("GET", "/api/info"), ("GET", "/static/app.js"), ("GET", f"/api/crop/{tile['id']}.png"),
                         ("GET", "/no/such/page"), ("HEAD", "/"), ("POST", "/api/decisions"), ("GET", "//")]:
        for token in (False, True):  # refused with or without the cookie: the URL is what leaks
            status, headers, body = server.request(method, path + query, json.dumps(
                {"decisions": [{"id": tile["id"], "label": "お"}]}).encode() if method == "POST" else None,
                {"Content-Type": "application/json"}, token=token)
            assert status == 403 and "set-cookie" not in {k.lower() for k in headers}, (method, path, token)
    assert not (out / "reviews").exists()
    status, headers, _ = server.request("GET", "/" + query, token=False)
    assert status == 303 and "set-cookie" in {k.lower() for k in headers}


def test_bodies_are_capped_and_must_be_plain_json(out, servers):
    server = servers(out)
    some = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]["id"]
    post = lambda body: server.request("POST", "/api/decisions", body, {"Content-Type": "application/json"})  # noqa: E731
    big = json.dumps({"decisions": [{"id": some, "label": "お", "pad": "x" * (1 << 20)}]}).encode()
    status, headers, text = post(big)  # declared by Content-Length
    assert status == 413 and secured(headers) and b"1,048,576" in text
    chunks = (b"x" * 65536 for _ in range(40))  # 2.5 MiB streamed without a Content-Length
    assert post(chunks)[0] == 413
    deep = lambda n: "[" * n + "]" * n  # noqa: E731
    for body in ["{", "\udcff", "[" * 100_000, deep(100_000), f'{{"decisions": {deep(40)}}}',
                 f'{{"decisions": [{{"id": "{some}", "label": {deep(5000)}}}]}}']:
        status, _, text = post(body.encode("utf-8", "surrogateescape"))  # "\udcff": the byte 0xff, not UTF-8
        assert status == 400 and b"decisions" in text, body[:40]
    assert not (out / "reviews").exists()
    # brackets inside strings are text, not nesting; a body just under the cap is read whole
    fine = {"decisions": [{"id": some, "label": "お", "note": "[" * 100 + "\\\"{" * 100}]}
    fine["pad"] = "y" * ((1 << 20) - len(json.dumps(fine)) - 20)
    body = json.dumps(fine).encode()
    assert len(body) <= 1 << 20 and post(body)[0] == 200
    assert history(out).num_rows == 1


def test_a_shard_rewritten_under_a_running_server_is_read_again(run, tmp_path, servers):
    out = tmp_path / "out"
    shutil.copytree(run, out, symlinks=True)
    # the shard that --retry-errors will rewrite (the one with the broken files) and its queued rows, named
    # from the Parquet before the server has read any of it
    shard = next(p for p in sorted((out / "predictions").glob("*.parquet"))
                 if "error" in pq.read_table(p, columns=["review_reason"])["review_reason"].to_pylist())
    before = pq.read_table(shard)
    queued = before.filter(before["needs_review"])
    ids = [row_id(k) for k in key_hashes(queued["path_bytes"].to_pylist())]
    server = servers(out)
    run_predict([run.parent / "in"], out, PredictOptions(precision="fp32", resume=True, retry_errors=True,
                                                         executor="local"))
    after = pq.read_table(shard, columns=["path"])["path"].to_pylist()
    assert sorted(after) == sorted(before["path"].to_pylist()) and after != before["path"].to_pylist()  # rows moved
    for i in ids:
        status, _, body = server.request("GET", f"/api/crop/{i}.png")
        assert status == 200 and body.startswith(b"\x89PNG"), (i, status, body[:200])
    status, answer = server.post([{"id": i, "label": "unreadable"} for i in ids])
    assert status == 200, answer
    assert sorted(history(out)["path"].to_pylist()) == sorted(queued["path"].to_pylist())


def publish(table, shard: Path) -> None:
    """Rewrite a shard whole, as a resume publishes one: temp file, then rename."""
    pq.write_table(table, shard.parent / ".rewrite.parquet")
    os.replace(shard.parent / ".rewrite.parquet", shard)


def test_a_shard_that_shrank_is_read_again(out):
    # a shard whose last row is queued (which row ends a shard depends on the run's timing, so one is
    # moved there): the index points past the end of the shard once it lost a row
    shard = next(p for p in sorted((out / "predictions").glob("*.parquet"))
                 if pc.any(pq.read_table(p, columns=["needs_review"])["needs_review"]).as_py())
    table = pq.read_table(shard)
    queued = pc.indices_nonzero(table["needs_review"])[0].as_py()
    order = [i for i in range(table.num_rows) if i != queued] + [queued]
    table = table.take(order)
    publish(table, shard)
    review = Review(resolve(out), "ann")
    last = row_id(key_hashes(table["path_bytes"].to_pylist()[-1:])[0])
    publish(table.slice(1), shard)
    assert review.rows_by_id([last])[0]["path"] == table["path"][-1].as_py()


def test_listen_options_that_cannot_work_are_one_error_line(out, tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    cases = [(["--host", ""], "--host takes an address"), (["--ssl-keyfile", str(key)], "go together"),
             (["--ssl-certfile", str(tmp_path / "junk.pem"), "--ssl-keyfile", str(key)], "cannot use"),
             (["--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "none.pem")], "cannot use")]
    runs = [subprocess.Popen([CLI, "review", str(out), "--port", "0", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for args, _ in cases]  # side by side: each starts Python
    try:
        for (args, says), proc in zip(cases, runs):
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), (args, stderr)
            assert says in stderr and not stdout, args
    finally:  # one that serves after all is stopped, not left behind
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_https_with_a_certificate(out, tmp_path, servers):
    cert, key = self_signed(tmp_path)
    server = servers(out, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), cafile=cert)
    assert server.base.startswith("https://127.0.0.1:")
    status, headers, _ = server.request("GET", f"/?token={server.token}", token=False)
    assert status == 303 and "; secure" in headers["set-cookie"].lower()  # the cookie never travels in clear
    assert server.get_json("/api/info")["out"] == str(out)
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    body = json.dumps({"decisions": [{"id": tile["id"], "label": "お"}]}).encode()
    own = {"Content-Type": "application/json", "Origin": f"https://localhost:{server.port}"}
    assert server.request("POST", "/api/decisions", body, {**own, "Origin": f"http://127.0.0.1:{server.port}"})[0] == 403
    assert server.request("POST", "/api/decisions", body, own)[0] == 200
    plain = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    with pytest.raises(ConnectionResetError):  # plain HTTP on the TLS port gets no answer
        plain.request("GET", "/")
        plain.getresponse()
    plain.close()
