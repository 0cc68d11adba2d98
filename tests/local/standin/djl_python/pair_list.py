class PairList:
    """Ordered (key, value) pairs, as DJL's content lists."""

    def __init__(self, pairs=None):
        self.pairs = list(pairs or [])

    def add(self, key, value):
        self.pairs.append((key, value))

    def key_at(self, index):
        return self.pairs[index][0]

    def value_at(self, index):
        return self.pairs[index][1]

    def size(self):
        return len(self.pairs)

    def is_empty(self):
        return not self.pairs
