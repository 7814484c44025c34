"""A real gRPC peer for tests/grpc.rs (grpcio, no protoc: bytes in, bytes out).

  python grpc_peer.py serve [MAX_CONNECTION_AGE_MS]   prints its port, serves /svc/Sleep
  python grpc_peer.py call TARGET DEADLINE_S MS       one call; prints {"code", "message"|"reply"}
  python grpc_peer.py load TARGET CALLS THREADS       calls /svc/Sleep(0) concurrently; prints counts

/svc/Sleep sleeps the number of milliseconds in its request, then answers.
"""
import json
import sys
import time
from concurrent import futures

import grpc


def serve(max_age_ms):
    options = []
    if max_age_ms:
        # The server ends each connection with GOAWAY after this long.
        options = [("grpc.max_connection_age_ms", max_age_ms),
                   ("grpc.max_connection_age_grace_ms", 10000)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)

    def sleep(request, context):
        ms = int(request.decode() or "0")
        time.sleep(ms / 1000)
        return b"slept %d" % ms

    handler = grpc.method_handlers_generic_handler(
        "svc", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(channel, deadline, ms):
    try:
        reply = channel.unary_unary("/svc/Sleep")(str(ms).encode(), timeout=deadline)
        return {"code": "OK", "reply": reply.decode()}
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details() or ""}


def main():
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    elif mode == "call":
        with grpc.insecure_channel(sys.argv[2]) as channel:
            print(json.dumps(call(channel, float(sys.argv[3]), int(sys.argv[4]))), flush=True)
    elif mode == "load":
        target, calls, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        with grpc.insecure_channel(target) as channel:
            with futures.ThreadPoolExecutor(max_workers=threads) as pool:
                results = list(pool.map(lambda _: call(channel, 10, 0), range(calls)))
        codes = {}
        for r in results:
            codes[r["code"]] = codes.get(r["code"], 0) + 1
        errors = [r for r in results if r["code"] != "OK"][:3]
        print(json.dumps({"codes": codes, "examples": errors}), flush=True)


if __name__ == "__main__":
    main()
