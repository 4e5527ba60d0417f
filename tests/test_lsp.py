"""`cnndsl lsp`, driven as an editor drives it: pygls's language client starts `python -m cnndsl
lsp` and speaks LSP over its stdio. A file with an error gets the diagnostic at the error's range,
fixed it gets none; hover shows a layer's shape, parameters and fused group; definition jumps from
a block call to its block; completion offers layer words, block names and a layer's options;
the outline lists the network, blocks and labels."""

import asyncio
import io
import os
import subprocess
import sys
import time

import pytest
from lsprotocol import types as lsp
from pygls.lsp.client import LanguageClient

from cnndsl.api import parse_text
from cnndsl.lsp import CnnLanguageServer, _diagnostic, keep, symbols
from cnndsl.lsp_stream import (
    MAX_LOG_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_SKIP_BYTES,
    MessageReader,
)

URI = "file:///tmp/net.cnn"
BAD = "network n\ninput 3x8x8\nconv 8 3 pad=1\nflaten\ndense 4\n"
GOOD = """network n
input 3x8x8
block cbr(c) {
    conv c 3 pad=1 bias=false
    batchnorm
    relu
}
stem: cbr(8)
conv 8 3 pad=1
flatten
dense 4
"""


def _talk():
    async def session():
        client = LanguageClient("test", "1")
        published = []
        client.feature(lsp.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)(lambda params: published.append(params))
        await client.start_io(sys.executable, "-m", "cnndsl", "lsp")
        await client.initialize_async(lsp.InitializeParams(capabilities=lsp.ClientCapabilities()))
        client.initialized(lsp.InitializedParams())

        async def wait_for(n):
            for _ in range(400):
                if len(published) >= n:
                    return published[n - 1]
                await asyncio.sleep(0.025)
            raise AssertionError("no diagnostics published")

        client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            lsp.TextDocumentItem(uri=URI, language_id="cnn", version=1, text=BAD)))
        bad = await wait_for(1)
        client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            lsp.VersionedTextDocumentIdentifier(uri=URI, version=2),
            [lsp.TextDocumentContentChangeWholeDocument(text=GOOD)]))
        good = await wait_for(2)
        doc = lsp.TextDocumentIdentifier(uri=URI)
        hover = await client.text_document_hover_async(lsp.HoverParams(doc, lsp.Position(8, 2)))
        in_block = await client.text_document_hover_async(lsp.HoverParams(doc, lsp.Position(3, 6)))
        nothing = await client.text_document_hover_async(lsp.HoverParams(doc, lsp.Position(2, 20)))
        call = await client.text_document_hover_async(lsp.HoverParams(doc, lsp.Position(7, 8)))
        definition = await client.text_document_definition_async(lsp.DefinitionParams(doc, lsp.Position(7, 8)))
        words = await client.text_document_completion_async(lsp.CompletionParams(doc, lsp.Position(9, 0)))
        options = await client.text_document_completion_async(lsp.CompletionParams(doc, lsp.Position(8, 9)))
        outline = await client.text_document_document_symbol_async(lsp.DocumentSymbolParams(doc))
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        return bad, good, hover, in_block, nothing, definition, words, options, outline, call

    return asyncio.run(asyncio.wait_for(session(), 120))


@pytest.fixture(scope="module")
def answers():
    return _talk()


def test_diagnostics_follow_the_text(answers):
    bad, good = answers[:2]
    assert bad.uri == URI and len(bad.diagnostics) == 1
    d = bad.diagnostics[0]
    assert (d.range.start.line, d.range.start.character, d.range.end.character) == (3, 0, 6)
    assert "flaten" in d.message and "did you mean 'flatten'?" in d.message and d.source == "cnndsl"
    assert not good.diagnostics


def test_hover_definition_completion_and_outline(answers):
    hover, in_block, nothing, definition, words, options, outline, call = answers[2:]
    assert call.contents.value.startswith("**stem**: 3 layers -> 8x8x8")
    assert "**conv1**" in hover.contents.value and "8x8x8" in hover.contents.value
    assert "parameters 584" in hover.contents.value and "fused group" in hover.contents.value
    assert "stem.conv1" in in_block.contents.value and "8x8x8" in in_block.contents.value
    assert nothing is None
    assert (definition.range.start.line, definition.range.start.character) == (2, 6)
    labels = {i.label for i in words.items}
    assert {"conv", "maxpool", "residual", "cbr"} <= labels
    assert {"stride", "pad", "groups"} <= {i.label for i in options.items}
    assert [(s.name, s.detail) for s in outline] == [("n", "network"), ("cbr", "block"), ("stem", "label")]


