"""
Fixes for Triton's CPU interpreter (3.6 through 3.9) (`TRITON_INTERPRET=1`, used by the CPU test suite). Compiled GPU kernels are
unaffected: nothing here runs unless the interpreter is on.
"""

import numpy as np


def patch_triton_interpreter() -> None:
    """
    - With numpy >= 2.4, `int()` of a 1-element array raises, and the interpreter turns loop bounds into ints that
      way, so `for i in range(runtime_value)` in a kernel fails: make `__index__` take the element instead.
    - `tl.reduce` with a custom combine function (xor_sum, used by tl.sort / tl.topk / tl.flip) runs one Python call
      per element: give xor its numpy reduction (same result).
    - Triton 3.9: a comparison of scalars (`blk >= 0`) is tagged with its operands' type (int32), so splatting it
      to a block stores int32, and a load masked by `block_mask & scalar_mask` fails with "mask has unsupported
      dtype": tag boolean results as int1.
    """
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if getattr(interp, "_nsa_hf_patched", False):
        return
    interp._nsa_hf_patched = True
    try:
        int(np.array([1]))
    except TypeError:
        patch_tensor = interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = _patch_lang_tensor
    binary_op = interp.InterpreterBuilder.binary_op

    def _binary_op(self, lhs, rhs, op):
        out = binary_op(self, lhs, rhs, op)
        if out.data.dtype == np.bool_ and out.dtype != tl.int1:
            out = interp.TensorHandle(out.data, tl.int1)
        return out

    interp.InterpreterBuilder.binary_op = _binary_op
    apply_impl = interp.ReduceOps.apply_impl

    def _apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine:
            data = input[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), input[0].dtype)
        return apply_impl(self, input)

    interp.ReduceOps.apply_impl = _apply_impl
