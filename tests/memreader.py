"""A raw reader serving prepared bytes, for tests that hand the frame reader a file made
in memory (ccd.read_amp and friends take any object with ``read_bytes(rawfile)``)."""


class BytesReader:
    """Serves ``content`` for every raw file asked for."""

    def __init__(self, content: bytes):
        self.content = content

    def read_bytes(self, rawfile) -> bytes:
        return self.content
