"""`cnndsl lsp`, driven as an editor drives it: pygls's language client starts `python -m cnndsl
lsp` and speaks LSP over its stdio. A file with an error gets the diagnostic at the error's range,
fixed it gets none; hover shows a layer's shape, parameters and fused group; definition jumps from
a block call to its block; completion offers layer words, block names and a layer's options;
the outline lists the network, blocks and labels."""

import asyncio
import sys

import pytest
from lsprotocol import types as lsp
from pygls.lsp.client import LanguageClient

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
