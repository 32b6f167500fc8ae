"""A loopback TCP forwarder: a network blip when a test cuts its connections,
and a wiretap that keeps every byte that crossed it."""

from __future__ import annotations

import socket
import threading

from procs import free_port_pair


class TcpProxy:
    """Forwards ``port`` and ``port + 1`` to a broker's pair of ports."""

    def __init__(self, target_port: int):
        self.port = free_port_pair()
        self._conns: list[socket.socket] = []
        self.captured = bytearray()  # every byte that crossed, both ways
        self._lock = threading.Lock()
        self._listeners = []
        for offset in (0, 1):
            listener = socket.create_server(("127.0.0.1", self.port + offset))
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener, target_port + offset),
                             daemon=True).start()

    @property
    def client_args(self) -> list[str]:
        return ["--port", str(self.port)]

    def _accept(self, listener: socket.socket, target: int) -> None:
        while True:
            try:
                inbound, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                outbound = socket.create_connection(("127.0.0.1", target))
            except OSError:
                inbound.close()
                continue
            with self._lock:
                self._conns += [inbound, outbound]
            for src, dst in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Break every connection now; new ones are forwarded again."""
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self.cut()
