class PairList:
    """Ordered (key, value) pairs, as DJL's content lists (djl_python/pair_list.py: the same methods)."""

    def __init__(self, pairs=None):
        self.pairs = list(pairs or [])

    def add(self, key=None, value=None):
        self.pairs.append((key, value))

    def key_at(self, index):
        return self.pairs[index][0]

    def value_at(self, index):
        return self.pairs[index][1]

    def get(self, key):
        return next((v for k, v in self.pairs if k == key), None)

    def get_keys(self):
        return [k for k, _ in self.pairs]

    def get_values(self):
        return [v for _, v in self.pairs]

    def size(self):
        return len(self.pairs)

    def is_empty(self):
        return not self.pairs
