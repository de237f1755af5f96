"""An in-process stand-in for Google Cloud Storage, for tests of gs:// paths.

Two doors to one bucket store:
- ``FakeGCS``, an fsspec filesystem registered for 'gs'/'gcs': what ``etils.epath`` opens for
  gs:// when TensorFlow is absent (its fsspec backend calls ``fsspec.filesystem('gcs')``; gcsfs
  is the real one). Used by TFDS, the metric writer, the catalogue writer and orbax's own files.
- a local HTTP server speaking the part of the GCS JSON API that TensorStore's 'gcs' driver uses
  (object GET with ranges and generation conditions, media upload, DELETE, list), which is where
  orbax writes the arrays; ``TENSORSTORE_GCS_HTTP_URL`` points TensorStore at it and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` skips authentication.
- orbax asks the bucket, through google-cloud-storage, whether it has a hierarchical namespace:
  ``installed`` answers "no" (``gcs_utils.get_bucket``; google-cloud-storage comes with gcsfs).
Object semantics where they matter: an upload appears only when it completes (close), a
cancelled upload (``discard``) leaves the old object, and there is no append.
"""

import contextlib
import http.server
import io
import json
import os
import re
import threading
import types
import urllib.parse

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.registry import known_implementations
from orbax.checkpoint._src.path import gcs_utils

_LOCK = threading.Lock()


class _Upload(io.BytesIO):
  """A pending object: invisible until close; discard cancels it."""

  def __init__(self, fs, path, fail_after_bytes):
    super().__init__()
    self.fs, self.path, self.cancelled = fs, path, False
    self.fail_after_bytes = fail_after_bytes

  def write(self, data):
    limit = self.fail_after_bytes
    if limit is not None and self.tell() + len(data) > limit:
      super().write(data[:max(limit - self.tell(), 0)])
      raise ConnectionError('upload broke')
    return super().write(data)

  def discard(self):
    self.cancelled = True

  def close(self):
    if not self.closed and not self.cancelled:
      FakeGCS.put(self.path, self.getvalue())
    super().close()


class FakeGCS(MemoryFileSystem):
  """Paths as gcsfs gives them: 'bucket/name', without the protocol (etils adds it back)."""

  protocol = ('gs', 'gcs')
  root_marker = ''
  store: dict = {}  # noqa: RUF012  'bucket/name' → MemoryFile (fsspec's convention)
  pseudo_dirs: list = ['']  # noqa: RUF012
  generations: dict = {}  # noqa: RUF012  'bucket/name' → GCS object generation
  uploads = 0  # objects written through fsspec
  fail_after_bytes = None  # an fsspec upload breaks after this many bytes

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # gcsfs's option, passed by etils
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      path = path.removeprefix(prefix)
    return path.strip('/')

  @classmethod
  def put(cls, key: str, data: bytes, *, counted: bool = True) -> int:
    with _LOCK:
      cls.store[key] = MemoryFile(None, key, data)
      generation = cls.generations[key] = max(cls.generations.values(), default=0) + 1
      cls.uploads += counted
    return generation

  def _open(self, path, mode='rb', **kwargs):
    path = self._strip_protocol(path)
    if 'a' in mode:
      raise NotImplementedError('object storage has no append')
    if 'w' not in mode:
      return super()._open(path, mode, **kwargs)
    return _Upload(self, path, self.fail_after_bytes)

  def _rm(self, path):
    super()._rm(path)
    self.generations.pop(self._strip_protocol(path), None)


