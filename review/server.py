"""`kmnist-batch review OUT`: the review app, a Starlette app on uvicorn, over a finished or running predict OUT.

Security, as Jupyter does it: the server binds 127.0.0.1 unless told otherwise; a random token
(secrets.token_urlsafe) is part of the URL it prints on stdout and is required on every request, as
`?token=` once (the server answers with a cookie and sends the browser to the bare URL, so the token
leaves the address bar) or as that cookie; without it every path gets 403. The cookie is HttpOnly,
SameSite=Strict and named after the port (browsers share cookies between the ports of a host, and two
servers may run side by side). Rows are addressed by row id (a hash of their key) only: no route takes
a path, so a traversal attempt is a 404. A POST must carry JSON, which a cross-site form cannot send
without a CORS preflight that this server never grants.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
from importlib import resources
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from batch_infer.review_sheet import FONT
from kmnist_core import decisions, storage
from kmnist_core.errors import KmnistError
from kmnist_core.review import REVIEW_REASONS
from kmnist_core.storage import Location
from review import images
from review.ledger import Ledger
from review.queue import AUDIT, PAGE_SIZE, TABS, Queue, StaleIndex, open_run, parse_row_id

CLASS_KEYS = "1234567890"  # a key per class for the first ten classes (a KMNIST card has exactly ten)
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TAB_TITLES = {"error": "unreadable file", "blank": "no character", "unknown_character": "not one of the model's characters",
              "low_confidence": "the model is unsure", AUDIT: "audit: auto-accepted rows"}
MAX_DECISIONS = 1000  # per request: a page accepted in bulk is at most a few hundred


class Review:
    """What the app serves: the queue of OUT, the decisions on it, and who is deciding."""

    def __init__(self, out: Location, reviewer: str, audit_size: int = 0, seed: int = 0):
        self.out, self.reviewer, self.audit_size = out, reviewer, audit_size
        self.card = open_run(out)
        self.classes = self.card.classes.chars
        self.queue = Queue(out, self.classes, audit_size, seed)
        self.ledger = Ledger(out)
        self.queue.reset_marks(self.ledger.settled_keys())
        self.audit_figure: tuple[int, dict | None] = (-1, None)

    def sync(self, force: bool = False) -> None:
        """Pick up new shards (a running predict) and decisions published by anyone since the last look."""
        if self.queue.refresh(force):
            self.queue.reset_marks(self.ledger.settled_keys())
        changed = self.ledger.refresh(force)
        if changed:
            self.queue.mark(np.array(list(changed), np.uint64), np.array(list(changed.values()), bool))

    def tabs(self) -> list[dict]:
        counts = self.queue.counts()
        shown = [*REVIEW_REASONS, *([AUDIT] if self.audit_size else [])]
        return [{"name": t, "title": TAB_TITLES[t], **counts[t]} for t in shown]

    def audit(self) -> dict | None:
        """The measured error rate of auto-accepted rows (recomputed only when decisions were added)."""
        seen = len(self.ledger.batches)
        if self.audit_figure[0] != seen:
            summary = decisions.audit_summary(self.ledger.history(), self.card)
            self.audit_figure = (seen, summary and {**summary, "text": decisions.audit_text(summary)})
        return self.audit_figure[1]

    def info(self) -> dict:
        self.sync()
        return {"out": self.out.uri, "reviewer": self.reviewer, "model_id": self.card.model_id,
                "classes": [{"char": c, "codepoint": cp, "key": CLASS_KEYS[i] if i < len(CLASS_KEYS) else None}
                            for i, (c, cp) in enumerate(zip(self.classes, self.card.classes.codepoints))],
                "special": list(decisions.SPECIAL_LABELS), "tabs": self.tabs(), "page_size": PAGE_SIZE,
                "audit": self.audit() if self.audit_size else None}

    def page(self, tab: str, page: int, size: int) -> dict:
        self.sync()
        try:
            result = self.queue.page(tab, page, size)
        except StaleIndex:  # a shard was rewritten since the index was built
            self.sync(force=True)
            result = self.queue.page(tab, page, size)
        result["tiles"] = [self.tile(row) for row in result["tiles"]]
        result["tabs"] = self.tabs()
        return result

    def tile(self, row: dict) -> dict:
        standing = self.ledger.decision(parse_row_id(row["id"]))
        return {"id": row["id"], "tab": row["tab"], "group": row["group"], "path": row["path"],
                "rel_path": row["rel_path"], "reason": row["review_reason"], "pred_char": row["pred_char"],
                "confidence": row["confidence"], "top": list(zip(row["topk_chars"] or [], row["topk_confidences"] or [])),
                "ood_score": row["ood_score"], "error": row["error"], "error_kind": row["error_kind"],
                "on_page": images.BOX_KEY.match(row["path_bytes"]) is not None,
                "decision": None if standing is None else {"label": standing.label, "reviewer": standing.reviewer,
                                                           "kind": standing.kind}}

    def decide(self, items: list[dict]) -> dict:
        """Record decisions [{"id", "label"}] (label null withdraws); on disk when this returns."""
        ids = [item.get("id") for item in items]
        labels = [item.get("label") for item in items]
        if not all(isinstance(i, str) for i in ids) or not all(lab is None or isinstance(lab, str) for lab in labels):
            raise BadRequest(400, "each decision is {\"id\": row id, \"label\": text or null}")
        decisions.check_labels(labels, self.classes)
        rows = self.queue.rows_by_id(ids)
        unknown = [i for i, row in zip(ids, rows) if row is None]
        if unknown:
            raise BadRequest(404, f"no queued row has id {unknown[0]!r}")
        table = decisions.decision_table([
            {"key": row["path_bytes"], "path": row["path"], "label": label, "reviewer": self.reviewer,
             "kind": "audit" if row["review_reason"] is None else "review", "source": "ui",
             "model_id": row["model_id"], "run_id": row["run_id"], "pred_char": row["pred_char"],
             "confidence": row["confidence"], "review_reason": row["review_reason"]}
            for row, label in zip(rows, labels)], self.classes)
        name, changed = self.ledger.commit(table)
        self.queue.mark(np.array(list(changed), np.uint64), np.array(list(changed.values()), bool))
        return {"saved": len(items), "file": name}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TokenGate:
    """403 for every request without the token (query parameter or this server's cookie)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        cookie = f"kmnist_review_{scope['server'][1]}"
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), self.token):
            if request.method == "GET" and request.url.path == "/":
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(cookie, self.token.decode(), httponly=True, samesite="strict")
                return await response(scope, receive, send)
            return await self.app(scope, receive, send)
        held = request.cookies.get(cookie)
        if held is not None and secrets.compare_digest(held.encode(), self.token):
            return await self.app(scope, receive, send)
        response = PlainTextResponse("403: this review server needs its token: open the URL that "
                                     "`kmnist-batch review` printed\n", status_code=403)
        await response(scope, receive, send)


