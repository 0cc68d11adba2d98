import json

from .pair_list import PairList


class Output:
    """A handler's answer: a code and message, properties (e.g. content-type), and content entries."""

    def __init__(self, code=200, message="OK"):
        self.code, self.message = code, message
        self.properties = {}
        self.content = PairList()

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