# Security review, finding 10: the server answers only from the text the editor sent, never from
# a file, and a malformed message cannot crash or silence it with a traceback.
SECRET = "network secret_leak\ninput 1x8x8\nsecretword_abc 1\n"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One session in a folder (the server's working folder) that holds a .cnn file, a
    passwd-like file and a FIFO, none of which the editor opened."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "target.cnn").write_text(SECRET)
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
    os.mkfifo(folder / "pipe.cnn")
    doc = lsp.TextDocumentIdentifier((folder / "doc.cnn").as_uri())
    passwd = lsp.TextDocumentIdentifier((folder / "passwd").as_uri())

    async def session():
        client = LanguageClient("test", "1")
        published = []
        client.feature(lsp.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)(lambda params: published.append(params))
        await client.start_io(sys.executable, "-m", "cnndsl", "lsp", cwd=folder)
        await client.initialize_async(lsp.InitializeParams(capabilities=lsp.ClientCapabilities()))
        client.initialized(lsp.InitializedParams())
        client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            lsp.TextDocumentItem(uri=doc.uri, language_id="cnn", version=1, text="target.cnn")))
        found = {"outline": await client.text_document_document_symbol_async(lsp.DocumentSymbolParams(passwd)),
                 "definition": await client.text_document_definition_async(lsp.DefinitionParams(
                     passwd, lsp.Position(0, 1))),
                 "completion": await client.text_document_completion_async(lsp.CompletionParams(
                     passwd, lsp.Position(0, 0)))}
        client.text_document_did_save(lsp.DidSaveTextDocumentParams(
            lsp.TextDocumentIdentifier((folder / "pipe.cnn").as_uri())))  # read, it would block the server
        try:
            found["after the FIFO"] = await asyncio.wait_for(
                client.text_document_document_symbol_async(lsp.DocumentSymbolParams(doc)), 30)
        except TimeoutError:
            client._server.kill()  # it hangs: stop() would wait for it for ever
        else:
            await client.shutdown_async(None)
            client.exit(None)
        await client.stop()
        found["diagnostics"] = [p for p in published if p.uri == doc.uri]
        return found

    return asyncio.run(asyncio.wait_for(session(), 120))


def test_a_document_whose_text_names_a_file_is_analysed_as_text(guarded):
    [published] = guarded["diagnostics"]
    [d] = published.diagnostics
    assert d.code == "syntax error" and d.range.start.line == 0 and "unexpected 'target'" in d.message
    assert "secret" not in d.message


def test_a_file_the_editor_did_not_open_is_never_read(guarded):
    assert guarded["outline"] == [] and guarded["definition"] is None and not guarded["completion"].items


def test_saving_an_unopened_fifo_does_not_hang_the_server(guarded):
    assert guarded.get("after the FIFO") == []


def _lsp_run(data: bytes):
    return subprocess.run([sys.executable, "-m", "cnndsl", "lsp"], input=data, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("length", [b"100000000000", b"9223372036854775807", b"99999999999999999999", b"-5", b"abc"])
def test_a_malformed_content_length_closes_the_connection_with_one_line(length):
    done = _lsp_run(b"Content-Length: " + length + b"\r\n\r\n{}")
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "malformed message header: Content-Length" in err and "the connection is closed" in err


def test_a_message_that_is_not_json_is_one_line_on_stderr():
    done = _lsp_run(b"Content-Length: 5\r\n\r\n{abc}")
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err
    assert err.strip().splitlines() == [("cnndsl lsp: Unable to handle message: JSONDecodeError: Expecting property "
                                         "name enclosed in double quotes: line 1 column 2 (char 1)")]


def test_a_request_with_invalid_params_logs_one_short_line():
    """pygls writes the traceback of a request it cannot read (a negative position) into its log
    message: the server's stderr keeps that message's first line, the traceback left out."""
    init = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{}}}'
    hover = (b'{"jsonrpc":"2.0","id":2,"method":"textDocument/hover","params":{"textDocument":{"uri":'
             b'"file:///a.cnn"},"position":{"line":-5,"character":-5}}}')
    done = _lsp_run(_message(init) + _message(hover))
    err = done.stderr.decode()
    assert "Traceback" not in err and err.strip(), err
    assert all(len(line) <= MAX_LOG_CHARS for line in err.splitlines())
    assert "cnndsl lsp: Unable to deserialize message\n" in err  # (as docs/reliability.md quotes it)