def static_text(name: str) -> str:
    return resources.files("review").joinpath("static", name).read_text(encoding="utf-8")


def build_app(review: Review, token: str) -> ASGIApp:
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}

    def index(request: Request) -> Response:
        return Response(static_text("index.html"), media_type="text/html; charset=utf-8",
                        headers={**headers, "Content-Security-Policy": "default-src 'self'; img-src 'self'"})

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == FONT.name:  # the kana drawn alike on every machine, Japanese fonts installed or not
            return FileResponse(FONT, media_type="font/ttf", headers={"Cache-Control": "private, max-age=86400"})
        if name not in STATIC:
            return PlainTextResponse("404: not found\n", status_code=404)
        return Response(static_text(name), media_type=STATIC[name], headers=headers)

    def info(request: Request) -> Response:
        return JSONResponse(review.info(), headers=headers)

    def queue(request: Request) -> Response:
        q = request.query_params
        tab = q.get("tab", REVIEW_REASONS[0])
        if tab not in TABS or (tab == AUDIT and not review.audit_size):
            return JSONResponse({"error": f"no tab {tab!r}"}, status_code=404)
        try:
            page, size = int(q.get("page", 0)), int(q.get("size", PAGE_SIZE))
        except ValueError:
            return JSONResponse({"error": "page and size are whole numbers"}, status_code=400)
        return JSONResponse(review.page(tab, page, size), headers=headers)

    def row_of(request: Request) -> dict | None:
        key = parse_row_id(request.path_params["row_id"].removesuffix(".png"))
        return review.queue.rows_by_id([f"{key:016x}"])[0] if key is not None else None

    def crop(request: Request) -> Response:
        row = row_of(request)
        if row is None:
            return PlainTextResponse("404: no such row\n", status_code=404)
        return Response(images.crop_png(row), media_type="image/png", headers=headers)

    def page_view(request: Request) -> Response:
        row = row_of(request)
        data = images.page_png(row) if row is not None else None
        if data is None:
            return PlainTextResponse("404: no page for this row\n", status_code=404)
        return Response(data, media_type="image/png", headers=headers)

    async def decide(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send decisions as application/json"}, status_code=415)
        try:
            body = json.loads(await request.body())
            items = body["decisions"]
            if not isinstance(items, list) or not 0 < len(items) <= MAX_DECISIONS:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": f"expected {{\"decisions\": [1 to {MAX_DECISIONS} decisions]}}"}, status_code=400)
        try:
            result = await run_in_threadpool(review.decide, [i if isinstance(i, dict) else {} for i in items])
        except KmnistError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except OSError as e:  # reviews/ not writable, disk full: the page shows the tiles as not saved
            return JSONResponse({"error": f"could not write {decisions.reviews_dir(review.out).uri}: {e}"}, status_code=503)
        return JSONResponse(result, headers=headers)

    def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("404: not found\n", status_code=404)

    app = Starlette(routes=[
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/info", info),
        Route("/api/queue", queue),
        Route("/api/crop/{row_id}", crop),
        Route("/api/page/{row_id}", page_view),
        Route("/api/decisions", decide, methods=["POST"]),
    ], exception_handlers={404: not_found})
    return TokenGate(app, token)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the URL is printed so the URL works at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KmnistError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port, or 0 for any free one)") from None
    sock.listen(128)
    return sock


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(out: str, host: str, port: int, reviewer: str, audit_size: int = 0, seed: int = 0,
          echo: Callable[[str], None] = print) -> None:
    """Serve the review app for OUT until Ctrl-C; prints the URL with its token on stdout first."""
    import uvicorn

    location = storage.resolve(out)
    review = Review(location, reviewer, audit_size, seed)
    token = secrets.token_urlsafe(32)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if host not in LOOPBACK:
        print(f"warning: --host {host} lets every machine that reaches this one on port {port} talk to the review app: "
              f"anyone with its URL (the token) sees the crops and records decisions, over plain HTTP", file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else url_host(host)
    tabs = ", ".join(f"{t['name']} {t['left']:,}/{t['total']:,}" for t in review.tabs())
    echo(f"review queue of {location.uri} (left/total): {tabs}; decisions go to {decisions.reviews_dir(location).uri} "
         f"as {reviewer}")
    echo(f"open http://{shown}:{port}/?token={token}")
    echo("Ctrl-C stops the server (every decision shown as saved is already on disk)")
    sys.stdout.flush()
    config = uvicorn.Config(build_app(review, token), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the normal way to stop
        pass
    echo(f"stopped; decisions are in {decisions.reviews_dir(location).uri}")
