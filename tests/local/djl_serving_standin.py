#!/usr/bin/env python3
"""Stand-in for DJL Serving in the local test images, installed as /usr/bin/djl-serving by a real .deb.

DJL Serving's package cannot be fetched on the machines the tests run on. This answers the part of
its contract the images rely on: port 8080, GET /ping, POST /invocations, models in /opt/ml/model.
It is a test fixture, never shipped in a production image.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_DIR = os.environ.get("SM_MODEL_DIR", "/opt/ml/model")


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/ping":
            self._send(200, {"status": "Healthy", "server": "djl-serving stand-in"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/invocations":
            return self._send(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}")
        models = sorted(os.listdir(MODEL_DIR)) if os.path.isdir(MODEL_DIR) else []
        self._send(200, {"echo": payload, "models": models})

    def log_message(self, fmt, *args):
        sys.stderr.write("djl-serving stand-in: " + fmt % args + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
