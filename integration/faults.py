"""A network link the reliability tests can cut: a TCP relay between PD and an encoder.

PD is configured with the relay's address for the encoder's control plane, so
its gRPC connection really crosses it. `cut()` resets every live connection
and refuses new ones (a dropped link); `restore()` listens again on the same
port. `freeze()` stops passing bytes without closing anything (a link that
dies silently: no reset ever arrives); `thaw()` lets them through again.
NIXL's data path does not cross the relay: it connects to the address in the
encoder's agent metadata.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

from integration.servers import free_port

CHUNK = 1 << 16
CUT_WAIT_S = 2.0  # for the pumps of a cut link to close their sockets


class TcpRelay:
    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        target_host, port = target.rsplit(":", 1)
        self._target = (target_host, int(port))
        self._host = host
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self.port = free_port()  # not an ephemeral one: `restore()` binds it again later
        self._listener = socket.create_server((host, self.port))
        self._accept_thread = self._start_accepting()

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    def cut(self) -> None:
        """Reset every connection (RST, as a dead link looks) and refuse new ones."""
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        self._listener.close()
        self._accept_thread.join()
        with self._lock:
            live = list(self._live)
        for sock in live:  # each pump sees end of input and closes its pair: RST, no linger
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        # Until its pump has closed a pair, Linux still delivers what arrives after SHUT_RD:
        # a call made right after cut() could cross the "dead" link (seen once in CI).
        deadline = time.monotonic() + CUT_WAIT_S
        while self._live and time.monotonic() < deadline:
            time.sleep(0.005)

    def restore(self) -> None:
        self._listener = socket.create_server((self._host, self.port))
        self._accept_thread = self._start_accepting()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.thaw()
        if self._listener.fileno() != -1:
            self.cut()

    def _start_accepting(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(CHUNK)
                    if not data:
                        return
                    self._flowing.wait()
                    key.data.sendall(data)
        except OSError:  # reset by the other side
            return
        finally:
            selector.close()
            with self._lock:
                self._live.difference_update((a, b))
            a.close()
            b.close()
