"""`cnndsl lsp`: a Language Server Protocol server for .cnn files (pygls, over stdio), what an
editor shows as the user types:

- diagnostics: the compiler's error at its line and columns (the same message `cnndsl check`
  prints, with its hint), on every open, change and save; none once the file compiles;
- hover on a layer: its name, word, output shape, parameters, multiply-adds per sample and the
  fused group it runs in (a line inside a block shows its first use, and how many there are);
- go to definition from a block call to its `block`;
- completion: layer words, structure words, block names, and after a layer word its options;
- document symbols: the network, its blocks and its labelled layers.

Everything is computed from the text the editor sends: nothing is written, nothing is run, no
file is read (a request about a document the editor has not opened gets an empty answer), and
standard input is read one checked message at a time (MessageReader)."""

import bisect
import logging
import re
import sys
from collections import OrderedDict
from urllib.parse import unquote

from lsprotocol import types as lsp
from pygls.lsp.server import LanguageServer

from . import __version__
from .api import parse_text
from .errors import CnnError, CnnInputError, printable
from .highlight import STRUCTURE
from .layers import LAYERS
from .limits import MAX_NODES
from .lsp_stream import MessageReader, OneLine
from .ops.base import fmt
from .plan import plan
from .shapes import macs, params

_BLOCK = re.compile(r"^[ \t]*block[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_LABEL = re.compile(r"^[ \t]*([A-Za-z_]\w*)[ \t]*:", re.MULTILINE)
_NETWORK = re.compile(r"^[ \t]*network[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z_]\w*")


# The analyses kept for hover, by their layers together: one network at the language's bound
# (some 70 MB with its plan), or many small ones; past it the least recently analysed goes, and a
# hover on its document analyses it again. (Every document the editor opens is otherwise kept.)
MAX_KEPT_LAYERS = MAX_NODES


class CnnLanguageServer(LanguageServer):
    def __init__(self):
        super().__init__("cnndsl", __version__, text_document_sync_kind=lsp.TextDocumentSyncKind.Full)
        # uri -> (Network, {node id: group index}, groups) of its last text that compiled, oldest first
        self.networks = OrderedDict()
        self.dropped = set()  # uris whose analysis `keep` let go


def keep(ls: CnnLanguageServer, uri: str, analysis: tuple, budget: int = MAX_KEPT_LAYERS) -> None:
    """Keep uri's analysis as the newest, letting the oldest go while the kept layers pass `budget`."""
    ls.networks.pop(uri, None)
    ls.networks[uri] = analysis
    ls.dropped.discard(uri)
    while len(ls.networks) > 1 and sum(len(net.nodes) for net, _, _ in ls.networks.values()) > budget:
        ls.dropped.add(ls.networks.popitem(last=False)[0])


server = CnnLanguageServer()


def _opened(ls: CnnLanguageServer, uri: str):
    """The editor's document at `uri`, None unless the editor opened it. pygls' get_text_document
    reads any other URI from disk: file:///etc/passwd would be answered with its lines, a FIFO
    would block the server, /dev/zero would fill its memory."""
    return ls.workspace.text_documents.get(unquote(uri))  # pygls keys its documents so


def _analyse(ls: CnnLanguageServer, uri: str) -> None:
    doc = _opened(ls, uri)
    if doc is None:
        return
    ls.dropped.discard(uri)
    diagnostics = []
    try:  # the text as text: api.parse would take a one-line `other.cnn` for a path and read that file
        net = parse_text(doc.source, filename=doc.filename or uri)
        groups = plan(net, True).groups
        keep(ls, uri, (net, {node.id: i for i, g in enumerate(groups) for node in g.nodes}, groups))
    except CnnError as err:
        diagnostics.append(_diagnostic(err))
    ls.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics))


