"""Ledger entry ``sglang-torch-native-cpu-pad`` (patches/sglang-torch-native-cpu-pad.md).

Why: with DP attention (``--dp-size N --enable-dp-attention``) every rank pads its batch to
the size the ranks agreed on before the MoE gather (``ForwardBatch._pad_inputs_to_size``).
On the CPU it asks the attention backend for the sequence length of a padding row,
``attn_backend.get_cpu_graph_seq_len_fill_value()``; only the Intel AMX backend has that
method, so the torch-native backend (the one that runs without ``sgl_kernel``) fails with
``AttributeError`` on the first padded step.

How: ``TorchNativeAttnBackend`` gets the method, returning 1, as the AMX backend and the
CUDA backends' ``get_cuda_graph_seq_len_fill_value`` do: a padding row is a sequence of one
token. There is nothing to wrap (the method does not exist), so no ``HookRegistry`` hook
applies: the method is added to the class.
"""

from __future__ import annotations

from . import PatchError, check_version, is_marked, mark

NAME = "sglang-torch-native-cpu-pad"
TARGET_MODULE = "sglang.srt.layers.attention.torch_native_backend"


def _target():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend


def check() -> None:
    check_version(NAME)
    existing = getattr(_target(), "get_cpu_graph_seq_len_fill_value", None)
    if existing is not None and not is_marked(existing, NAME):
        raise PatchError(f"{NAME}: TorchNativeAttnBackend has get_cpu_graph_seq_len_fill_value "
                         f"now; drop this patch (patches/{NAME}.md)")


def is_applied() -> bool:
    return is_marked(getattr(_target(), "get_cpu_graph_seq_len_fill_value", None), NAME)


def get_cpu_graph_seq_len_fill_value(self) -> int:
    """Sequence length of a padding row: one token."""
    return 1


def apply() -> None:
    if is_applied():
        return
    _target().get_cpu_graph_seq_len_fill_value = mark(get_cpu_graph_seq_len_fill_value, NAME,
                                                      None)
