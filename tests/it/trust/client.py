"""One request to berthd from whoever runs this (the trust tests run it as uid 65534).

usage: client.py GENERATED SOCKET create ID BUNDLE STDIN STDOUT STDERR
       client.py GENERATED SOCKET create-within SECONDS ID BUNDLE STDIN STDOUT STDERR
       client.py GENERATED SOCKET exec ID UID STDOUT ARG...
       client.py GENERATED SOCKET streams N
       client.py GENERATED SOCKET unread-state CONNECTIONS CALLS SECONDS
       client.py GENERATED SOCKET upgrade
       client.py GENERATED SOCKET state
Prints "OK <detail>" or "<CODE> <message>" on one line and exits 0 either way.
"""

import socket as sockets
import sys
import time

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402

import api_pb2  # noqa: E402
import api_pb2_grpc  # noqa: E402
import daemon_pb2  # noqa: E402
import daemon_pb2_grpc  # noqa: E402


def main():
    socket, op, args = sys.argv[2], sys.argv[3], sys.argv[4:]
    channel = grpc.insecure_channel(
        "unix://" + socket, options=[("grpc.default_authority", "localhost")]
    )
    api = api_pb2_grpc.APIStub(channel)
    try:
        if op in ("create", "create-within"):
            timeout = float(args.pop(0)) if op == "create-within" else 30
            id_, bundle, stdin, stdout, stderr = args
            reply = api.CreateContainer(
                api_pb2.CreateContainerRequest(
                    id=id_, bundlePath=bundle, stdin=stdin, stdout=stdout, stderr=stderr
                ),
                timeout=timeout,
            )
            print("OK", reply.pid)
        elif op == "exec":
            id_, uid, stdout = args[:3]
            reply = api.AddProcess(
                api_pb2.AddProcessRequest(
                    id=id_,
                    user=api_pb2.User(uid=int(uid), gid=int(uid)),
                    args=args[3:],
                    cwd="/",
                    stdout=stdout,
                ),
                timeout=30,
            )
            print("OK", reply.pid)
        elif op == "streams":
            # N + 1 Events streams held open; then the first ended and one more opened: how
            # each stood ("open" or its status code).
            def opened():
                call = api.Events(api_pb2.EventsRequest())
                call.initial_metadata()
                return call

            def stood(call):
                return call.code().name if call.done() else "open"

            calls = [opened() for _ in range(int(args[0]) + 1)]
            time.sleep(0.3)
            first = ",".join(stood(call) for call in calls)
            calls[0].cancel()
            # The place comes back once berthd has seen the stream end: try for a while.
            for _ in range(50):
                again = opened()
                time.sleep(0.1)
                if stood(again) == "open":
                    break
            print("OK", first + ";" + stood(again))
        elif op == "unread-state":
            # Raw HTTP/2: CONNECTIONS connections that give their streams no window, CALLS State
            # calls on each, no answer read, all held open for SECONDS.
            connections, calls, seconds = int(args[0]), int(args[1]), float(args[2])

            def frame(kind, flags, stream, payload):
                return (
                    len(payload).to_bytes(3, "big")
                    + bytes([kind, flags])
                    + stream.to_bytes(4, "big")
                    + payload
                )

            def literal(index, value):  # without indexing, the name from the static table
                prefix = bytes([index]) if index < 15 else bytes([15, index - 15])
                return prefix + bytes([len(value)]) + value

            block = (
                b"\x83\x86"  # :method POST, :scheme http
                + literal(4, b"/types.API/State")
                + literal(1, b"localhost")
                + literal(31, b"application/grpc")
            )
            no_window = (4).to_bytes(2, "big") + (0).to_bytes(4, "big")
            held = []
            for _ in range(connections):
                s = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
                s.setsockopt(sockets.SOL_SOCKET, sockets.SO_RCVBUF, 4096)
                s.connect(socket)
                wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, no_window)
                for n in range(calls):
                    stream = 1 + 2 * n
                    wire += frame(1, 4, stream, block) + frame(0, 1, stream, bytes(5))
                s.sendall(wire)
                held.append(s)
            time.sleep(seconds)
            print("OK", connections * calls)
        elif op == "upgrade":
            reply = daemon_pb2_grpc.DaemonStub(channel).Upgrade(
                daemon_pb2.UpgradeRequest(), timeout=30
            )
            print("OK", reply.pid)
        elif op == "state":
            reply = api.State(api_pb2.StateRequest(), timeout=30)
            print("OK", len(reply.containers))
        else:
            raise SystemExit("unknown operation " + op)
    except grpc.RpcError as e:
        print(e.code().name, e.details().replace("\n", " "))


main()
