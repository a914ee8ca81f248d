"""Zero-parse handling of data-only protobuf messages on the byte-streaming paths.

Most messages of a blob stream carry one `bytes` field and nothing else. Parsing such a message
into a protobuf object, reading the field out and building the next hop's message copies the
payload three or four times, a CPU cost paid at every hop (bench/README.md, "zero-parse
relay"). On the wire a data-only message is just ``tag, varint length, payload``, so a relay
can check that shape, take a zero-copy view of the payload, or re-tag it for a message whose
data field has another number, with at most one copy. Anything of another shape (extra fields,
a future version of the message) is left to the caller's ordinary protobuf path.

Used with gRPC method handlers / multicallables whose (de)serializer is None (raw bytes).
"""

from __future__ import annotations

_WIRE_LEN = 2  # protobuf wire type of length-delimited fields


def _tag(field: int) -> int:
    # Single-byte tags only (fields 1-15), which is what every data field here uses.
    if not 0 < field < 16:
        raise ValueError(f"field {field} needs a multi-byte tag")
    return (field << 3) | _WIRE_LEN


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def data_payload(raw: bytes, field: int) -> memoryview | None:
    """The payload of a message made of exactly one `bytes` field ``field``, as a view into
    ``raw`` (no copy); an empty view for an empty message; None for any other shape."""
    view = memoryview(raw)
    if not raw:
        return view
    if raw[0] != _tag(field):
        return None
    length = 0
    shift = 0
    pos = 1
    end = min(len(raw), 11)
    while pos < end:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    else:
        return None
    if pos + length != len(raw):
        return None
    return view[pos:]


def data_message(field: int, *pieces: bytes | memoryview) -> bytes:
    """A serialized message holding only ``pieces`` joined, in `bytes` field ``field`` (one
    copy, of the pieces together)."""
    size = sum(len(piece) for piece in pieces)
    if not size:
        return b""  # proto3 leaves an empty bytes field out
    return b"".join((bytes((_tag(field),)), varint(size), *pieces))


def retag(raw: bytes, to_field: int) -> bytes:
    """Re-tags a non-empty data-only message (checked with :func:`data_payload`) as one whose
    data field is ``to_field``.

    Both tags are one byte and the length prefix stays as it is, so this is one copy of the
    message and no parsing.
    """
    return b"".join((bytes((_tag(to_field),)), memoryview(raw)[1:]))
