"""Layer names: the scope that names each layer (labels, automatic names, duplicates) and
the labels no layer may take because the compiled torch.nn.Module needs those attributes."""

from dataclasses import dataclass, field

from .errors import CnnNameError, Span

# Attributes of the compiled model (a torch.nn.Module) and of the modules under it: a layer
# placed under one of these names would shadow it, so no label may take one (and none may
# start with `_`, Python's private names). tests/test_names.py checks the list against the
# installed torch and the emitted module; the runtime still refuses a name a newer torch adds.
MODULE_ATTRIBUTES = frozenset({
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "caches", "call_super_init",
    "check_input", "check_target", "children", "compile", "cpu", "cuda", "device", "double", "dtype",
    "dump_patches", "eval", "extra_repr", "float", "forward", "frozen_bn", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "half", "ipu", "layers", "load_state_dict", "logits", "loss",
    "loss_and_logits", "modules", "mtia", "named_buffers", "named_children", "named_modules",
    "named_parameters", "net", "parameters", "plan", "program", "register_backward_hook", "register_buffer",
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter",
    "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
    "set_submodule", "share_memory", "state_dict", "steps", "to", "to_empty", "train", "training", "type",
    "xpu", "zero_grad",
})


def check_label(label: str, span: Span) -> None:
    """Refuse a label that would shadow an attribute of the compiled model."""
    if label.startswith("_"):
        raise CnnNameError(f"layer name {label!r} starts with '_', which is reserved for Python's internals",
                           span, hint=f"choose another label, e.g. {label.lstrip('_') or 'layer'!r}")
    if label in MODULE_ATTRIBUTES:
        raise CnnNameError(f"layer name {label!r} is reserved: the compiled model (a torch.nn.Module) has an "
                           "attribute of that name", span, hint=f"choose another label, e.g. '{label}_layer'")


@dataclass
class Scope:
    """Names inside one block call or residual: `prefix.name`, each unique."""

    prefix: str
    taken: set = field(default_factory=set)  # names used, and reserved ones (`add` in a residual)
    heads: set = field(default_factory=set)  # `d` for every `d.0` taken (a repeated `d:`)
    counters: dict = field(default_factory=dict)  # base -> next automatic number to try

    def _clashes(self, name: str) -> bool:
        """`d` clashes with `d` and with `d.0`, and the other way round."""
        return name in self.taken or name in self.heads or name.split(".")[0] in self.taken

    def name(self, label: str | None, base: str, span: Span) -> str:
        if label is not None:
            check_label(label.split(".")[0], span)
            if self._clashes(label):
                head = label.split(".")[0]
                reserved = head in ("add", "shortcut", "input")
                raise CnnNameError(f"duplicate layer name {head!r}" + (" (a reserved name here)" if reserved else ""),
                                   span, hint="names must be unique within a block or residual")
            chosen = label
        else:
            k = self.counters.get(base, 1)
            while self._clashes(f"{base}{k}"):
                k += 1
            self.counters[base] = k + 1
            chosen = f"{base}{k}"
        self.taken.add(chosen)
        if "." in chosen:
            self.heads.add(chosen.split(".")[0])
        return f"{self.prefix}.{chosen}" if self.prefix else chosen
