// Starts `cnndsl lsp` (the language server of cnndsl/lsp.py) for .cnn files, over stdio.
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const [command, ...args] = vscode.workspace.getConfiguration("cnndsl").get("command", ["cnndsl", "lsp"]);
  client = new LanguageClient(
    "cnndsl",
    "cnndsl",
    { command, args },
    { documentSelector: [{ scheme: "file", language: "cnn" }] }
  );
  context.subscriptions.push({ dispose: () => client && client.stop() });
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
