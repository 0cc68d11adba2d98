"""The part of DJL Serving's djl_python API that handlers use (Input, Output), written for the stand-in.
Not DJL's code: the same method names and meanings, over a simpler transport."""

from .inputs import Input
from .outputs import Output

__all__ = ["Input", "Output"]
