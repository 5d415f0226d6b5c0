"""The native decode loop: a pre-norm GPT's decode step and the draw of each token in C.

`structs` is the interface with the C code as one table (ctypes Structures, from which the C
header is written); `build` compiles `native_decode.c` (+ `kernels.h`) with the machine's C
compiler once per machine and loads it (`library`, `available`, `library_dir`, `Unavailable`);
`layout` stores a model's weights the way the C code reads them (`stored_weights`, one of the
`WEIGHT_KINDS` per matrix), once per model; `loop` is `NativeLoop`, which checks every shape
and samples a chunk of tokens per call, and `supports`, which models it computes.
"""