def _frames(data: bytes):
    """(the bodies pygls' loop would read through a MessageReader, the reader's error)."""
    reader, bodies = MessageReader(io.BytesIO(data)), []
    while header := reader.readline():
        assert header.startswith(b"Content-Length: ") and reader.readline() == b"\r\n"
        body = reader.read(int(header[16:]))
        if not body:  # as pygls: the end of the input
            break
        bodies.append(body)
    return bodies, reader.error


def _message(body: bytes, headers: bytes = b"") -> bytes:
    return headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_the_reader_hands_on_well_formed_messages():
    assert _frames(_message(b"{}") + b"\r\n" + _message(b"[1]", b"Content-Type: x\r\n")) == ([b"{}", b"[1]"], None)
    assert _frames(b"content-length: 2\n\n{}") == ([b"{}"], None)  # any case, bare \n
    assert _frames(b"Content-Length: 0\r\n\r\n" + _message(b"{}")) == ([b"{}"], None)  # no body, no message
    assert _frames(b"Content-Length: 9\r\n\r\n{}") == ([], None)  # cut short: the client left


def test_a_message_longer_than_any_cnn_text_is_skipped_and_the_next_one_read(capsys):
    big = b"x" * (MAX_MESSAGE_BYTES + 1)
    assert _frames(_message(big) + _message(b"{}")) == ([b"{}"], None)
    assert f"skipped a message of {len(big):,} bytes" in capsys.readouterr().err


@pytest.mark.parametrize("data, why", [
    (b"Content-Length: %d\r\n\r\n" % (MAX_SKIP_BYTES + 1), "is larger than any message"),
    (b"Content-Length: 1e3\r\n\r\n", "'1e3' is not a number of bytes"),
    (b"Content-Length: +5\r\n\r\n{}", "'+5' is not a number of bytes"),
    (b"Content-Type: x\r\n\r\n{}", "a message without a Content-Length header"),
    (b"{}\r\n", "'{}' is not a header"),
    (b"X-Pad: " + b"a" * 2000 + b"\r\n", "a header line longer than 1,024 bytes"),
])
def test_a_malformed_header_ends_the_connection(data, why):
    bodies, error = _frames(_message(b"{}") + data + _message(b"{}"))
    assert bodies == [b"{}"] and why in error


def test_a_diagnostic_carries_no_escape_sequence():
    from cnndsl.errors import CnnDataError
    err = CnnDataError("refusing to unpickle \x1b]0;PWNED\x07\x1b[2Jevil.system", expected="\x1b[31mx",
                       hint="h\x1b[1A\nhint: forged")
    err.notes.append("n\x9b2J")
    message = _diagnostic(err).message
    assert not any(c in message for c in "\x1b\x07\x9b")
    assert message.split("\n") == ["refusing to unpickle ?]0;PWNED??[2Jevil.system", "expected: ?[31mx", "note: n?2J",
                                   "hint: h?[1A?hint: forged"]


def test_the_reliability_page_states_the_message_limit():
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert f"{MAX_MESSAGE_BYTES:,} bytes" in page and "1 GiB" in page and MAX_SKIP_BYTES == 1 << 30


def test_the_outline_of_a_long_document_takes_linear_time():
    """Each symbol's line was counted from the document's start: 200,000 labels took 26 s, and
    editors ask for the outline after every change."""
    source = "network a\ninput 1x4x4\n" + "a:\n" * 200_000
    start = time.monotonic()
    found = symbols(source)
    assert len(found) == 200_001 and found[-1].range.start.line == 200_001
    assert time.monotonic() - start < 8


def test_the_analyses_kept_are_bounded_by_their_layers():
    """Each open document's analysis is kept for hover until the kept layers pass the budget; then
    the least recently analysed goes (a hover analyses it again), never the newest."""
    ls = CnnLanguageServer()
    net = parse_text(GOOD)  # 7 layers
    for i in range(5):
        keep(ls, f"file:///{i}.cnn", (net, {}, []), budget=3 * len(net.nodes))
    assert list(ls.networks) == [f"file:///{i}.cnn" for i in (2, 3, 4)]
    assert ls.dropped == {"file:///0.cnn", "file:///1.cnn"}
    keep(ls, "file:///2.cnn", (net, {}, []), budget=3 * len(net.nodes))  # analysed again: the newest
    keep(ls, "file:///0.cnn", (net, {}, []), budget=3 * len(net.nodes))
    assert list(ls.networks) == [f"file:///{i}.cnn" for i in (4, 2, 0)] and ls.dropped == {f"file:///{i}.cnn" for i in (1, 3)}
    keep(ls, "file:///big.cnn", (net, {}, []), budget=len(net.nodes) - 1)  # one past the budget alone: kept
    assert list(ls.networks) == ["file:///big.cnn"]
