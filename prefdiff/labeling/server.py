"""The labeling page: people label prompt groups of a trajectory dataset in a browser; every label is appended to
the durable label log (``prefdiff.labeling.label_log``) before it is acknowledged.

    python -m prefdiff.labeling.server [--workspace .] [--host 127.0.0.1] [--port 8765] [--mode pair|tag]
        [--annotators alice,bob] [--annotators-per-group 2] [--log data/labels/labels.jsonl]
    prefdiff label-server ...            (the same, through the console script)
    make label-server ARGS="--mode tag"  (the same, through make)

Defaults come from params.yaml ``label.human``; the trajectory dataset is the workspace's ``data/trajectories``.

HTTP API (JSON; errors are ``{"error": "<one line>"}`` with a 4xx status):

    GET  /                          the page (``?annotator=<name>``; ``?token=<token>`` sets the token cookie)
    GET  /api/next?annotator=A      {"state": "task", "task": {group_id, prompt, seed, mode, image_ids, images},
                                     "dataset_sha256", "progress"} or {"state": "done", "message", "progress"}
    POST /api/labels                pair: {annotator, dataset_sha256, group_id, image_ids, choice}
                                    tag:  {annotator, dataset_sha256, group_id, image_ids, tags: {id: [tags]}}
                                    -> 201 {"seq", "label", "progress"}, once the label is fsync'd
    POST /api/undo                  {annotator} -> {"seq", "undoes", "group_id", "progress"}
    GET  /api/progress[?annotator=A] {"groups_total", "groups_complete", "annotators": {name: labels}, "progress"}
    GET  /api/labels                the effective labels (log records) and the header
    GET  /summary                   an HTML summary: per annotator, per group
    GET  /images/<image_id>.png     a trajectory PNG

With a token configured (env PREFDIFF_LABEL_TOKEN) every request must carry it (``Authorization: Bearer <token>``,
the cookie the page sets, or ``?token=``), else 401; a host other than loopback requires one.
"""

from __future__ import annotations

import argparse
import hmac
import html
import ipaddress
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefdiff.config import HumanLabelParams, ParamsError, load_params
from prefdiff.data import DatasetError
from prefdiff.labeling.label_log import LabelError, LabelLog
from prefdiff.paths import Paths

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from prefdiff.data.trajectories import TrajectoryStore

TOKEN_ENV = "PREFDIFF_LABEL_TOKEN"
TOKEN_COOKIE = "prefdiff_label_token"
MAX_BODY_BYTES = 64 * 1024  # a tag label of G = 7 images is well under 1 KiB
PAGE = Path(__file__).with_name("page.html")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def token_from_env() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (ParamsError with one line)."""
    if token is None and not is_loopback(host):
        raise ParamsError(f"label.human.host {host!r} is not loopback: set {TOKEN_ENV} to a secret so every request "
                          "must carry it, or listen on 127.0.0.1")


def _page(log: LabelLog) -> str:
    config = {"dataset_sha256": log.header.dataset_sha256, "mode": log.header.mode, "tags": list(log.header.tags),
              "groups_total": log.num_groups}
    # "</" inside a <script> block would end it; JSON allows "<\/" for "</"
    return PAGE.read_text().replace("__CONFIG__", json.dumps(config).replace("</", "<\\/"))


def _summary_html(log: LabelLog) -> str:
    esc = html.escape
    labels = log.effective_labels()
    by_group: dict[int, list] = {}
    for label in labels:
        by_group.setdefault(label.group_id, []).append(label)
    counts = log.annotator_counts()
    undone = Counter(lab.annotator for lab in log.undone_labels())
    rows_a = "".join(f"<tr><td>{esc(a)}</td><td>{n}</td><td>{undone.get(a, 0)}</td></tr>" for a, n in counts.items())

    def describe(label: Any) -> str:
        if label.mode == "pair":
            first, second = label.image_ids
            what = {"first": f"{first} over {second}", "second": f"{second} over {first}", "tie": f"tie {first} = {second}"}
            return f"{esc(label.annotator)}: {what[label.choice]}"
        tagged = "; ".join(f"{i}: {', '.join(label.tags[i])}" for i in label.tagged) or "all fine"
        return f"{esc(label.annotator)}: {esc(tagged)}"

    need = log.annotators_per_group
    rows_g = "".join(
        f"<tr><td>{g['group_id']}</td><td>{esc(g['prompt'])}</td><td>{len(by_group.get(g['group_id'], []))}/{need}</td>"
        f"<td>{'<br>'.join(describe(lab) for lab in by_group.get(g['group_id'], []))}</td></tr>"
        for g in log.groups())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>prefdiff labels: summary</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}}table{{border-collapse:collapse;margin-bottom:1.5rem}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}}th{{background:#f3f3f3}}</style></head>
<body><h1>Labels: summary</h1>
<p id="totals">{log.groups_complete()} of {log.num_groups} groups complete ({need} label(s) each) ·
{len(labels)} labels in effect · mode {esc(log.header.mode)} · dataset {esc(log.header.dataset_sha256[:12])}… ·
<a href="/">back to labeling</a></p>
<h2>Annotators</h2><table id="annotators"><tr><th>annotator</th><th>labels</th><th>undone</th></tr>{rows_a}</table>
<h2>Groups</h2><table id="groups"><tr><th>group</th><th>prompt</th><th>labels</th><th>who chose what</th></tr>{rows_g}</table>
</body></html>"""


