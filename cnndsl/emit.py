"""`cnndsl emit`: one standalone Python module for a compiled network. It holds the sources the
runtime itself runs — the typed specs (specs.py), the kernel modules with their custom ops and
runners (kernels/, relative imports removed, private names prefixed by their module's; the ops
in a namespace of the module's own), and the step executor (runtime/steps.py) — then the network's launch steps as literals and a
torch.nn.Module that runs them. Nothing is re-implemented as text: the emitted module runs the
same steps through the same code as the compiled model. It needs only torch and triton.

Everything from the .cnn file that reaches the text is a checked identifier (layer names
match [A-Za-z_][A-Za-z0-9_.]*) or a number, written with repr(), never inside a docstring or
comment; the class name is the network's, made distinct from every name the module defines,
every keyword and builtin; layers live under names that cannot be labels."""

import ast as pyast
import builtins
import hashlib
import keyword
import re
from importlib import resources

from . import ir
from .codegen import Program, layer_spec, lower
from .plan import plan as make_plan
from .runtime.triton_module import RUNNERS

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_ALWAYS = ("fork", "redirect", "cross_entropy")  # the executor's and the loss's


def _source(key: str) -> str:
    """The text of a module by its key: "specs", "runtime.steps" or a kernel module's name."""
    package, name = {"specs": ("cnndsl", "specs"), "runtime.steps": ("cnndsl.runtime", "steps")}.get(
        key, ("cnndsl.kernels", key))
    return resources.files(package).joinpath(f"{name}.py").read_text()


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """(module key, names) of a module's relative imports: `from .x` is kernel x, `from ..specs` specs."""
    return [(node.module, [a.name for a in node.names]) for node in pyast.parse(source).body
            if isinstance(node, pyast.ImportFrom) and node.level > 0]


def _with_dependencies(keys) -> list[str]:
    """The modules and everything they import, each after its imports."""
    order = []

    def visit(key):
        if key not in order:
            for dep, _ in _imports(_source(key)):
                visit(dep)
            order.append(key)
    for key in sorted(keys):
        visit(key)
    return order


def _strip(source: str) -> str:
    """Source without relative imports and the module docstring."""
    tree = pyast.parse(source)
    lines = source.splitlines()
    drop = set()
    for i, node in enumerate(tree.body):
        relative = isinstance(node, pyast.ImportFrom) and node.level > 0
        docstring = i == 0 and isinstance(node, pyast.Expr) and isinstance(node.value, pyast.Constant)
        if relative or docstring:
            drop.update(range(node.lineno - 1, node.end_lineno))
    text = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    return re.sub(r"\n{3,}", "\n\n\n", text).strip() + "\n"


def _private_names(source: str) -> set:
    """The `_names` a module's top level defines: functions, classes and assigned names (tuple
    targets included)."""
    names = set()
    for node in pyast.parse(source).body:
        if isinstance(node, (pyast.FunctionDef, pyast.ClassDef)):
            names.add(node.name)
        for target in getattr(node, "targets", []):
            names.update(t.id for t in pyast.walk(target) if isinstance(t, pyast.Name))
    return {n for n in names if n.startswith("_")}


def _prefixed(key: str, name: str) -> str:
    return f"_{key.split('.')[-1].strip('_')}{name}"


def _sources(keys) -> str:
    """Each module's text with its private top-level names prefixed by the module's name, so
    that `_CONFIGS` of two modules cannot collide in one namespace (private names it imports
    from another module get that module's prefix)."""
    out = []
    for key in _with_dependencies(keys):
        source = _source(key)
        text = _strip(source)
        renames = {name: _prefixed(key, name) for name in _private_names(text)}
        renames.update({name: _prefixed(dep, name) for dep, names in _imports(source)
                        for name in names if name.startswith("_")})
        for name in sorted(renames, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.]){re.escape(name)}\b", renames[name], text)
        out.append(f"# ---- {key.replace('.', '/')}.py " + "-" * 60 + "\n" + text)
    return "\n\n".join(out)


def _class_name(net: ir.Network, taken: set) -> str:
    """The network's name in CamelCase (`cifar_small` -> `CifarSmall`), with `Net` added where
    that would be a keyword, a builtin or a name the module already defines (`none`, `p`,
    `cross_entropy_fn`), so that it can never shadow one."""
    words = re.findall(r"[A-Za-z0-9]+", net.name) or ["network"]
    name = "".join(w[:1].upper() + w[1:] for w in words)
    name = name if name[0].isalpha() else "Net" + name
    while keyword.iskeyword(name) or name in dir(builtins) or name in taken:
        name += "Net"
    return name


