"""The emulator's HTTP plumbing: a threaded server on 127.0.0.1, requests, responses, routing.

Standard library only (``http.server``): the emulator needs no web framework, and the project
needs no extra dependency for it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import HeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = ["Request", "Response", "Router", "Server", "multipart"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # filled by the router

    def json(self) -> Any:
        # orjson: an Anthropic batch body is up to 256 MB of JSON (its errors are ValueErrors
        # too, json.JSONDecodeError subclasses)
        return orjson.loads(self.body or b"null")

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Fault: send the headers and this many bytes of the body, then drop the connection.
    cut_after: int | None = None

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        data = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, data, {"content-type": "application/json", **(headers or {})})

    @classmethod
    def raw(cls, data: bytes, content_type: str = "application/octet-stream") -> Response:
        return cls(200, data, {"content-type": content_type})


Handler = Callable[[Request], Response]


def multipart(
    body: bytes, content_type: str
) -> tuple[dict[str, str], dict[str, tuple[str | None, bytes]]]:
    r"""A ``multipart/form-data`` body: (text fields, files as (filename, bytes)).

    The body is split at its boundary in C (``bytes.split``); only each part's few header
    lines go through :mod:`email`. (``email.parser`` on the whole body took 0.7 s for a 40 MB
    batch file: the slowest step of a big upload.)

    Example:
        >>> body = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        ...         b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        ...         b"Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--B--\r\n")
        >>> multipart(body, "multipart/form-data; boundary=B")
        ({'purpose': 'batch'}, {'file': ('a.jsonl', b'{}\n')})
    """
    header = HeaderParser().parsestr("Content-Type: " + content_type)
    boundary = header.get_param("boundary")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str | None, bytes]] = {}
    if not isinstance(boundary, str) or not boundary:
        return fields, files
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    for part in parts[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, _, content = part.partition(b"\r\n\r\n")
        headers = HeaderParser().parsestr(head.decode("utf-8", "replace").lstrip(" \t\r\n"))
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        filename = headers.get_param("filename", header="content-disposition")
        if isinstance(filename, str):
            files[name] = (filename, content)
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields, files


class Router:
    """Routes ``METHOD /path/{name}/...`` patterns to handlers; ``{name}`` matches one segment,
    ``{name:path}`` the rest of the path."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", pattern)
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        matched_path = False
        for m, regex, handler in self._routes:
            hit = regex.match(path)
            if hit:
                matched_path = True
                if m == method:
                    return handler, hit.groupdict()
        if matched_path:
            return _method_not_allowed, {}
        return None


def _method_not_allowed(request: Request) -> Response:
    return Response.json({"error": {"message": f"{request.method} not allowed"}}, 405)


class Server:
    """A threaded HTTP server bound to 127.0.0.1 only, serving one :class:`Router`."""

    def __init__(self, router: Router, port: int = 0, not_found: Handler | None = None) -> None:
        self.router = router
        self.not_found = not_found or (lambda r: Response.json({"error": "not found"}, 404))
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _handle(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(
                    method=self.command,
                    path=split.path,
                    query=parse_qs(split.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                found = server.router.find(self.command, split.path)
                try:
                    if found is None:
                        response = server.not_found(request)
                    else:
                        handler, params = found
                        request.params = params
                        response = handler(request)
                except Exception as exc:  # an emulator bug: say so, as a 500
                    response = Response.json(
                        {"error": {"message": f"emulator error: {exc!r}", "type": "server_error"}},
                        500,
                    )
                self._send(response)

            def _send(self, response: Response) -> None:
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(response.body)))
                self.end_headers()
                if response.cut_after is not None:
                    self.wfile.write(response.body[: response.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(response.body)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