def build_app(log: LabelLog, store: TrajectoryStore, *, token: str | None = None) -> Starlette:
    """The Starlette app over an open (writer) label log and its trajectory store."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page_html = _page(log)

    # Endpoints without a body are plain functions: Starlette runs them in its thread pool, so waiting for the
    # log's lock while another request fsyncs never stalls the event loop.
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def progress_json(annotator: str) -> dict[str, Any]:
        return log.progress(annotator).as_json()

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise LabelError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise LabelError(400, f"the request body must be a JSON object, not a {type(body).__name__}")
        return body

    def page(request: Request) -> Response:
        response = HTMLResponse(page_html)
        if token is not None and request.query_params.get("token"):  # checked by the middleware already
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    def next_task(request: Request) -> Response:
        name = log.check_annotator(request.query_params.get("annotator"))
        group_id = log.next_group(name)
        progress = progress_json(name)
        if group_id is None:
            message = (f"Everything is labeled: no group is left for {name} "
                       f"({progress['groups_complete']} of {progress['groups_total']} groups complete).")
            return JSONResponse({"state": "done", "message": message, "dataset_sha256": log.header.dataset_sha256,
                                 "progress": progress})
        task = log.task(name, group_id)
        task["images"] = [f"/images/{i}.png" for i in task["image_ids"]]
        return JSONResponse({"state": "task", "task": task, "dataset_sha256": log.header.dataset_sha256,
                             "progress": progress})

    async def submit(request: Request) -> Response:
        body = await body_of(request)
        label = await run_in_threadpool(log.append, body)  # fsync off the event loop
        return JSONResponse({"seq": label.seq, "label": label.as_json(), "progress": progress_json(label.annotator)},
                            status_code=201)

    async def undo(request: Request) -> Response:
        body = await body_of(request)
        record, label = await run_in_threadpool(log.undo, body.get("annotator"))
        return JSONResponse({"seq": record.seq, "undoes": record.undoes, "group_id": label.group_id,
                             "progress": progress_json(record.annotator)})

    def progress(request: Request) -> Response:
        out: dict[str, Any] = {"groups_total": log.num_groups, "groups_complete": log.groups_complete(),
                               "annotators_per_group": log.annotators_per_group,
                               "annotators": log.annotator_counts(), "last_seq": log.last_seq}
        if "annotator" in request.query_params:
            out["progress"] = progress_json(request.query_params["annotator"])
        return JSONResponse(out)

    def labels(request: Request) -> Response:
        return JSONResponse({"header": log.header.as_json(), "labels": [lab.as_json() for lab in log.effective_labels()]})

    def summary(request: Request) -> Response:
        return HTMLResponse(_summary_html(log))

    def image(request: Request) -> Response:
        image_id = request.path_params["image_id"]
        if not 0 <= image_id < store.num_images:
            return error(404, f"unknown image {image_id}: this dataset has images 0..{store.num_images - 1}")
        return FileResponse(store.png_path(image_id), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600"})

    async def label_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LabelError)
        return error(exc.status, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    routes = [
        Route("/", page),
        Route("/api/next", next_task),
        Route("/api/labels", submit, methods=["POST"]),
        Route("/api/labels", labels, methods=["GET"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/progress", progress),
        Route("/summary", summary),
        Route("/images/{image_id:int}.png", image),
    ]
    app = Starlette(routes=routes, exception_handlers={LabelError: label_error, HTTPException: http_error},
                    max_body_size=MAX_BODY_BYTES)
    return TokenGate(app, token) if token is not None else app  # type: ignore[return-value]


class TokenGate:
    """ASGI middleware: every HTTP request must carry the token (bearer header, cookie or ?token=), else 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _presented(self, scope: dict) -> list[str]:
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        found: list[str] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.lower().startswith(b"bearer "):
                found.append(value[7:].decode("latin-1").strip())
            elif name == b"cookie":
                cookie: SimpleCookie = SimpleCookie()
                cookie.load(value.decode("latin-1"))
                if TOKEN_COOKIE in cookie:
                    found.append(cookie[TOKEN_COOKIE].value)
        found += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return found

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not any(hmac.compare_digest(t.encode(), self.token)
                                               for t in self._presented(scope)):
            body = json.dumps({"error": f"401: this server needs its token ({TOKEN_ENV}): send 'Authorization: "
                                        "Bearer <token>' or open /?token=<token> once"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


# -- CLI ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="prefdiff label-server", description="Serve the labeling page (label.human).")
    ap.add_argument("--workspace", type=Path, default=Path("."), help="the DVC workspace (params.yaml, data/)")
    ap.add_argument("--host", help="listen address (label.human.host; beyond loopback needs PREFDIFF_LABEL_TOKEN)")
    ap.add_argument("--port", type=int, help="port (label.human.port; 0 = any free port, printed)")
    ap.add_argument("--mode", help="pair | tag (label.human.mode)")
    ap.add_argument("--log", help="the label log, relative to the workspace (label.human.log)")
    ap.add_argument("--annotators-per-group", type=int, help="labels a group needs (label.human.annotators_per_group)")
    ap.add_argument("--annotators", help="comma-separated names allowed to label (default: any name)")
    return ap.parse_args(argv)


def human_params(args: argparse.Namespace) -> HumanLabelParams:
    """params.yaml's label.human with the command line's overrides, validated by the same rules."""
    human = load_params(Paths(args.workspace).params).label.human
    overrides = {k: v for k, v in {"host": args.host, "mode": args.mode, "log": args.log,
                                   "annotators_per_group": args.annotators_per_group}.items() if v is not None}
    if args.port is not None and args.port != 0:
        overrides["port"] = args.port
    if not overrides:
        return human
    from pydantic import ValidationError

    try:
        return HumanLabelParams.model_validate({**human.model_dump(), **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ParamsError(f"label.human.{key} = {first.get('input')!r}: {first['msg']}") from None


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); refused ports give one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ParamsError(f"cannot listen on {host}:{port} ({e.strerror}); stop what uses it or pass --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        human = human_params(args)
        token = token_from_env()
        check_exposure(human.host, token)  # before any heavy work
        annotators = [a.strip() for a in args.annotators.split(",") if a.strip()] if args.annotators else None
        from prefdiff.data.trajectories import TrajectoryStore

        paths = Paths(args.workspace.resolve())
        store = TrajectoryStore.open(paths.trajectories)
        log_path = Path(human.log) if Path(human.log).is_absolute() else paths.root / human.log
        log = LabelLog.open_or_create(log_path, store, mode=human.mode, tags=human.tags,
                                      trajectories=str(paths.trajectories.relative_to(paths.root)),
                                      annotators_per_group=human.annotators_per_group, annotators=annotators)
        sock = listen(human.host, 0 if args.port == 0 else human.port)
    except (ParamsError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    import uvicorn

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if human.mode == "pair" and store.images_per_group > 2:
        print(f"note: pair mode shows images 1 and 2 of each group of {store.images_per_group}; tag mode labels all "
              "of them", flush=True)
    print(f"label log: {log_path} ({len(log.effective_labels())} labels, {log.groups_complete()}/{log.num_groups} "
          f"groups complete, {human.mode} mode)", flush=True)
    print(f"labeling page: http://{shown}:{port}/" + ("  (open it once with ?token=<PREFDIFF_LABEL_TOKEN>)" if token else ""),
          flush=True)
    app = build_app(log, store, token=token)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised Ctrl-C for the caller
        pass
    finally:
        log.close()
    print(f"stopped; every acknowledged label is in {log_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