def _diagnostic(err: CnnError) -> lsp.Diagnostic:
    span = err.span
    if span is None:
        start = end = lsp.Position(0, 0)
    else:
        start = lsp.Position(span.line - 1, span.column - 1)
        end = lsp.Position(span.end_line - 1, max(span.end_column - 1, span.column)) if span.end_line else start
    # Each part cleaned as CnnError.render cleans it (a name from the file can hold escape codes);
    # the line breaks between the parts are the server's own.
    message = printable(err.message) + (f"\nexpected: {printable(err.expected)}" if err.expected else "") + \
        "".join(f"\nnote: {printable(n)}" for n in err.notes) + \
        (f"\nhint: {printable(err.hint)}" if err.hint else "")
    return lsp.Diagnostic(range=lsp.Range(start, end), message=message, severity=lsp.DiagnosticSeverity.Error,
                          source="cnndsl", code=err.kind)


@server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
def _did_open(ls: CnnLanguageServer, params: lsp.DidOpenTextDocumentParams):
    _analyse(ls, params.text_document.uri)


@server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
def _did_change(ls: CnnLanguageServer, params: lsp.DidChangeTextDocumentParams):
    _analyse(ls, params.text_document.uri)


@server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)
def _did_save(ls: CnnLanguageServer, params: lsp.DidSaveTextDocumentParams):
    _analyse(ls, params.text_document.uri)


@server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
def _did_close(ls: CnnLanguageServer, params: lsp.DidCloseTextDocumentParams):
    ls.networks.pop(params.text_document.uri, None)
    ls.dropped.discard(params.text_document.uri)


def _inside(span, line: int, column: int) -> bool:
    """Whether 1-based (line, column) falls in span."""
    return span is not None and (span.line, span.column) <= (line, column) and \
        (line, column) < (span.end_line, span.end_column)


def hover_text(net, group_of, groups, line: int, column: int) -> str | None:
    """Markdown for the layer at 1-based (line, column) (a labelled block call: its layers), None
    where there is none."""
    hits = [n for n in net.nodes[1:] if _inside(n.span, line, column)]
    label = _LABEL.match(net.source.split("\n")[line - 1]) if 0 < line <= net.source.count("\n") + 1 else None
    if not hits and label:  # `stem: cbr(8)`: the layers the call made, named stem.*
        made = [n for n in net.nodes[1:] if n.name == label.group(1) or n.name.startswith(label.group(1) + ".")]
        if made:
            shape = fmt(made[-1].shape)
            return (f"**{label.group(1)}**: {len(made)} layer{'' if len(made) == 1 else 's'} -> {shape}\n\nparameters "
                    f"{sum(params(net, n) for n in made):,}, multiply-adds {sum(macs(net, n) for n in made):,} "
                    "per sample")
    if not hits:
        return None
    node = hits[0]
    shape = fmt(node.shape)
    i = group_of.get(node.id)
    group = groups[i] if i is not None else None
    lines = [f"**{node.name}**: `{node.keyword}` -> {shape}",
             f"parameters {params(net, node):,}, multiply-adds {macs(net, node):,} per sample"]
    if group is not None:
        lines.append(f"fused group {i}: {group.rule} ({'+'.join(group.ops)}), kernels "
                     f"{', '.join(group.inference) or 'none'}")
    if len(hits) > 1:
        lines.append(f"(a block's line: the first of {len(hits)} layers it makes)")
    return "\n\n".join(lines)


@server.feature(lsp.TEXT_DOCUMENT_HOVER)
def _hover(ls: CnnLanguageServer, params: lsp.HoverParams):
    uri = params.text_document.uri
    if uri in ls.dropped:  # let go for newer documents' analyses: analysed again
        _analyse(ls, uri)
    found = ls.networks.get(uri)
    if found is None:
        return None
    text = hover_text(*found, params.position.line + 1, params.position.character + 1)
    return None if text is None else lsp.Hover(contents=lsp.MarkupContent(lsp.MarkupKind.Markdown, text))


def _word_at(source: str, line: int, character: int) -> str | None:
    lines = source.split("\n")
    if line >= len(lines):
        return None
    for m in _WORD.finditer(lines[line]):
        if m.start() <= character <= m.end():
            return m.group()
    return None


