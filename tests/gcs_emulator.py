"""A Google Cloud Storage server for the tests: PyPI's `gcp-storage-emulator` on 127.0.0.1,
taught the conditional requests that real GCS honours.

The emulator (2026.7) ignores the generation preconditions of the JSON API
(`ifGenerationMatch`, `ifGenerationNotMatch` in the query) and of the XML API
(`x-goog-if-generation-match` headers), and sends media without the `x-goog-generation` header.
Clients depend on both: TensorStore's OCDBT driver (Orbax's default layout) commits its manifest
with `ifGenerationMatch` and reads the generation back from that header, and an exclusive
create (`ifGenerationMatch=0`, gcsfs's `open(mode="xb")`) is how a lock is taken on GCS. Without
them a second writer silently overwrites the first. `_honour_preconditions` adds them in front of
the emulator's router: a failed precondition answers 412 (writes, deletes) or 304 (a read with
`ifGenerationNotMatch` that matches), as GCS does. The emulator serves one request at a time
(`http.server.HTTPServer`), so the check and the write it guards cannot interleave with another.

`python tests/gcs_emulator.py PORT BUCKET [BUCKET ...]` serves in memory until killed;
`GcsEmulator` starts that in a subprocess on a free port and gives the environment that points
gcsfs (hence `etils.epath` and TensorBoard), google-cloud-storage and TensorStore (Orbax's
array writes) at it.
"""

from __future__ import annotations

import http
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_BUCKET = "csd-bucket"   # TensorStore wants names of 3 characters or more
_OBJECT_PATHS = ("/storage/v1/b/", "/download/storage/v1/b/", "/upload/storage/v1/b/", "/b/")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _target(path: str, query: dict[str, list[str]]) -> tuple[str, str] | None:
  """(bucket, object) that a request reads or writes, or None (bucket and list requests)."""
  for prefix in _OBJECT_PATHS:
    if path.startswith(prefix):
      rest = path[len(prefix):]
      bucket, _, tail = rest.partition("/")
      if tail.startswith("o/"):
        return bucket, urllib.parse.unquote(tail[2:])
      if tail == "o" and "name" in query:   # uploads name the object in the query
        return bucket, query["name"][0]
      return None
  if path.count("/") >= 2:   # XML API: /BUCKET/OBJECT
    bucket, _, name = path.lstrip("/").partition("/")
    return bucket, urllib.parse.unquote(name)
  return None


def _honour_preconditions() -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound

  handle = server.Router.handle

  def checked(router: Any, method: str) -> None:
    request = router._request_handler
    parsed = urllib.parse.urlparse(request.path)
    query = urllib.parse.parse_qs(parsed.query)
    target = _target(parsed.path, query)
    if target is not None:
      match = (query.get("ifGenerationMatch", [None])[0]
               or request.headers.get("x-goog-if-generation-match"))
      not_match = query.get("ifGenerationNotMatch", [None])[0]
      if match is not None or not_match is not None:
        try:
          current = str(request.storage.get_file_obj(*target)["generation"])
        except NotFound:
          current = "0"   # GCS: generation 0 names an object that does not exist
        write = method in ("POST", "PUT", "DELETE", "PATCH")
        final_chunk = "upload_id" not in query or _is_final_chunk(request)
        if match is not None and current != match and (not write or final_chunk):
          return _answer(request, http.HTTPStatus.PRECONDITION_FAILED)
        if not_match is not None and current == not_match:
          status = (http.HTTPStatus.NOT_MODIFIED if not write
                    else http.HTTPStatus.PRECONDITION_FAILED)
          return _answer(request, status)
    if method == "GET" and target is not None:
      return _with_generation(router, method, target, handle)
    return handle(router, method)

  server.Router.handle = checked


def _is_final_chunk(request: Any) -> bool:
  """A resumable upload's last PUT ("Content-Range: bytes a-b/TOTAL", or no range at all)."""
  content_range = request.headers.get("Content-Range", "")
  return not content_range or not content_range.rstrip().endswith("/*")


def _with_generation(router: Any, method: str, target: tuple[str, str], handle: Any) -> None:
  """The emulator's answer, with the `x-goog-generation` header that GCS sends with media."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound

  close = server.Response.close

  def close_with_generation(response: Any) -> None:
    try:
      response["x-goog-generation"] = str(
          router._request_handler.storage.get_file_obj(*target)["generation"])
    except (NotFound, KeyError):
      pass
    close(response)

  server.Response.close = close_with_generation
  try:
    handle(router, method)
  finally:
    server.Response.close = close


def _answer(request: Any, status: http.HTTPStatus) -> None:
  body = (b"" if status == http.HTTPStatus.NOT_MODIFIED else
          b'{"error": {"code": %d, "message": "conditionNotMet"}}' % status.value)
  request.send_response(status.value, status.phrase)
  request.send_header("Content-Type", "application/json")
  request.send_header("Content-Length", str(len(body)))
  request.end_headers()
  request.wfile.write(body)


def serve(port: int, buckets: list[str]) -> None:
  import logging

  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import buckets as bucket_handlers

  logging.disable(logging.WARNING)   # it logs every request
  _honour_preconditions()
  emulator = server.create_server("127.0.0.1", port, in_memory=True)
  for bucket in buckets:
    bucket_handlers.create_bucket(bucket, emulator._storage)
  emulator.run()


class GcsEmulator:
  """The patched emulator in a subprocess: `start()`, `env`, `stop()`."""

  def __init__(self, buckets: tuple[str, ...] = (DEFAULT_BUCKET,)):
    self.buckets, self.port, self.process = buckets, free_port(), None
    self.log = None   # the server's stderr: a file, never a pipe nobody reads (it would block)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def env(self) -> dict[str, str]:
    """What points every client at the emulator (no credentials needed)."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,          # gcsfs, google-cloud-storage
        # gcsfs's experimental client first asks a gRPC control plane for each bucket's layout
        # (a 60 s time-out against a server without one): the plain JSON API client is enough.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": self.url,       # TensorStore (Orbax's array writes)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential search
    }

  def errors(self) -> str:
    """What the server wrote to stderr so far (the tracebacks of requests it failed)."""
    self.log.seek(0)
    return self.log.read().decode(errors="replace")

  def start(self) -> GcsEmulator:
    self.log = tempfile.TemporaryFile()
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(self.port), *self.buckets],
        stdout=subprocess.DEVNULL, stderr=self.log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited: {self.errors()}")
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.buckets[0]}", timeout=1)
        return self
      except OSError:
        time.sleep(0.1)
    raise RuntimeError(f"the GCS emulator did not answer on {self.url} within 30 s")

  def stop(self) -> None:
    if self.process is not None:
      self.process.kill()
      self.process.wait()
      self.process = None
      self.log.close()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2:])
