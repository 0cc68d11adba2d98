import json

from .pair_list import PairList


class Input:
    """A request, or a batch of them, as DJL's Python engine hands it to a handler: properties (the model's
    options on the load call; a request's headers, and for a batch `batch_size` and every request's headers
    under `batch_NNN.`) and content (a request's query parameters and its body under "data"; for a batch,
    every request's entries under `batch_NNN.`). An empty one (no content) asks the handler to load."""

    def __init__(self, properties=None, content=()):
        self.properties = dict(properties or {})
        self.content = PairList(content)

    batch_property = "present"  # how this DJL version reads batch_size (buildkit/data/djl.yaml, batch_property)

    def is_batch(self):
        if self.batch_property == "over-1":
            return self.get_batch_size() > 1
        return "batch_size" in self.properties

    def get_batch_size(self):
        return int(self.properties.get("batch_size", "1"))

    def get_batches(self):
        if not self.is_batch():
            return [self]
        batch = [Input() for _ in range(self.get_batch_size())]
        for key, value in self.properties.items():
            if key.startswith("batch_") and key != "batch_size":
                batch[int(key[6:9])].properties[key[10:]] = value
        for key, value in self.content.pairs:
            batch[int(key[6:9])].content.add(key[10:], value)
        return batch

    def get_properties(self):
        return self.properties

    def get_property(self, key):
        return next((v for k, v in self.properties.items() if k.lower() == key.lower()), None)

    def get_content(self):
        return self.content

    def contains_key(self, key):
        return self.content.get(key) is not None

    def is_empty(self):
        return self.content.is_empty()

    def get_as_bytes(self, key=None):
        if self.content.is_empty():
            return None
        if key:
            value = self.content.get(key)
            if value is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return value
        value = self.content.get("data")
        return self.content.value_at(0) if value is None else value

    def get_as_string(self, key=None):
        return self.get_as_bytes(key=key).decode("utf-8")

    def get_as_json(self, key=None):
        return json.loads(self.get_as_string(key=key))
