"""One rank of the DJL Serving stand-in: imports the model's entry point and calls its handle() for each
message from the server (one JSON line in, one JSON line out), as DJL's Python engine calls a handler."""

import argparse
import importlib
import importlib.util
import json
import os
import socket
import sys
import traceback

from djl_python.inputs import Input


def load_entry_point(model_dir, entry):
    if entry.endswith(".py"):
        spec = importlib.util.spec_from_file_location("model", os.path.join(model_dir, entry))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(entry)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--entry-point", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    sys.path.insert(0, args.model_dir)
    module = load_entry_point(args.model_dir, args.entry_point)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port + rank))
    server.listen(1)
    conn, _ = server.accept()
    stream = conn.makefile("rwb")
    properties = {}
    for line in stream:
        message = json.loads(line)
        properties = message.get("properties", properties)
        try:
            output = module.handle(Input(properties, message.get("batch", [])))
            reply = output.to_json() if output is not None else {"code": 200, "message": "OK", "content": []}
        except Exception as exc:
            traceback.print_exc()
            reply = {"exception": f"{type(exc).__name__}: {exc}"}
        stream.write((json.dumps(reply) + "\n").encode())
        stream.flush()


if __name__ == "__main__":
    main()
