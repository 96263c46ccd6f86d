"""bitnet_runtime: loads bitnet-compile artifacts and runs their kernels with numpy and apache-tvm-ffi only.

Entry points: ``artifact.Artifact`` (load and check an artifact), ``linear.BitLinear`` (a ternary
linear layer on its kernels), ``services.set_num_threads``, and ``bitnet-runtime verify DIR``.
"""
