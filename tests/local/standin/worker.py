"""One rank of the DJL Serving stand-in: imports the model's entry point and calls its handle() for each
message from the server (one JSON line in, one JSON line out; bytes as base64; a streamed answer: a header
line, then one line per chunk as it comes), as DJL's Python engine calls a handler: None is answered with the
none_answer code, an exception with Output().error(str(exception)) and the handler_exception message of this
DJL version (buildkit/data/djl.yaml, behaviour). The model directory is on the path after the inherited
PYTHONPATH (model_dir_on_pythonpath); model.py is imported at the start where the version does
(model_py_at_start); a batch_size property is read as the version reads it (batch_property)."""

import argparse
import base64
import importlib
import importlib.util
import json
import os
import socket
import traceback

from djl_python.inputs import Input
from djl_python.outputs import Output


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
    parser.add_argument("--none-code", type=int, default=204)
    parser.add_argument("--error-message", default="invoke handler failure")
    parser.add_argument("--batch-property", default="present")
    parser.add_argument("--import-model-py", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    Input.batch_property = args.batch_property
    if args.import_model_py and os.path.isfile(os.path.join(args.model_dir, "model.py")):
        try:  # DJL 0.29+ looks for formatters in model.py before the handler's first call
            load_entry_point(args.model_dir, "model.py")
        except Exception:
            traceback.print_exc()
    module = load_entry_point(args.model_dir, args.entry_point)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port + rank))
    server.listen(1)
    conn, _ = server.accept()
    stream = conn.makefile("rwb")
    for line in stream:
        message = json.loads(line)
        inputs = Input(message["properties"], [(k, base64.b64decode(v)) for k, v in message["content"]])
        try:
            output = module.handle(inputs)
            if output is None:
                output = Output(code=args.none_code, message="No content")
        except Exception as exc:
            traceback.print_exc()
            output = Output().error(str(exc), message=args.error_message)
        if getattr(output, "stream_content", None) is not None:
            send_stream(stream, output)
            continue
        reply = {"code": output.code, "message": output.message, "properties": output.properties,
                 "content": [[k, base64.b64encode(bytes(v)).decode()] for k, v in output.content.pairs]}
        stream.write((json.dumps(reply) + "\n").encode())
        stream.flush()


def send_stream(stream, output):
    """An answer with stream content, as djl_python sends one (outputs.py, Output.send): the code, message and
    properties with no content entries ("stream": true here, a content count of -1 there), then every chunk as
    soon as the handler's iterator gives it, flagged whether more follow; the last one (more: false) is empty,
    or the error's text when the iterator raised."""
    header = {"code": output.code, "message": output.message, "properties": output.properties, "content": [],
              "stream": True}
    stream.write((json.dumps(header) + "\n").encode())
    stream.flush()
    for data, more in output.stream_chunks():
        stream.write((json.dumps({"chunk": base64.b64encode(data).decode(), "more": more}) + "\n").encode())
        stream.flush()


if __name__ == "__main__":
    main()
