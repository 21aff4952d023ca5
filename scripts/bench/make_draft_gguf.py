#!/usr/bin/env python3
"""Writes a more heavily quantized copy of a GGUF model, for use as a speculative-decoding
draft (`attn generate --draft FILE`).

The chosen tensors (default: the token embedding, which Gemma 3 also uses as its output
projection and which is most of what a decode step reads) are dequantized and requantized
to Q4_0; every other tensor and all metadata are copied unchanged, so the copy shares the
original's tokenizer.

    ~/.venvs/torch/bin/python scripts/bench/make_draft_gguf.py IN.gguf OUT.gguf [TENSOR ...]

Needs the `gguf` package (llama.cpp's gguf-py, on PyPI). A benchmark helper, not part of attn.
"""
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    names = set(sys.argv[3:]) or {"token_embd.weight"}
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for field in r.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    tensors = []
    for t in r.tensors:
        if t.name in names:
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            data = gguf.quants.quantize(values, Q.Q4_0)
            print(f"{t.name}: {t.tensor_type.name} {t.n_bytes} bytes -> Q4_0 {data.nbytes} bytes", file=sys.stderr)
            tensors.append((t.name, data, Q.Q4_0))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    missing = names - {t.name for t in r.tensors}
    if missing:
        sys.exit(f"no such tensor(s): {sorted(missing)}")
    for name, data, qtype in tensors:
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data, _ in tensors:
        w.write_tensor_data(data, tensor_endianess=r.endianess)
    w.close()


if __name__ == "__main__":
    main()
