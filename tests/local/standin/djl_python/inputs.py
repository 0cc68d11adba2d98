import json

from .pair_list import PairList


class Input:
    """A request (or a batch of them) with the model's properties. An empty one asks the handler to load."""

    def __init__(self, properties=None, bodies=(), key="data"):
        self.properties = dict(properties or {})
        self.content = PairList((key if len(bodies) == 1 else f"batch_{i:03d}", body.encode("utf-8"))
                                for i, body in enumerate(bodies))

    def get_properties(self):
        return self.properties

    def get_property(self, key):
        return self.properties.get(key)

    def get_content(self):
        return self.content

    def is_empty(self):
        return self.content.is_empty()

    def is_batch(self):
        return self.content.size() > 1

    def get_batch_size(self):
        return self.content.size()

    def get_batches(self):
        return [Input(self.properties, [self.content.value_at(i).decode("utf-8")], self.content.key_at(i))
                for i in range(self.content.size())]

    def get_as_bytes(self, key=None):
        return self.content.value_at(0) if not self.content.is_empty() else b""

    def get_as_string(self, key=None):
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key=None):
        return json.loads(self.get_as_string(key))
