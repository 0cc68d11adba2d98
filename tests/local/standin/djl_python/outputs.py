import json

from .pair_list import PairList


class Output:
    """A handler's answer: a status code and message, properties, and content pairs."""

    def __init__(self, code=200, message="OK"):
        self.code, self.message, self.error_text = code, message, None
        self.properties = {}
        self.content = PairList()

    def set_code(self, code):
        self.code = code
        return self

    def set_message(self, message):
        self.message = message
        return self

    def error(self, error, code=424, message="invoke handler failure"):
        self.code, self.message, self.error_text = code, message, error
        return self

    def add_property(self, key, val):
        self.properties[key] = val
        return self

    def add(self, value, key=None, batch_index=None):
        key = key or "data"
        if batch_index is not None:
            key = f"batch_{batch_index}.{key}"
        self.content.add(key, value if isinstance(value, str) else value.decode("utf-8"))
        return self

    def add_as_json(self, val, key=None, batch_index=None):
        return self.add(json.dumps(val), key=key, batch_index=batch_index)

    def to_json(self):
        return {"code": self.code, "message": self.message, "error": self.error_text,
                "properties": self.properties, "content": self.content.pairs}