def _line_starts(source: str) -> list[int]:
    """The offset of each line's first character: positions by bisection, not by counting from 0."""
    return [0, *(m.end() for m in re.finditer("\n", source))]


def _position_in(starts: list[int], offset: int) -> lsp.Position:
    line = bisect.bisect_right(starts, offset) - 1
    return lsp.Position(line, offset - starts[line])


@server.feature(lsp.TEXT_DOCUMENT_DEFINITION)
def _definition(ls: CnnLanguageServer, params: lsp.DefinitionParams):
    doc = _opened(ls, params.text_document.uri)
    if doc is None:
        return None
    word = _word_at(doc.source, params.position.line, params.position.character)
    for m in _BLOCK.finditer(doc.source):
        if m.group(1) == word:
            start = _position_in(_line_starts(doc.source), m.start(1))
            end = lsp.Position(start.line, start.character + len(word))
            return lsp.Location(uri=params.text_document.uri, range=lsp.Range(start, end))
    return None


@server.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=[" ", "("]))
def _completion(ls: CnnLanguageServer, params: lsp.CompletionParams):
    doc = _opened(ls, params.text_document.uri)
    if doc is None:
        return lsp.CompletionList(is_incomplete=False, items=[])
    line = doc.source.split("\n")[params.position.line][:params.position.character] \
        if params.position.line < doc.source.count("\n") + 1 else ""
    return lsp.CompletionList(is_incomplete=False, items=completions(doc.source, line))


def completions(source: str, line: str) -> list[lsp.CompletionItem]:
    """What may come next on `line` (the text before the cursor): a layer's options after its word,
    else layer words, structure words and the file's block names."""
    words = _WORD.findall(line.split("#", 1)[0])
    if words and words[0] in LAYERS or len(words) > 1 and words[1] in LAYERS and re.match(r"\s*\w+\s*:", line):
        word = words[0] if words[0] in LAYERS else words[1]
        return [lsp.CompletionItem(label=o.name, kind=lsp.CompletionItemKind.Property, insert_text=f"{o.name}=",
                                   detail=f"{word} option ({o.kind})") for o in LAYERS[word].options]
    items = [lsp.CompletionItem(label=w, kind=lsp.CompletionItemKind.Function, detail=f"layer ({LAYERS[w].op})")
             for w in sorted(LAYERS)]
    items += [lsp.CompletionItem(label=w, kind=lsp.CompletionItemKind.Keyword) for w in STRUCTURE]
    items += [lsp.CompletionItem(label=m.group(1), kind=lsp.CompletionItemKind.Module, detail="block")
              for m in _BLOCK.finditer(source)]
    return items


@server.feature(lsp.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
def _symbols(ls: CnnLanguageServer, params: lsp.DocumentSymbolParams):
    doc = _opened(ls, params.text_document.uri)
    return [] if doc is None else symbols(doc.source)


def symbols(source: str) -> list[lsp.DocumentSymbol]:
    """The network, its blocks and its labels, each at its name."""
    out, starts = [], _line_starts(source)
    for pattern, kind, detail in ((_NETWORK, lsp.SymbolKind.Module, "network"), (_BLOCK, lsp.SymbolKind.Function,
                                  "block"), (_LABEL, lsp.SymbolKind.Variable, "label")):
        for m in pattern.finditer(source):
            start = _position_in(starts, m.start(1))
            rng = lsp.Range(start, lsp.Position(start.line, start.character + len(m.group(1))))
            out.append(lsp.DocumentSymbol(name=m.group(1), kind=kind, range=rng, selection_range=rng, detail=detail))
    return sorted(out, key=lambda s: (s.range.start.line, s.range.start.character))


def main() -> None:
    log = logging.StreamHandler(sys.stderr)
    log.setFormatter(OneLine())
    logging.getLogger("pygls").addHandler(log)
    reader = MessageReader(sys.stdin.buffer)
    server.start_io(stdin=reader)
    if reader.error:  # after pygls' shutdown; the command line prints it as one line and exits 1
        raise CnnInputError(reader.error)
