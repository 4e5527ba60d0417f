"""The language server's standard input, read one checked message at a time (MessageReader),
and its log as one line a record (OneLine): what `cnndsl lsp` puts between pygls and a client
that sends malformed or huge messages."""

import logging
import sys
from typing import BinaryIO

from .errors import printable
from .limits import MAX_SOURCE_CHARS

_HEADER_LINE = 1_024  # bytes of one header line; `Content-Length: N` and `Content-Type: ...` need far fewer
# The largest message read into memory: a didOpen or didChange of the longest text cnndsl accepts
# (limits.py), each character as long as JSON can write one (`\ud83d\ude00`, 12 bytes), and room
# for the rest. A longer one (a file too long to compile, opened anyway) is read in chunks and
# dropped, so the stream stays in step; a length past MAX_SKIP_BYTES is no message at all.
MAX_MESSAGE_BYTES = 12 * MAX_SOURCE_CHARS + 65_536
MAX_SKIP_BYTES = 1 << 30


class MessageReader:
    """Standard input for pygls' message loop, one checked message at a time. pygls takes a
    `Content-Length` as it is: a huge one is allocated in full (MemoryError, OverflowError), a
    malformed one (`-5`, `abc`) loses the framing and nothing is answered after it. Here a
    malformed header ends the connection, `error` saying why: once the framing is lost, the bytes
    that follow could start anywhere, so no later message could be trusted."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.pending, self.error = stream, [], None

    def readline(self) -> bytes:
        while not self.pending:
            length = self._header()
            if length is None:
                return b""  # the end of the input, or a malformed header: pygls' loop ends
            if length > MAX_MESSAGE_BYTES:
                print(f"cnndsl lsp: skipped a message of {length:,} bytes, more than the {MAX_MESSAGE_BYTES:,} the "
                      f"server reads (a .cnn text has at most {MAX_SOURCE_CHARS:,} characters)",
                      file=sys.stderr, flush=True)
                while length:
                    chunk = self.stream.read(min(length, 1 << 16))
                    if not chunk:
                        return b""
                    length -= len(chunk)
            elif length:  # an empty body is no message: nothing to hand on
                self.pending = [b"Content-Length: %d\r\n" % length, b"\r\n"]
        return self.pending.pop(0)

    def read(self, n: int) -> bytes:
        body = self.stream.read(n)
        return body if len(body) == n else b""  # cut short: the client left mid-message, pygls' loop ends

    def _header(self) -> int | None:
        """The next message's Content-Length, its headers read up to their blank line; None at the
        end of the input or on a malformed header (then self.error says which)."""
        length, headers = None, False
        while True:
            line = self.stream.readline(_HEADER_LINE + 1)
            if not line.endswith(b"\n"):  # the end of the input, or a line longer than any header
                return self._malformed(f"a header line longer than {_HEADER_LINE:,} bytes") \
                    if len(line) > _HEADER_LINE else None
            text = line.rstrip(b"\r\n")
            if not text:
                if length is not None:
                    return length
                if headers:
                    return self._malformed("a message without a Content-Length header")
                continue  # a blank line between messages says nothing
            name, colon, value = text.partition(b":")
            if not colon:
                return self._malformed(f"{text[:60].decode('utf-8', 'replace')!r} is not a header (`Name: value`)")
            headers, value = True, value.strip()
            if name.strip().lower() == b"content-length":
                if not value.isdigit():  # bytes.isdigit: ASCII digits only, so no sign, no space
                    return self._malformed(f"Content-Length {value.decode('utf-8', 'replace')[:40]!r} is not a "
                                           "number of bytes")
                length = int(value)
                if length > MAX_SKIP_BYTES:
                    return self._malformed(f"Content-Length {length:,} is larger than any message (the server "
                                           f"reads at most {MAX_MESSAGE_BYTES:,} bytes)")

    def _malformed(self, why: str) -> None:
        self.error = f"cnndsl lsp: malformed message header: {why}; the connection is closed"


MAX_LOG_CHARS = 500  # a line of the server's log: a message's text may quote a whole request


class OneLine(logging.Formatter):
    """pygls' warnings and errors as one line each: it logs a message that is not JSON, or not
    JSON-RPC, with a traceback that tells an editor's user no more than its last line."""

    def format(self, record: logging.LogRecord) -> str:
        err = record.exc_info[1] if record.exc_info else None
        why = f": {type(err).__name__}: {str(err).partition(chr(10))[0]}" if err is not None else ""
        # (pygls writes some tracebacks into the message itself, after its first line)
        return printable(f"cnndsl lsp: {record.getMessage().partition(chr(10))[0]}{why}")[:MAX_LOG_CHARS]
