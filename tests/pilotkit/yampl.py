"""A stand-in for the ``yampl`` message library, for tests only (the real one is not on
PyPI). The PanDA pilot's message thread (``pilot/eventservice/esprocess/esmessage.py``)
uses ``ServerSocket(name, 'local')`` with ``send_raw`` and a non-blocking
``try_recv_raw`` ((-1, None) when nothing is pending); a payload uses
``ClientSocket(name, 'local')`` with ``send_raw`` and a blocking ``recv_raw``.

One AF_UNIX stream socket per name in ``$YAMPL_SOCKET_DIR``; a frame is a 4-byte
big-endian length and the body. Like yampl's 'local' context the server is one to one;
what it sends before the payload connects is queued, and what it sends to a payload that
is gone is dropped: the pilot sends "No more events" again after the payload exited, and
a send that raised there would leave its message thread running for ever.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import tempfile
import time

_HEADER = struct.Struct("!I")


def _path(name: str) -> str:
    path = os.path.join(os.environ.get("YAMPL_SOCKET_DIR", tempfile.gettempdir()), f"yampl-{name}.sock")
    # an AF_UNIX path holds 108 bytes at most
    return path if len(path) < 100 else os.path.join(tempfile.gettempdir(), f"yampl-{name}.sock")


class _Channel:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._closed = False

    def _frame(self) -> tuple[int, bytes] | None:
        if len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) >= end:
                body, self._buffer = self._buffer[_HEADER.size : end], self._buffer[end:]
                return size, body
        return None

    def _fill(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` (None: for ever) for bytes; False if none came or the peer closed."""
        if self._sock is None or self._closed or not select.select([self._sock], [], [], timeout)[0]:
            return False
        try:
            chunk = self._sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._closed = True
            return False
        self._buffer += chunk
        return True

    def try_recv_raw(self) -> tuple[int, bytes | None]:
        while (frame := self._frame()) is None:
            if not self._fill(0):
                return -1, None
        return frame

    def recv_raw(self) -> tuple[int, bytes | None]:
        while (frame := self._frame()) is None:
            if self._closed or self._sock is None:
                return -1, None
            self._fill(None)
        return frame

    def _send_frame(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(_HEADER.pack(len(data)) + data)

    # the real bindings' str-based names
    def send(self, message: str | bytes) -> None:
        self.send_raw(message.encode() if isinstance(message, str) else message)

    def recv(self) -> tuple[int, str | None]:
        size, body = self.recv_raw()
        return size, None if body is None else body.decode()

    def try_recv(self) -> tuple[int, str | None]:
        size, body = self.try_recv_raw()
        return size, None if body is None else body.decode()

    def send_raw(self, data: bytes) -> None:
        raise NotImplementedError


class ServerSocket(_Channel):
    def __init__(self, name: str, context: str = "local") -> None:
        super().__init__()
        self.path = _path(name)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._pending: list[bytes] = []  # sent before a payload connected

    def _accept(self) -> None:
        if self._sock is not None and not self._closed:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer, self._closed = conn, b"", False
        pending, self._pending = self._pending, []
        for data in pending:
            self.send_raw(data)

    def try_recv_raw(self) -> tuple[int, bytes | None]:
        self._accept()
        return (-1, None) if self._sock is None else super().try_recv_raw()

    def send_raw(self, data: bytes) -> None:
        self._accept()
        if self._sock is None:
            self._pending.append(bytes(data))
            return
        try:
            self._send_frame(bytes(data))
        except OSError:  # the payload is gone: dropped
            self._closed = True

    def __del__(self) -> None:
        for s in (getattr(self, "_sock", None), getattr(self, "_listener", None)):
            if s is not None:
                s.close()
        try:
            os.unlink(self.path)
        except (OSError, AttributeError):
            pass


class ClientSocket(_Channel):
    def __init__(self, name: str, context: str = "local", connect_timeout: float = 30) -> None:
        super().__init__()
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(_path(name))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._sock = sock

    def send_raw(self, data: bytes) -> None:
        self._send_frame(bytes(data))

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            assert self._sock is not None
            self._sock.close()
