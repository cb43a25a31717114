"""ssh ProxyCommand that reaches ``HOST PORT``: stdin to the socket, the socket to stdout.

Ray's cluster launcher has no SSH port option (``auth`` knows ``ssh_user``, ``ssh_private_key`` and
``ssh_proxy_command``; the ``ssh`` command line it builds always uses port 22). For nodes whose sshd
listens elsewhere, point the proxy command at this script (standard library only; ``nc %h PORT``
does the same where netcat is installed):

    auth:
      ssh_proxy_command: python3 /path/to/cluster_configs/ray/tcp_proxy.py %h 2222

It runs on the machine that runs ``ray up`` / ``ray submit`` / ``ray down``, not on the nodes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _pump_stdin(sock: socket.socket) -> None:
    """Copy stdin to the socket; on EOF, half-close so the server sees the end."""
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        sock.sendall(data)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: tcp_proxy.py HOST PORT", file=sys.stderr)
        return 2
    try:
        sock = socket.create_connection((argv[0], int(argv[1])), timeout=30)
    except OSError as e:
        print(f"tcp_proxy.py: cannot reach {argv[0]}:{argv[1]}: {e.strerror or e}", file=sys.stderr)
        return 255
    sock.settimeout(None)
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    out = sys.stdout.buffer
    while True:
        data = sock.recv(65536)
        if not data:
            return 0
        out.write(data)
        out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
