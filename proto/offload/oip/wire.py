"""Just enough of the protobuf wire format to take a message's large bytes fields out of it without copying them.

Protobuf's parser copies a bytes field into the message, and reading it back copies it again, so a
50 MB request with raw contents took 150 MB before anything ran. A message is a sequence of fields,
each a tag (field number and wire type) and a value; `split_field` walks the top-level ones, keeps
one field's values as views of the received bytes, and leaves the rest, which is small, to protobuf.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
# A message with more top-level fields than this is left to protobuf whole: walking it in Python would take
# long (each field is one trip), and no real request has them (one per input, output and parameter).
MAX_FIELDS = 4096


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at `position` and the position after it."""
    value = shift = 0
    start = position
    while True:
        if position >= len(data) or shift > 63:
            raise DecodeError(f"a truncated or overlong varint at byte {start}")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def split_field(data: bytes, number: int) -> tuple[bytes, list[memoryview]] | None:
    """The message without its length-delimited field `number`, and that field's values, in order, as views
    of `data`; None when the message has over MAX_FIELDS top-level fields. DecodeError if it is malformed."""
    view = memoryview(data)
    rest: list[memoryview] = []
    values: list[memoryview] = []
    position, end = 0, len(data)
    while position < end:
        if len(rest) + len(values) == MAX_FIELDS:
            return None
        start = position
        tag, position = _varint(data, position)
        wire_type = tag & 7
        if wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
        value = position
        if wire_type == _VARINT:
            _, position = _varint(data, position)
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _FIXED32:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            position += length
        else:
            raise DecodeError(f"field {tag >> 3} at byte {start} has wire type {wire_type}, which proto3 never uses")
        if position > end:
            raise DecodeError(f"field {tag >> 3} at byte {start} runs past the end of the message")
        if tag >> 3 == number and wire_type == _LENGTH_DELIMITED:
            values.append(view[value:position])
        else:
            rest.append(view[start:position])
    return b"".join(rest), values
