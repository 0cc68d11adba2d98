import json

from .pair_list import PairList


class Output:
    """A handler's answer: a code and message, properties (e.g. content-type), and content entries."""

    def __init__(self, code=200, message="OK"):
        self.code, self.message = code, message
        self.properties = {}
        self.content = PairList()
        self.stream_content = None  # an iterator of chunks (add_stream_content)
        self.stream_output_formatter = None

    def set_code(self, code):
        self.code = code
        return self

    def set_message(self, message):
        self.message = message
        return self

    def error(self, error, code=424, message="invoke handler failure"):
        self.code, self.message = code, message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key, val):
        self.properties[key] = val
        return self

    def get_properties(self):
        return self.properties

    def add(self, value, key=None, batch_index=None):
        if batch_index is not None:
            key = f"batch_{batch_index}.{'' if key is None else key}"
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, (bytes, bytearray)):
            value = json.dumps(value).encode("utf-8")
        self.content.add(key, bytes(value))
        return self

    def add_as_json(self, val, key=None, batch_index=None):
        return self.add(json.dumps(val), key=key, batch_index=batch_index)

    def _default_stream_output_formatter(token_texts):
        """What djl_python makes of each item of a stream by default: one {"outputs": item} JSON line."""
        return (json.dumps({"outputs": token_texts}) + "\n").encode("utf-8")

    def add_stream_content(self, stream_content, output_formatter=_default_stream_output_formatter):
        """Answer with a stream: every item of the iterator, passed through output_formatter (None: as it is),
        is sent as one chunk when it comes (djl_python outputs.py, Output.send)."""
        self.stream_content = stream_content
        self.stream_output_formatter = output_formatter
        return self

    def stream_chunks(self):
        """The chunks of a stream as djl_python sends them: (bytes, more). Items are formatted, then str is
        UTF-8, bytes as they are, anything else JSON; after the last item one empty chunk with more=False, or,
        if the iterator raised, the exception's text as that last chunk."""
        while True:
            try:
                data = next(self.stream_content)
                if self.stream_output_formatter is not None:
                    data = self.stream_output_formatter(data)
                if isinstance(data, str):
                    data = data.encode("utf-8")
                elif not isinstance(data, (bytes, bytearray)):
                    data = json.dumps(data).encode("utf-8")
                yield bytes(data), True
            except StopIteration:
                yield b"", False
                return
            except Exception as exc:  # noqa: BLE001 - djl_python logs it and sends its text as the last chunk
                yield str(exc).encode("utf-8"), False
                return