def _top_level_names(source: str) -> set:
    """Every name a module's top level binds (imports, functions, classes, assignments)."""
    names = set()
    for node in pyast.parse(source).body:
        if isinstance(node, (pyast.FunctionDef, pyast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(t.id for t in pyast.walk(node) if isinstance(t, pyast.Name) and isinstance(t.ctx, pyast.Store))
    return names


def _layers(net: ir.Network) -> list[str]:
    lines = []
    for node in net.nodes:
        spec = layer_spec(net, node)
        if spec is not None:
            assert _NAME.match(node.name), node.name
            cls, args, kwargs = spec
            ctor = f"nn.{cls}(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"
            lines.append(f"        place(self, {node.name!r}, {ctor})")
    return lines


def _steps(net: ir.Network, program: Program, runners: list[str]) -> str:
    assert _NAME.match(net.name) and "." not in net.name, net.name  # a NAME token of the grammar
    steps = "".join(f"    {step!r},\n" for step in program.forward)
    logits = "FORWARD" if program.logits == program.forward else \
        "(\n" + "".join(f"    {step!r},\n" for step in program.logits) + ")"
    return (f"\n\n# ---- the network {net.name!r}: {len(program.forward)} steps " + "-" * 40 + "\n"
            f"RUNNERS = {{f.__name__: f for f in ({', '.join(runners)},)}}\n"
            f"FORWARD = (\n{steps})\nLOGITS = {logits}\n")


def _module_class(net: ir.Network, cls: str) -> str:
    return f'''

class {cls}(nn.Module):
    """{net.name}: input {list(net.input_shape)} (N, C, H, W) -> output {list(net.output_shape)}."""

    def __init__(self):
        super().__init__()
{chr(10).join(_layers(net)) or "        pass"}
        self._p = dict(self.named_modules())  # layer name -> layer
        self._caches = {{}}  # group -> its folded eval weights

    def train(self, mode=True):
        self._caches.clear()  # (a write through .data moves no version counter: switching modes folds afresh)
        return super().train(mode)

    def _check(self, x):
        """The input the steps were planned for: a dense (N, {", ".join(map(str, net.input_shape))}) tensor, N >= 1, in the
        parameters' dtype and on their device."""
        want = {tuple(net.input_shape)!r}
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.is_nested or x.dim() != 4 \\
                or tuple(x.shape[1:]) != want or x.shape[0] == 0:
            got = (f"{{'a nested' if x.is_nested else x.layout}} tensor {{list(x.shape)}}" if x.is_nested or x.layout != torch.strided
                   else list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{net.name}: expected a dense input of shape [N, {", ".join(map(str, net.input_shape))}] with N >= 1, got {{got}}")
        like = next(self.parameters(), None)
        dtype, device = (like.dtype, like.device) if like is not None else (x.dtype, x.device)
        if x.dtype != dtype or dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.device != device:
            raise ValueError(f"{net.name}: expected a float32, float16 or bfloat16 input of the parameters' dtype and "
                             f"device ({{dtype}} on {{device}}), got {{x.dtype}} on {{x.device}}")

    def forward(self, x, logits=False):
        self._check(x)
        return run_steps(LOGITS if logits else FORWARD, x, self._p, RUNNERS, self.training, self._caches)

    def loss(self, x, target):
        """Mean cross-entropy of the logits against class indices."""
        return cross_entropy(self.forward(x, logits=True).contiguous(), target.contiguous())
'''


def emit(net: ir.Network, fuse: bool = True) -> str:
    """The standalone module's text for `net`."""
    program = lower(net, make_plan(net, fuse))
    runners = sorted({s.runner for s in program.forward} | set(_ALWAYS))
    modules = {RUNNERS[r].__module__.rsplit(".", 1)[-1] for r in runners}
    # The docstring holds no text from the .cnn file or its path; those are repr() literals below.
    header = ('"""A network generated by `cnndsl emit` (SOURCE names its file): Triton kernels,\n'
              "their custom ops and runners, the step executor and the network's launch steps. Needs\n"
              'only torch and triton; without a GPU set TRITON_INTERPRET=1 before importing."""\n\n'
              "import torch\nfrom torch import nn\n\n"
              f"SOURCE = {net.filename or '<string>'!r}\n\n")
    code = header + _sources(modules | {"specs", "runtime.steps"})
    # the names the class must not shadow: the code's, and the three the steps bind (the steps
    # themselves, a line per layer, are not parsed: 100,000 layers would take gigabytes)
    taken = _top_level_names(code) | {"RUNNERS", "FORWARD", "LOGITS"}
    body = code + _steps(net, program, runners)
    # Custom ops are global to a process: this module's live in a namespace of their own.
    namespace = "cnndsl_emitted_" + hashlib.sha256(body.encode()).hexdigest()[:16]
    body = body.replace('NAMESPACE = "cnndsl"', f"NAMESPACE = {namespace!r}", 1)
    return body + _module_class(net, _class_name(net, taken))