class _GcsJsonApi(http.server.BaseHTTPRequestHandler):
  """GET/POST/DELETE of objects and listing, as TensorStore's GCS driver sends them."""

  protocol_version = 'HTTP/1.1'
  _OBJECT = re.compile(r'^/storage/v1/b/([^/]+)/o/(.+)$')
  _LIST = re.compile(r'^/storage/v1/b/([^/]+)/o$')
  _UPLOAD = re.compile(r'^/upload/storage/v1/b/([^/]+)/o$')

  def log_message(self, *args):
    del args

  def _reply(self, code, body=b'', headers=None):
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _request(self):
    url = urllib.parse.urlsplit(self.path)
    return url.path, dict(urllib.parse.parse_qsl(url.query))

  @staticmethod
  def _precondition(query, key):
    """None, or the status a failed ifGeneration(Not)Match condition gives."""
    current = FakeGCS.generations.get(key, 0)
    if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != current:
      return 412
    if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch']) == current:
      return 304
    return None

  def _metadata(self, key):
    bucket, name = key.split('/', 1)
    return {'bucket': bucket, 'name': name, 'generation': str(FakeGCS.generations[key]),
            'size': str(len(FakeGCS.store[key].getvalue()))}

  def do_GET(self):
    path, query = self._request()
    if match := self._OBJECT.match(path):
      key = f'{match[1]}/{urllib.parse.unquote(match[2])}'
      if key not in FakeGCS.store:
        return self._reply(404, b'{}')
      if status := self._precondition(query, key):
        return self._reply(status)
      if query.get('alt') != 'media':
        return self._reply(200, json.dumps(self._metadata(key)).encode())
      data = FakeGCS.store[key].getvalue()
      headers = {'x-goog-generation': str(FakeGCS.generations[key])}
      if byte_range := self.headers.get('Range'):
        start, stop = byte_range.split('=')[1].split('-')
        part = data[int(start):int(stop) + 1 if stop else None]
        headers['Content-Range'] = f'bytes {start}-{int(start) + len(part) - 1}/{len(data)}'
        return self._reply(206, part, headers)
      return self._reply(200, data, headers)
    if match := self._LIST.match(path):
      prefix = f'{match[1]}/'
      keys = sorted(k for k in FakeGCS.store
                    if k.startswith(prefix + query.get('prefix', ''))
                    and k[len(prefix):] >= query.get('startOffset', '')
                    and ('endOffset' not in query or k[len(prefix):] < query['endOffset']))
      items = [self._metadata(k) for k in keys]
      return self._reply(200, json.dumps({'items': items} if items else {}).encode())
    return self._reply(404, b'{}')

  def do_POST(self):
    path, query = self._request()
    data = self.rfile.read(int(self.headers.get('Content-Length', 0)))
    if not (match := self._UPLOAD.match(path)):
      return self._reply(404, b'{}')
    key = f'{match[1]}/{query["name"]}'
    if self._precondition(query, key):
      return self._reply(412, b'{}')
    FakeGCS.put(key, data, counted=False)
    return self._reply(200, json.dumps(self._metadata(key)).encode())

  def do_DELETE(self):
    path, query = self._request()
    match = self._OBJECT.match(path)
    key = f'{match[1]}/{urllib.parse.unquote(match[2])}'
    if key not in FakeGCS.store:
      return self._reply(404, b'{}')
    if self._precondition(query, key):
      return self._reply(412)
    with _LOCK:
      del FakeGCS.store[key]
      FakeGCS.generations.pop(key, None)
    return self._reply(204)


_SERVER = None


def _tensorstore_endpoint() -> str:
  """Starts the JSON API server once per process (TensorStore may read its URL only once)."""
  global _SERVER
  if _SERVER is None:
    _SERVER = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _GcsJsonApi)
    threading.Thread(target=_SERVER.serve_forever, daemon=True).start()
  return f'http://127.0.0.1:{_SERVER.server_address[1]}'


@contextlib.contextmanager
def installed():
  """gs:// goes to the fake for the body (an empty bucket store); restored afterwards."""
  saved = {p: fsspec.registry.get(p) for p in ('gs', 'gcs')}
  # EPATH_USE_TF=false: with TensorFlow installed (CI's tfds extra) etils would send gs:// to
  # tf.io.gfile, i.e. to the real Google Cloud Storage, instead of to this fsspec fake.
  env = {'TENSORSTORE_GCS_HTTP_URL': _tensorstore_endpoint(),
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake', 'EPATH_USE_TF': 'false'}
  saved_env = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  epath_gpath._is_tf_installed.cache_clear()
  for protocol in ('gs', 'gcs'):
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  FakeGCS.generations.clear()
  FakeGCS.pseudo_dirs[:] = ['']
  FakeGCS.uploads, FakeGCS.fail_after_bytes = 0, None
  real_get_bucket = gcs_utils.get_bucket
  gcs_utils.get_bucket = lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False)
  try:
    yield FakeGCS
  finally:
    gcs_utils.get_bucket = real_get_bucket
    for protocol, cls in saved.items():
      # Back to what fsspec had: the class, or the lazy 'gcsfs.GCSFileSystem' name.
      fsspec.register_implementation(
          protocol, cls or known_implementations[protocol]['class'], clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    epath_gpath._is_tf_installed.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.generations.clear()
