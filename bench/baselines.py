"""The two baselines zchat is measured against: what forwarding costs with no logic.

    python bench/baselines.py c-forwarder --port P --pub-port Q
    python bench/baselines.py python-loop --port P --pub-port Q

Both bind a ROUTER for requests and a PUB for broadcasts, like the broker,
so the load generator drives them unchanged:

* ``c-forwarder``: libzmq's own zmq_proxy from the ROUTER to the PUB, the
  loop in C. A ROUTER passes on ``[routing id, frame]``, so the PUB topic is
  the sender's routing id: the load generator names its DEALERs ``all:...``
  and listeners subscribed to ``all`` receive everything. It sends no
  acknowledgement, so only delivery is checked against it.
* ``python-loop``: the least a Python broker must do: read a request, publish
  it as a one-event body on ``all``, and echo it back as the acknowledgement
  (the load generator matches acks by message id only). No JSON, no sessions,
  no batching.

Each prints "listening" on stderr when ready and runs until killed.
"""

from __future__ import annotations

import argparse
import sys

import zmq

BROADCAST_TOPIC = b"all"
# Requests read per wake-up, as broker.py does, so both loops poll as rarely.
RECV_BATCH = 1000


def c_forwarder(router: zmq.Socket, pub: zmq.Socket) -> None:
    zmq.proxy(router, pub)


def python_loop(router: zmq.Socket, pub: zmq.Socket) -> None:
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while True:
        poller.poll()
        for _ in range(RECV_BATCH):
            try:
                peer, frame = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not one frame after the routing id: ignore
                continue
            pub.send_multipart([BROADCAST_TOPIC, b"[" + frame + b"]"])
            router.send_multipart([peer, frame], zmq.NOBLOCK)


LOOPS = {"c-forwarder": c_forwarder, "python-loop": python_loop}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(LOOPS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pub-port", type=int, required=True)
    args = p.parse_args(argv)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://{args.host}:{args.port}")
    pub.bind(f"tcp://{args.host}:{args.pub_port}")
    print(f"{args.kind} listening on {args.port}/{args.pub_port}", file=sys.stderr, flush=True)
    LOOPS[args.kind](router, pub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
